"""Context parallelism, the process half: N-1 spawned worker ranks beside the caller's rank 0, and the
Denoiser that drives them.

Design (docs/context-parallel.md):
- The caller's process is rank 0 and does all the I/O: the pipeline, the encoders, the VAE, saving.
  `context_parallel_denoiser` spawns ranks 1..N-1 (multiprocessing "spawn"), each with the same plain
  transformer (pickled through torch.multiprocessing: shared memory on the CPU, CUDA IPC on a GPU, then
  copied to the rank's own device). Every rank wraps its copy in the same torch denoiser
  (backends.torch.torch_denoiser: eager, compile or FP8) with context-parallel attention processors.
- Per call: rank 0 sends a command (the input shapes) down each worker's pipe, then broadcasts the
  inputs over the process group; every rank runs the forward on its slice of the tokens
  (sharding.py) and the velocity is all-gathered. Workers wait for commands on a pipe, not in a
  collective, so an idle engine never times out.
- Failure: a worker that raises reports its error on its pipe and exits; its exit closes its
  connections, so rank 0's pending collective fails at once; rank 0 then collects the reports,
  terminates and joins every worker, and raises RankFailedError naming the rank and its error.
  A rank that hangs fails the call after `timeout_s` (the process group's timeout). A failed
  denoiser is closed: load the engine again. Workers exit when rank 0's process ends (the pipe
  closes; daemon processes).
- Process groups are c10d backends constructed directly (gloo on CPUs, NCCL on GPUs) over a TCPStore
  on 127.0.0.1: no global default group, so a process may hold more than one.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ..backends import DenoiserBase
from ..backends.torch import weight_sharing_copy
from ..backends.torch_options import TorchOptions
from ..buckets import ShapeKey
from ..errors import BackendUnavailableError, ConfigError
from .rank import (
    DEFAULT_TIMEOUT_S,
    HOST,
    RENDEZVOUS_TIMEOUT_S,
    STARTUP_TIMEOUT_S,
    RankRunner,
    RankSpec,
    describe,
    is_communication_error,
    make_backend,
    rank_denoiser,
    worker_main,
)
from .sharding import Group, Layout

log = logging.getLogger(__name__)

# A worker's exit status when the caller's script started context parallelism at import time: each
# spawned worker imports that script again, reaches the same call, and multiprocessing refuses to spawn
# during its bootstrapping ("An attempt has been made to start a new process...").
MAIN_GUARD_EXIT = 87
MAIN_GUARD_HINT = (
    'put the code that loads the engine under `if __name__ == "__main__":` (each context-parallel '
    "worker imports your script again)"
)
STOP_GRACE_S = 10.0  # how long close() waits for a worker to exit before terminating it
REPORT_GRACE_S = 5.0  # how long a failure waits for the other ranks' error reports


class RankFailedError(BackendUnavailableError):
    """A rank of a context-parallel denoiser failed (raised, died or timed out). The denoiser is closed
    and its workers are gone; load the engine again."""


# --------------------------------------------------------------------------- refusals


def check_context_parallel(
    world_size: int,
    *,
    backend: str = "torch",
    mode: str = "eager",
    options: TorchOptions | None = None,
    device: str | torch.device = "cpu",
) -> None:
    """Refuse, in one line each, what context parallelism over `world_size` processes cannot run.
    world_size 1 is the plain denoiser and always passes."""
    if world_size < 1:
        raise ConfigError(f"context_parallel must be 1 (off) or more processes, got {world_size}")
    if world_size == 1:
        return
    if backend != "torch":
        raise ConfigError(
            f"context parallelism splits the torch transformer; a built {backend} engine runs as one "
            "process: load with backend='torch' (a preset or weights path) or drop --context-parallel"
        )
    options = options or TorchOptions()
    if options.cuda_graphs:
        raise ConfigError(
            "context parallelism cannot replay CUDA graphs (collectives per step): drop the graphs lever"
        )
    if options.attention != "sdpa":
        raise ConfigError(
            f"context parallelism brings its own attention processor; attention={options.attention!r} "
            "would replace it: drop the attn-* lever"
        )
    if mode == "fp8" and options.fp8_scales == "static":
        raise ConfigError("context parallelism runs FP8 with dynamic scales only: drop the static lever")
    dev = torch.device(device)
    if dev.type == "cuda" and torch.cuda.device_count() < world_size:
        raise BackendUnavailableError(
            f"context parallelism over {world_size} processes needs {world_size} CUDA devices, this machine "
            f"has {torch.cuda.device_count()}: pass --context-parallel {max(torch.cuda.device_count(), 1)}"
        )
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"context parallelism runs on cpu (gloo) or cuda (NCCL), not {dev.type}")


def rank_devices(device: torch.device, world_size: int) -> tuple[str, ...]:
    """Rank 0 keeps the caller's device; on CUDA the other ranks take the other GPUs in index order."""
    if device.type == "cpu":
        return ("cpu",) * world_size
    first = device.index if device.index is not None else torch.cuda.current_device()
    others = [i for i in range(torch.cuda.device_count()) if i != first]
    return tuple(f"cuda:{i}" for i in [first, *others][:world_size])


# --------------------------------------------------------------------------- rank 0


@dataclass
class _Worker:
    rank: int
    process: Any  # multiprocessing SpawnProcess
    conn: Any  # rank 0's end of the pipe


class ContextParallelDenoiser(DenoiserBase):
    """The Denoiser contract over N processes: rank 0 is this object, ranks 1..N-1 its workers.

    Calls are serialized (a lock): every rank must issue the same collectives in the same order.
    Call close() (or let the engine close it) to stop the workers.
    """

    shape_keys: frozenset[ShapeKey] | None = None  # any shape, as the torch denoiser

    def __init__(self, runner: RankRunner, workers: list[_Worker], store: Any, name: str) -> None:
        self.runner = runner
        self.workers = workers
        self.store = store  # the TCPStore the ranks met through (rank 0 serves it)
        self.name = name
        self._lock = threading.Lock()
        self._closed = False

    @property
    def world_size(self) -> int:
        return len(self.workers) + 1

    @property
    def closed(self) -> bool:
        return self._closed

    def run(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:  # DENOISER_INPUTS -> [B, N + M, 64]
        inputs = {k: v.contiguous() for k, v in inputs.items()}
        text, image = inputs["encoder_hidden_states"].shape[1], inputs["hidden_states"].shape[1]
        Layout.of(text, image, self.world_size)  # refuse early
        shapes = [(tuple(v.shape), v.dtype) for v in inputs.values()]
        with self._lock:
            if self._closed:
                raise BackendUnavailableError(
                    "this context-parallel denoiser is closed (a rank failed or close() was called); "
                    "load the engine again"
                )
            try:
                for w in self.workers:
                    w.conn.send(("forward", shapes))
                with torch.inference_mode():
                    return self.runner.step(inputs)
            except Exception as e:
                raise self._fail(e) from e
            except BaseException:  # KeyboardInterrupt: no report, but no worker left behind
                self._shutdown(grace=0.0)
                raise

    def _fail(self, error: BaseException) -> RankFailedError:
        """Collect the workers' reports, stop every worker, and name the rank that failed first (a rank
        whose own error is not a failed collective), or the ranks that never answered."""
        timed_out = "timed out" in str(error).lower()  # the others had timeout_s to report already
        grace = REPORT_GRACE_S if is_communication_error(error) and not timed_out else 0.5
        reports = _collect_reports(self.workers, grace)
        self._shutdown(grace=0.0)
        own = (0, describe(error), is_communication_error(error))
        causes = [r for r in [own, *reports] if not r[2]] or reports
        tail = "Every worker is stopped and this denoiser is closed: load the engine again"
        if not causes:  # rank 0's collective failed and no worker said why: they hung or were too slow
            silent = ", ".join(str(w.rank) for w in self.workers)
            log.error("context-parallel call failed: %s; rank(s) %s silent", own[1], silent)
            return RankFailedError(
                f"context-parallel rank(s) {silent} of {self.world_size} did not answer (hung or slower than "
                f"the timeout): rank 0 got {own[1]}. {tail}"
            )
        rank, text, _ = causes[0]
        others = sorted({r[0] for r in [own, *reports]} - {rank})
        after = f"; rank(s) {', '.join(map(str, others))} failed after it" if others else ""
        log.error("context-parallel rank %d failed: %s", rank, text)
        return RankFailedError(
            f"context-parallel rank {rank} of {self.world_size} failed: {text}{after}. {tail}"
        )

    def close(self) -> None:
        """Stop the workers (asked, then terminated after STOP_GRACE_S) and free the group. Idempotent."""
        with self._lock:
            self._shutdown(grace=STOP_GRACE_S)

    def _shutdown(self, grace: float) -> None:
        if self._closed:
            return
        self._closed = True
        for w in self.workers:
            with contextlib.suppress(OSError, ValueError):  # a dead worker's pipe
                w.conn.send(("stop",))
        stop_workers(self.workers, grace)
        self.runner.group.backend = None  # the c10d backend and its connections go with the last reference


def _collect_reports(workers: list[_Worker], grace: float) -> list[tuple[int, str, bool]]:
    """('error', rank, text, is_communication) reports, waiting up to `grace` s for live workers to send
    one or exit. A worker that died without a report is reported by its exit code, as a cause."""
    deadline = time.monotonic() + grace
    reports: dict[int, tuple[int, str, bool]] = {}
    pending = {w.rank: w for w in workers}
    while pending:
        for rank, w in list(pending.items()):
            dead = not w.process.is_alive()  # before the poll: a report sent before dying is read
            message = _poll(w.conn)
            if message is not None and message[0] == "error":
                reports[rank] = (rank, message[2], message[3])
                del pending[rank]
            elif dead:  # killed (signal, OOM) or crashed without a word: a cause, not a consequence
                w.process.join(0.1)
                reports[rank] = (rank, f"the process exited with code {w.process.exitcode}", False)
                del pending[rank]
        if time.monotonic() >= deadline:
            break
        time.sleep(0.02)
    return [reports[r] for r in sorted(reports)]


def _poll(conn: Any) -> Any | None:
    try:
        return conn.recv() if conn.poll() else None
    except (EOFError, OSError):
        return None


def stop_workers(workers: list[_Worker], grace: float) -> None:
    """Join every worker within `grace` seconds, then terminate, then kill: none is left running."""
    deadline = time.monotonic() + grace
    for w in workers:
        w.process.join(max(0.0, deadline - time.monotonic()))
    for w in workers:
        if w.process.is_alive():
            w.process.terminate()
            w.process.join(5.0)
        if w.process.is_alive():
            w.process.kill()
            w.process.join(5.0)
        w.conn.close()


def _await(workers: list[_Worker], kind: str, deadline: float) -> None:
    """Wait until every worker has sent (kind, rank); raise RankFailedError on an error report, an exit,
    or the deadline."""
    pending = {w.rank: w for w in workers}
    while pending:
        for rank, w in list(pending.items()):
            dead = not w.process.is_alive()  # before the poll: a report sent before dying is read
            message = _poll(w.conn)
            if message is not None and message[0] == kind:
                del pending[rank]
            elif message is not None and message[0] == "error":
                raise RankFailedError(f"context-parallel rank {rank} failed while starting: {message[2]}")
            elif message is None and dead:
                w.process.join(0.1)
                if w.process.exitcode == MAIN_GUARD_EXIT:
                    raise RankFailedError(f"context-parallel rank {rank} could not start: {MAIN_GUARD_HINT}")
                raise RankFailedError(
                    f"context-parallel rank {rank} exited with code {w.process.exitcode} while starting "
                    "(see its stderr)"
                )
        if time.monotonic() > deadline:
            raise RankFailedError(
                f"context-parallel rank(s) {', '.join(map(str, pending))} not {kind} after "
                f"{STARTUP_TIMEOUT_S:.0f} s"
            )
        time.sleep(0.02)


def _start(process: Any) -> None:
    """process.start(); inside a worker still importing the caller's unguarded script, one log line and
    exit MAIN_GUARD_EXIT (rank 0 turns it into MAIN_GUARD_HINT) instead of multiprocessing's traceback."""
    try:
        process.start()
    except RuntimeError as e:
        if "bootstrapping phase" not in str(e):
            raise
        log.error("context parallelism started while a worker imported the script: %s", MAIN_GUARD_HINT)
        raise SystemExit(MAIN_GUARD_EXIT) from None


def context_parallel_denoiser(
    transformer: torch.nn.Module,
    world_size: int,
    *,
    mode: str = "eager",
    options: TorchOptions | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    threads: int | None = None,
) -> ContextParallelDenoiser:
    """A Denoiser that splits each forward of `transformer` over `world_size` processes: this one (rank 0)
    and world_size - 1 spawned workers, on `transformer`'s device (cpu: gloo; cuda:k: NCCL, ranks on
    the other GPUs). mode and options: the torch denoiser's (eager, compile, fp8), applied on every rank.

    `transformer` is the plain diffusers FluxTransformer2DModel (no compile, FP8 or fused QKV applied
    yet): it is pickled to the workers and left unchanged here (rank 0 runs a weight-sharing copy).
    timeout_s: how long one collective may wait for a rank. threads: torch threads per worker.
    Call close() to stop the workers.
    """
    options = options or TorchOptions()
    device = next(transformer.parameters()).device
    check_context_parallel(world_size, mode=mode, options=options, device=device)
    if world_size < 2:
        raise ConfigError(f"context_parallel_denoiser needs 2 or more processes, got {world_size}")
    import torch.multiprocessing as mp  # registers the reductions that share tensors with the workers

    startup = datetime.timedelta(seconds=STARTUP_TIMEOUT_S)
    store = dist.TCPStore(HOST, 0, None, True, timeout=startup, wait_for_workers=False)
    devices = rank_devices(device, world_size)
    dtype = next(transformer.parameters()).dtype
    spec = RankSpec(world_size, store.port, devices, dtype, mode, options, timeout_s, threads)
    ctx = mp.get_context("spawn")
    workers: list[_Worker] = []
    try:
        for rank in range(1, world_size):
            parent_end, child_end = ctx.Pipe()
            process = ctx.Process(
                target=worker_main,
                args=(rank, spec, transformer, child_end),
                name=f"kontext-cp-rank{rank}",
                daemon=True,
            )
            _start(process)
            child_end.close()
            workers.append(_Worker(rank, process, parent_end))
        group = Group(None, 0, world_size)
        local = rank_denoiser(weight_sharing_copy(transformer), group, spec, devices[0])
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        _await(workers, "loaded", deadline)
        group.backend = make_backend(spec, store, 0, RENDEZVOUS_TIMEOUT_S)
        _await(workers, "ready", deadline)
    except BaseException:
        stop_workers(workers, grace=0.0)
        raise
    name = f"{local.name}+cp{world_size}"
    log.info("context-parallel denoiser %s on %s (%s)", name, ", ".join(devices), spec.backend)
    return ContextParallelDenoiser(RankRunner(local, group), workers, store, name)
