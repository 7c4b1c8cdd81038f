"""CUDA graphs over a whole transformer step: one captured graph per GraphKey (inputs' shapes, dtypes).

A step of the 12B model launches about 1,500 kernels; replaying them as one graph removes the CPU launch
gaps between them. Capture follows torch's recipe: warm-up calls on a side stream (so compiled code
and cuBLAS handles exist before capture), then `torch.cuda.graph` records one call that reads static
input buffers. A replay copies the call's inputs into those buffers, replays, and returns a clone of
the static output (the next replay overwrites it). The graphs of one GraphedCall share one memory pool:
its replays never overlap (a lock serializes them), so their intermediates may reuse the same memory.
Two GraphedCalls (two benchmark contestants, say) never share a pool: a block the first one's graphs
left alive in a shared pool could trip the caching allocator when the second captures into it
(read from torch's caching allocator, c10/cuda/CUDACachingAllocator.cpp in pytorch/pytorch, not
reproduced; docs/gpu.md, 'CUDA graphs: when they are captured').
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

StepFn = Callable[[dict[str, torch.Tensor]], torch.Tensor]
# A captured graph's key: (name, shape, dtype, device) of each input (not backends.Signature, a call's
# (batch, tokens, text tokens))
GraphKey = tuple[tuple[str, tuple[int, ...], torch.dtype, torch.device], ...]


@dataclass
class Captured:
    """One shape's graph: the buffers it reads and writes, and how to replay it."""

    inputs: dict[str, torch.Tensor]  # static input buffers, one per Denoiser input
    output: torch.Tensor  # the static output the graph writes
    replay: Callable[[], None]


Capture = Callable[[StepFn, dict[str, torch.Tensor]], Captured]


def graph_key(inputs: dict[str, torch.Tensor]) -> GraphKey:
    return tuple((k, tuple(v.shape), v.dtype, v.device) for k, v in inputs.items())


def capture_cuda_graph(
    fn: StepFn, example: dict[str, torch.Tensor], warmup: int = 2, pool: Any = None
) -> Captured:
    """Warm `fn` up on a side stream, then capture one call of it on static copies of `example`, into the
    memory pool `pool` (torch.cuda.graph_pool_handle(); None: a private pool of this graph)."""
    static = {k: v.clone() for k, v in example.items()}
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn(static)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = fn(static)
    return Captured(static, out, graph.replay)


class GraphedCall:
    """`fn` replayed from a graph captured on the first call of each GraphKey.

    capture: how a graph is made (default: CUDA, into this call's own memory pool). Tests on a CPU pass a
    capture that re-runs `fn` on the static buffers at each replay, which checks the buffer plumbing
    without a GPU.
    """

    def __init__(self, fn: StepFn, capture: Capture | None = None) -> None:
        self.fn = fn
        self._capture = capture or self._capture_cuda
        self._graphs: dict[GraphKey, Captured] = {}
        self._lock = threading.Lock()
        self._pool: Any = None  # this call's graph memory pool, made at its first capture

    def _capture_cuda(self, fn: StepFn, example: dict[str, torch.Tensor]) -> Captured:
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        return capture_cuda_graph(fn, example, pool=self._pool)

    @property
    def captured(self) -> int:
        """How many graphs exist (one per GraphKey seen)."""
        return len(self._graphs)

    @torch.inference_mode()
    def __call__(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        key = graph_key(inputs)
        with self._lock:
            g = self._graphs.get(key)
            if g is None:
                g = self._graphs[key] = self._capture(self.fn, inputs)
            for name, buf in g.inputs.items():
                buf.copy_(inputs[name])
            g.replay()
            return g.output.clone()
