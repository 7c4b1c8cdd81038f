"""CUDA graphs over a whole transformer step: one captured graph per input signature (shapes, dtypes).

A step of the 12B model launches about 1,500 kernels; replaying them as one graph removes the CPU launch
gaps between them. Capture follows torch's recipe: warm-up calls on a side stream (so compiled code
and cuBLAS handles exist before capture), then `torch.cuda.graph` records one call that reads static
input buffers. A replay copies the call's inputs into those buffers, replays, and returns a clone of
the static output (the next replay overwrites it). All graphs share one memory pool: replays never
overlap (a lock serializes them), so their intermediates may reuse the same memory.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

StepFn = Callable[[dict[str, torch.Tensor]], torch.Tensor]
Signature = tuple[tuple[str, tuple[int, ...], torch.dtype, torch.device], ...]


@dataclass
class Captured:
    """One shape's graph: the buffers it reads and writes, and how to replay it."""

    inputs: dict[str, torch.Tensor]  # static input buffers, one per Denoiser input
    output: torch.Tensor  # the static output the graph writes
    replay: Callable[[], None]


Capture = Callable[[StepFn, dict[str, torch.Tensor]], Captured]


def signature(inputs: dict[str, torch.Tensor]) -> Signature:
    return tuple((k, tuple(v.shape), v.dtype, v.device) for k, v in inputs.items())


def capture_cuda_graph(fn: StepFn, example: dict[str, torch.Tensor], warmup: int = 2) -> Captured:
    """Warm `fn` up on a side stream, then capture one call of it on static copies of `example`."""
    static = {k: v.clone() for k, v in example.items()}
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn(static)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=_shared_pool()):
        out = fn(static)
    return Captured(static, out, graph.replay)


_POOL: Any = None


def _shared_pool() -> Any:
    """One graph memory pool per process for every GraphedCall (replays are serialized)."""
    global _POOL
    if _POOL is None:
        _POOL = torch.cuda.graph_pool_handle()
    return _POOL


class GraphedCall:
    """`fn` replayed from a graph captured on the first call of each input signature.

    capture: how a graph is made (default: CUDA). Tests on a CPU pass a capture that re-runs `fn` on the
    static buffers at each replay, which checks the buffer plumbing without a GPU.
    """

    def __init__(self, fn: StepFn, capture: Capture = capture_cuda_graph) -> None:
        self.fn = fn
        self._capture = capture
        self._graphs: dict[Signature, Captured] = {}
        self._lock = threading.Lock()

    @property
    def captured(self) -> int:
        """How many graphs exist (one per input signature seen)."""
        return len(self._graphs)

    @torch.inference_mode()
    def __call__(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        sig = signature(inputs)
        with self._lock:
            g = self._graphs.get(sig)
            if g is None:
                g = self._graphs[sig] = self._capture(self.fn, inputs)
            for name, buf in g.inputs.items():
                buf.copy_(inputs[name])
            g.replay()
            return g.output.clone()
