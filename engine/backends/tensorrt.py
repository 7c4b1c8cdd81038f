"""TensorRT backend: plans deserialized once, a context per (plan, shape key, worker), CUDA graphs per key.

Each worker owns a CUDA stream and one device-memory block sized for the largest profile it runs;
its contexts (user-managed allocation) share that block, so a worker runs one call at a time.
Threads check a worker out per call: `workers` calls run at once, the others wait. Each context is
set to one shape key once (static I/O buffers, set_tensor_address), which is what lets a CUDA graph
of its enqueue be replayed; with dynamic profiles several contexts share profile 0 (allowed since
TensorRT 10). Graphs are captured only by `capture_graphs` (KontextEngine.warmup), on every worker,
before serving. Plans of other bucket families load on first use, outside the lock calls take, and
are freed least-recently-used under a byte budget. Every TensorRT call runs under the denoiser's
CUDA device. CUDA is checked before any TensorRT call: deserializing without a GPU segfaults.

The worker pool, the per-key contexts and the graph capture share one lock discipline, so they live in
this one file; the plan bookkeeping (routes, profiles, the byte budget) is tensorrt_plans.py.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..buckets import ShapeKey
from ..config import LoadOptions, TransformerConfig
from ..errors import BackendUnavailableError, ConfigError, ManifestError, ShapeNotServedError
from ..manifest import Artifact, MachineFacts, Manifest, check_manifest, rebuild_command, select_artifact
from . import (
    DENOISER_INPUTS,
    DENOISER_OUTPUT,
    DenoiserBase,
    Signature,
    call_signature,
    key_signature,
)
from .inputs import dummy_inputs, input_shapes
from .tensorrt_plans import (
    BACKEND,
    PlanBudget,
    Route,
    cuda_device,
    device_memory_block,
    parse_plan_name,
    profile_mismatch,
    profile_shapes,
    profile_table,
    require_tensorrt,
    route_for,
)

if TYPE_CHECKING:
    import tensorrt as trt

log = logging.getLogger(__name__)


def machine_facts(weights_id: str, device: torch.device) -> MachineFacts:
    """This machine as a TensorRT manifest sees it (CUDA checked before TensorRT is imported)."""
    trt_module = require_tensorrt()
    found = cuda_device(device.index or 0)
    if found is None:
        raise BackendUnavailableError(f"no CUDA device {device}; load with another device")
    name, (major, minor) = found
    return MachineFacts(weights_id, str(trt_module.__version__), name, f"{major}.{minor}")


def torch_dtype(dt: trt.DataType) -> torch.dtype:
    """The torch dtype of a plan's I/O tensor type."""
    import tensorrt as trt

    table = {
        trt.DataType.FLOAT: torch.float32,
        trt.DataType.HALF: torch.float16,
        trt.DataType.BF16: torch.bfloat16,
        trt.DataType.INT32: torch.int32,
        trt.DataType.INT64: torch.int64,
    }
    if dt not in table:
        raise ManifestError(f"plan I/O dtype {dt} is not supported; rebuild with `kontext build --force`")
    return table[dt]


class _Plan:
    """One deserialized engine, its I/O dtypes and per-profile device memory, checked against the
    manifest: every profile's (min, opt, max) must be what the manifest's shape keys need."""

    def __init__(
        self, runtime: trt.Runtime, path: Path, artifact: Artifact, cfg: TransformerConfig, rebuild: str
    ) -> None:
        engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            raise ManifestError(
                f"TensorRT could not deserialize {path} (version or GPU mismatch); rebuild with `{rebuild}`"
            )
        self.engine: trt.ICudaEngine = engine
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        missing = sorted(set(DENOISER_INPUTS) - set(names))
        if missing or DENOISER_OUTPUT not in names:
            raise ManifestError(f"{path} lacks I/O tensors {missing}; rebuild with `{rebuild}`")
        self.dtypes = {n: torch_dtype(engine.get_tensor_dtype(n)) for n in names}
        n_profiles = engine.num_optimization_profiles
        if n_profiles != len(set(artifact.profiles.values())):
            raise ManifestError(
                f"{path} has {n_profiles} optimization profiles, the manifest lists "
                f"{len(set(artifact.profiles.values()))}; rebuild with `{rebuild}`"
            )
        for p in range(n_profiles):
            expected = profile_shapes(cfg, artifact.keys_of_profile(p), artifact.family)
            actual = {name: engine.get_tensor_profile_shape(name, p) for name in expected}
            why = profile_mismatch(expected, actual)
            if why is not None:
                raise ManifestError(f"{path}, profile {p}: {why}; rebuild with `{rebuild}`")
        self.memory = {p: int(engine.get_device_memory_size_for_profile_v2(p)) for p in range(n_profiles)}


@dataclass
class _Entry:
    """One shape key of one plan on one worker: a context set to that key's shapes, its static I/O
    buffers (their addresses are bound to the context), and the CUDA graph of its enqueue once captured."""

    plan: _Plan
    context: trt.IExecutionContext
    buffers: dict[str, torch.Tensor]
    graph: torch.cuda.CUDAGraph | None = None


@dataclass
class _Worker:
    """What one concurrent caller uses: a stream, a device-memory block, and one entry per (plan, key).
    Only the thread that checked the worker out touches it."""

    index: int
    stream: torch.cuda.Stream
    block: torch.Tensor | None = None  # uint8 device memory shared by this worker's contexts
    entries: dict[tuple[str, Signature], _Entry] = field(default_factory=dict)  # (plan path, shapes)

    def drop_stale(self, plans: Mapping[str, _Plan]) -> None:
        """Release the contexts of plans no longer loaded (a context keeps its engine's weights alive)."""
        for k in [k for k, e in self.entries.items() if plans.get(k[0]) is not e.plan]:
            del self.entries[k]


class TrtDenoiser(DenoiserBase):
    """A Denoiser over TensorRT plans of one precision. Serves its artifacts' shape keys only.

    plans: (artifact, absolute path) pairs, already checked against the manifest (load_tensorrt) or
    just built (the build's verification runs this same class).
    """

    def __init__(
        self,
        plans: Sequence[tuple[Artifact, Path]],
        *,
        transformer: TransformerConfig,
        device: str = "cuda",
        workers: int = 1,
        plan_memory_budget: int | None = None,
        rebuild: str = "kontext build --force",
    ) -> None:
        require_tensorrt()  # CUDA checked before anything touches TensorRT
        import tensorrt as trt

        if workers < 1:
            raise ConfigError(f"workers must be at least 1, got {workers}")
        artifacts = [a for a, _ in plans]
        precisions = sorted({a.precision for a in artifacts})
        if len(precisions) != 1:
            raise ConfigError(f"a TrtDenoiser serves one precision, got {precisions or 'no plans'}")
        self.device = torch.device(device)
        self.name = f"tensorrt-{precisions[0]}"
        self._artifacts = {a.path: a for a in artifacts}
        self._paths = {a.path: path for a, path in plans}
        self._cfg = transformer
        self._rebuild = rebuild
        self.shape_keys: frozenset[ShapeKey] | None = frozenset(k for a in artifacts for k in a.shape_keys())
        self._key_of: dict[Signature, ShapeKey] = {}
        for k in sorted(self.shape_keys):
            self._key_of.setdefault(key_signature(k), k)
        self._table = profile_table(artifacts)
        self._strategy = trt.ExecutionContextAllocationStrategy.USER_MANAGED
        self._workers = workers
        self._plans: dict[str, _Plan] = {}
        self._loading: dict[str, threading.Lock] = {}  # one deserialize per plan at a time
        self._lock = threading.Lock()  # guards _plans, _budget, _loading and the pool's membership
        self._pool: queue.Queue[_Worker] = queue.Queue()
        with torch.cuda.device(self.device):
            self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
            total = torch.cuda.get_device_properties(self.device).total_memory
            for i in range(workers):
                self._pool.put(_Worker(i, torch.cuda.Stream(self.device)))
        self._budget = PlanBudget(plan_memory_budget or int(total * 0.8))
        log.info(
            "TensorRT %s: %d plan(s), %d shape keys, %d worker(s)",
            trt.__version__,
            len(artifacts),
            len(self.shape_keys),
            workers,
        )

    # ------------------------------------------------------------------ plans under the budget

    def _acquire_plan(self, path: str) -> _Plan:
        """The loaded plan, pinned. A deserialize (seconds for 12 GB) holds only that plan's loading
        lock, so calls of loaded plans go on; a failed one leaves nothing admitted or pinned."""
        with self._lock:
            for old in self._budget.admit(path, self._artifacts[path].bytes):
                self._free_plan(old)
            self._budget.pin(path)
            plan = self._plans.get(path)
            loading = self._loading.setdefault(path, threading.Lock())
        if plan is not None:
            return plan
        try:
            with loading:
                with self._lock:
                    plan = self._plans.get(path)
                if plan is None:
                    log.info("deserializing %s", self._paths[path])
                    plan = _Plan(
                        self._runtime, self._paths[path], self._artifacts[path], self._cfg, self._rebuild
                    )
                    with self._lock:
                        self._plans[path] = plan
            return plan
        except BaseException:
            self._release_plan(path)
            raise

    def _release_plan(self, path: str) -> None:
        with self._lock:
            self._budget.unpin(path)
            if path not in self._plans and not self._budget.pinned(path):
                self._budget.forget(path)  # admitted, never loaded (a failed deserialize)

    def _idle_workers(self) -> list[_Worker]:
        """Take every idle worker out of the pool (the caller puts each back); busy ones stay out."""
        idle: list[_Worker] = []
        while True:
            try:
                idle.append(self._pool.get_nowait())
            except queue.Empty:
                return idle

    def _free_plan(self, path: str) -> None:
        """Drop a plan and the idle workers' contexts of it (caller holds the lock). Busy workers drop
        theirs when they come back (`_return_worker`)."""
        log.info("freeing %s (plan memory budget)", path)
        self._plans.pop(path, None)
        for w in self._idle_workers():
            w.drop_stale(self._plans)
            self._pool.put(w)

    def _return_worker(self, w: _Worker) -> None:
        with self._lock:
            w.drop_stale(self._plans)  # plans evicted while this worker was busy
            self._pool.put(w)

    # ------------------------------------------------------------------ contexts and buffers

    def _entry(self, w: _Worker, plan: _Plan, route: Route, sig: Signature) -> _Entry:
        """This worker's context for one shape key of one plan, created (and set to its shapes) once."""
        entry = w.entries.get((route.artifact, sig))
        if entry is not None and entry.plan is plan:
            return entry
        need = device_memory_block(plan.memory)
        if w.block is None or w.block.numel() < need:
            w.block = torch.empty(need, dtype=torch.uint8, device=self.device)
            captured = sum(e.graph is not None for e in w.entries.values())
            for other in w.entries.values():  # re-point every context of this worker at the new block
                other.context.set_device_memory(w.block.data_ptr(), w.block.numel())
                other.graph = None  # graphs baked in the old address
            if captured:
                log.info(
                    "worker %d: device memory grew to %d bytes; %d CUDA graphs dropped until the next "
                    "warmup()",
                    w.index,
                    need,
                    captured,
                )
        ctx = plan.engine.create_execution_context(self._strategy)
        ctx.set_device_memory(w.block.data_ptr(), w.block.numel())
        ctx.set_optimization_profile_async(route.profile, w.stream.cuda_stream)  # raises on failure
        buffers: dict[str, torch.Tensor] = {}
        with torch.inference_mode(False):  # normal tensors: callers may run outside inference mode
            for name, shape in self._input_shapes(sig).items():
                if not ctx.set_input_shape(name, shape):
                    raise ManifestError(
                        f"{route.artifact}: profile {route.profile} refuses {name} of shape {shape} "
                        f"(the plan and its manifest disagree); rebuild with `{self._rebuild}`"
                    )
                buffers[name] = torch.empty(shape, dtype=plan.dtypes[name], device=self.device)
            out_shape = tuple(ctx.get_tensor_shape(DENOISER_OUTPUT))
            if any(d < 0 for d in out_shape):
                raise ManifestError(
                    f"{route.artifact}: output shape {out_shape} is unresolved; rebuild with "
                    f"`{self._rebuild}`"
                )
            buffers[DENOISER_OUTPUT] = torch.empty(
                out_shape, dtype=plan.dtypes[DENOISER_OUTPUT], device=self.device
            )
        for name, t in buffers.items():
            if not ctx.set_tensor_address(name, t.data_ptr()):
                raise BackendUnavailableError(f"TensorRT refused the address of {name} for {route}")
        entry = _Entry(plan, ctx, buffers)
        w.entries[(route.artifact, sig)] = entry
        return entry

    def _input_shapes(self, sig: Signature) -> dict[str, tuple[int, ...]]:
        return input_shapes(self._cfg, self._key_of[sig])

    # ------------------------------------------------------------------ the call

    def run(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:  # DENOISER_INPUTS -> [B, N + M, 64]
        sig = call_signature(inputs["hidden_states"], inputs["encoder_hidden_states"])
        route = route_for(self._table, sig, self.shape_keys or frozenset())
        with torch.cuda.device(self.device):
            plan = self._acquire_plan(route.artifact)
            try:
                w = self._pool.get()
                try:
                    return self._run(w, self._entry(w, plan, route, sig), inputs)
                finally:
                    self._return_worker(w)
            finally:
                self._release_plan(route.artifact)

    def _run(self, w: _Worker, entry: _Entry, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        caller = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(w.stream):
            w.stream.wait_stream(caller)  # inputs were produced on the caller's stream
            for name, t in inputs.items():
                buf = entry.buffers[name]
                if t.shape != buf.shape:
                    raise ShapeNotServedError(
                        f"{name} has shape {tuple(t.shape)}, the plan expects "
                        f"{tuple(buf.shape)} (another model's inputs?)"
                    )
                buf.copy_(t, non_blocking=True)
            if entry.graph is not None:
                entry.graph.replay()
            elif not entry.context.execute_async_v3(w.stream.cuda_stream):
                raise BackendUnavailableError(
                    f"TensorRT execution failed in {self.name}; see the TensorRT log"
                )
            out = entry.buffers[DENOISER_OUTPUT].clone()  # the static buffer is overwritten by the next call
        caller.wait_stream(w.stream)
        out.record_stream(caller)
        return out

    # ------------------------------------------------------------------ CUDA graphs (warmup only)

    def capture_graphs(self, key: ShapeKey) -> None:
        """On every worker: run `key` once eagerly, then capture its enqueue as a CUDA graph.

        Call before serving (KontextEngine.warmup does): it checks out every worker, and a capture
        synchronizes the device. A shape whose capture fails keeps running eagerly (logged).
        """
        sig = key_signature(key)
        route = route_for(self._table, sig, self.shape_keys or frozenset())
        with torch.cuda.device(self.device):
            inputs = dummy_inputs(self._cfg, self._key_of[sig], device=self.device)
            plan = self._acquire_plan(route.artifact)
            workers: list[_Worker] = []
            try:
                for _ in range(self._workers):
                    workers.append(self._pool.get())
                for w in workers:
                    entry = self._entry(w, plan, route, sig)
                    entry.graph = None
                    self._run(w, entry, inputs)  # warm enqueue first: lazy init stays out of the capture
                    w.stream.synchronize()
                    entry.graph = self._capture(w, entry, route)
            finally:
                for w in workers:
                    self._return_worker(w)
                self._release_plan(route.artifact)

    def _capture(self, w: _Worker, entry: _Entry, route: Route) -> torch.cuda.CUDAGraph | None:
        """A graph of one execute_async_v3 (static buffers, static addresses), or None: run eagerly.

        thread_local: other workers' allocations and syncs during this capture neither fail in their
        threads nor invalidate it (torch's default "global" mode errors on them). The enqueue's result
        is checked, as trtexec does: a plan may hold operations CUDA graphs cannot capture.
        """
        graph = torch.cuda.CUDAGraph()
        enqueued = False
        try:
            with torch.cuda.graph(graph, stream=w.stream, capture_error_mode="thread_local"):
                enqueued = bool(entry.context.execute_async_v3(w.stream.cuda_stream))
        except RuntimeError as e:
            log.warning(
                "CUDA graph capture of %s failed on worker %d (%s); it runs eagerly", route, w.index, e
            )
            return None
        if not enqueued:
            log.warning(
                "TensorRT could not enqueue %s inside a CUDA graph capture on worker %d; it runs eagerly",
                route,
                w.index,
            )
            return None
        return graph

    def close(self) -> None:
        """Free every plan, context, block and graph. The denoiser cannot be called afterwards."""
        with self._lock:
            for path in list(self._plans):
                self._budget.forget(path)
            self._plans.clear()
            for w in self._idle_workers():
                w.entries.clear()
                w.block = None
                self._pool.put(w)
        torch.cuda.empty_cache()


def load_tensorrt(
    manifest: Manifest, build_dir: Path, *, weights_id: str, options: LoadOptions
) -> TrtDenoiser:
    """The manifest's TensorRT plans of one precision, checked against the manifest and this machine."""
    device = torch.device(options.device or "cuda")
    if device.type != "cuda":
        raise ConfigError(f"TensorRT runs on a CUDA device, not {device}; load with device='cuda'")
    precision = select_artifact(manifest, build_dir, BACKEND, options.precision).precision
    artifacts = [a for a in manifest.artifacts if a.backend == BACKEND and a.precision == precision]
    machine = machine_facts(weights_id, device)
    fix = rebuild_command(manifest, build_dir, precision)
    for a in artifacts:  # the plan's name says what it was built for: refuse early, before hashing
        name = parse_plan_name(a.path)
        why = name.mismatch(machine.backend_version, machine.gpu or "") if name is not None else None
        if why is not None:
            raise ManifestError(f"{a.path}: {why}; rebuild with `{fix}`")
    plans = [(a, check_manifest(manifest, build_dir, a, machine)) for a in artifacts]
    return TrtDenoiser(
        plans,
        transformer=manifest.transformer_config(),
        device=str(device),
        workers=options.workers,
        plan_memory_budget=options.plan_memory_budget,
        rebuild=fix,
    )
