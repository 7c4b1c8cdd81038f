"""Context parallelism, what every rank runs: the process group, one call's step, and a worker's loop.

Rank 0 (launcher.ContextParallelDenoiser) and the spawned workers (`worker_main`) run the same
RankRunner.step: receive the call's inputs from rank 0, run the forward on this rank's tokens
(sharding.py), all-gather the velocity. A worker waits for the next command on its pipe, not in a
collective, so an idle engine never times out; any error it meets is reported on the pipe, and the
worker exits (which closes its connections, so the other ranks' pending collectives fail at once).
"""

from __future__ import annotations

import contextlib
import datetime
import traceback
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from ..backends import named_inputs
from ..backends.torch import TorchDenoiser, torch_denoiser
from ..backends.torch_options import TorchOptions
from ..process import exit_now
from .sharding import Group, Layout, install_processors, shard_inputs

HOST = "127.0.0.1"  # the store and the gloo pairs: ranks on this machine only
DEFAULT_TIMEOUT_S = 600.0  # one collective; a 12B forward is seconds, its first compile minutes
STARTUP_TIMEOUT_S = 600.0  # a worker importing torch and copying the transformer to its device
RENDEZVOUS_TIMEOUT_S = 60.0  # rank 0 joining the group once every worker said it has loaded


@dataclass(frozen=True)
class RankSpec:
    """What a worker needs besides the transformer (picklable: crosses the spawn boundary)."""

    world_size: int
    port: int
    devices: tuple[str, ...]
    dtype: torch.dtype
    mode: str = "eager"
    options: TorchOptions = field(default_factory=TorchOptions)
    timeout_s: float = DEFAULT_TIMEOUT_S
    threads: int | None = None  # torch threads per worker (CPU); None: torch's default

    @property
    def backend(self) -> str:
        return "gloo" if self.devices[0] == "cpu" else "nccl"

    def timeout(self) -> datetime.timedelta:
        return datetime.timedelta(seconds=self.timeout_s)


def make_backend(spec: RankSpec, store: Any, rank: int, rendezvous_s: float) -> Any:
    """This rank's c10d backend. gloo connects every pair here, waiting up to `rendezvous_s` for the other
    ranks; then each collective may wait spec.timeout_s. NCCL connects at the first collective."""
    if spec.backend == "gloo":
        backend = dist.ProcessGroupGloo(
            store, rank, spec.world_size, datetime.timedelta(seconds=rendezvous_s)
        )
        backend.set_timeout(spec.timeout())
        return backend
    options = dist.ProcessGroupNCCL.Options()  # type: ignore[attr-defined]  # absent from CPU builds
    options._timeout = spec.timeout()
    return dist.ProcessGroupNCCL(store, rank, spec.world_size, options)  # type: ignore[attr-defined]


class RankRunner:
    """One rank's forward of one call: receive the inputs from rank 0, run the local tokens, gather."""

    def __init__(self, denoiser: TorchDenoiser, group: Group) -> None:
        self.denoiser = denoiser
        self.group = group

    def step(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """inputs: the Denoiser's keyword inputs (rank 0: the call's; other ranks: buffers of the same
        shapes, filled here) -> the full velocity [B, N + M, 64] on every rank."""
        for tensor in inputs.values():
            self.group.broadcast(tensor)
        layout = Layout.of(
            inputs["encoder_hidden_states"].shape[1], inputs["hidden_states"].shape[1], self.group.size
        )
        self.group.joint = layout.joint
        out = self.denoiser(**shard_inputs(inputs, layout, self.group.rank))  # [B, I_r, 64]
        return self.group.gather(out, layout.image, dim=1)  # [B, N + M, 64]


def rank_denoiser(transformer: torch.nn.Module, group: Group, spec: RankSpec, device: str) -> TorchDenoiser:
    """`transformer` (changed in place) with context-parallel attention on `device`, as a torch denoiser."""
    install_processors(transformer, group)
    return torch_denoiser(transformer, mode=spec.mode, device=device, dtype=spec.dtype, options=spec.options)


def describe(error: BaseException) -> str:
    """'RuntimeError: boom (at file.py:12 in f)': the error and the innermost frame that raised it."""
    frames = traceback.extract_tb(error.__traceback__)
    where = f" (at {frames[-1].filename}:{frames[-1].lineno} in {frames[-1].name})" if frames else ""
    return f"{type(error).__name__}: {error}{where}"


def is_communication_error(error: BaseException) -> bool:
    """A collective that failed because another rank did (a consequence, not the cause)."""
    text = str(error)
    return isinstance(error, dist.DistError) or (
        isinstance(error, RuntimeError) and any(s in text for s in ("gloo", "Connection closed", "NCCL"))
    )


def worker_main(rank: int, spec: RankSpec, transformer: torch.nn.Module, conn: Any) -> None:
    """A worker rank: load, join the group, then run every command rank 0 sends until 'stop' or EOF.
    Any error is reported on the pipe (('error', rank, text, is_communication)) and ends the process.

    The process ends through `process.exit_now` (exit status 0 after 'stop' or EOF, 1 after an error): a
    spawned interpreter's own exit tore down torch and diffusers for 1.3 s of every engine close, and
    let C++ destructors of the c10d group run in whatever order interpreter teardown reached them."""
    status = 1
    try:
        status = _serve(rank, spec, transformer, conn)
    except BaseException as e:  # every failure is reported, then the process ends
        with contextlib.suppress(OSError, ValueError):  # rank 0 gone: nobody to tell
            conn.send(("error", rank, describe(e), is_communication_error(e)))
    exit_now(status)


def _serve(rank: int, spec: RankSpec, transformer: torch.nn.Module, conn: Any) -> int:
    """The worker's life until rank 0 says stop or goes away (0); an error raises."""
    if spec.threads is not None:
        torch.set_num_threads(spec.threads)
    device = spec.devices[rank]
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    group = Group(None, rank, spec.world_size)
    # CPU: the weights stay in the shared memory rank 0 put them in; CUDA: copied to this rank's GPU
    runner = RankRunner(rank_denoiser(transformer, group, spec, device), group)
    conn.send(("loaded", rank))
    store = dist.TCPStore(HOST, spec.port, None, False, timeout=datetime.timedelta(seconds=STARTUP_TIMEOUT_S))
    group.backend = make_backend(spec, store, rank, STARTUP_TIMEOUT_S)  # rank 0 joins last
    conn.send(("ready", rank))
    while True:
        try:
            command = conn.recv()
        except (EOFError, OSError):  # rank 0's process is gone
            return 0
        if command[0] == "stop":
            group.backend = None  # the c10d group and its connections, before the process ends
            return 0
        shapes: list[tuple[tuple[int, ...], torch.dtype]] = command[1]
        with torch.inference_mode():
            inputs = named_inputs(*(torch.empty(s, dtype=d, device=device) for s, d in shapes))
            runner.step(inputs)
