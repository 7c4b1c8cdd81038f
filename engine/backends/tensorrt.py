"""TensorRT backend: plans deserialized once, a context per (profile, worker), CUDA graphs per shape key.

Each worker owns a CUDA stream and one device-memory block sized for the largest profile it
runs; its contexts (one per profile, user-managed allocation) share that block, so a worker runs
one call at a time. Threads check a worker out per call: `workers` calls run at once, the others
wait. Torch tensors are the I/O buffers (set_tensor_address; execute_async_v3 on the worker's
stream); after `graph_after` eager runs of a shape, a CUDA graph is captured and replayed. Plans of
other bucket families load on first use and are freed least-recently-used under a byte budget.
CUDA is checked before any TensorRT call: deserializing without a GPU segfaults.
"""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..buckets import ShapeKey
from ..build.manifest import Artifact, Manifest
from ..errors import BackendUnavailableError, ManifestError
from . import DENOISER_INPUTS, DENOISER_OUTPUT, call_signature, named_inputs
from .artifacts import MachineFacts, check_manifest, rebuild_command, select_artifact
from .tensorrt_plans import (
    BACKEND,
    PlanBudget,
    Route,
    device_memory_block,
    parse_plan_name,
    profile_table,
    route_for,
)

if TYPE_CHECKING:
    import tensorrt as trt

log = logging.getLogger(__name__)


def require_tensorrt() -> None:
    """Check CUDA, then that a full TensorRT imports. Call before any TensorRT call: without a GPU,
    deserializing segfaults."""
    if not torch.cuda.is_available():
        raise BackendUnavailableError(
            "the TensorRT backend needs a CUDA GPU, and torch sees none; use backend='onnxruntime' "
            "(built by `kontext build`) on this machine"
        )
    try:
        import tensorrt
    except ImportError as e:
        raise BackendUnavailableError("tensorrt is not installed; `pip install 'kontext-engine[trt]'`") from e
    if not hasattr(tensorrt, "Runtime"):  # type stubs only, or tensorrt-lean without a full runtime
        raise BackendUnavailableError(
            "this tensorrt package has no Runtime (stubs only?); install tensorrt>=10"
        )


def machine_facts(weights_id: str, device: torch.device) -> MachineFacts:
    require_tensorrt()
    import tensorrt as trt

    major, minor = torch.cuda.get_device_capability(device)
    return MachineFacts(weights_id, trt.__version__, torch.cuda.get_device_name(device), f"{major}.{minor}")


def _torch_dtype(dt: trt.DataType) -> torch.dtype:
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


@dataclass
class _Worker:
    """What one concurrent caller uses: a stream, a device-memory block, and per-shape state."""

    index: int
    stream: torch.cuda.Stream
    block: torch.Tensor | None = None  # uint8 device memory shared by this worker's contexts
    contexts: dict[tuple[str, int], trt.IExecutionContext] = field(
        default_factory=dict
    )  # (plan, profile) -> context
    buffers: dict[tuple[str, int], dict[str, torch.Tensor]] = field(default_factory=dict)  # static I/O
    runs: dict[tuple[str, int], int] = field(default_factory=dict)
    graphs: dict[tuple[str, int], torch.cuda.CUDAGraph] = field(default_factory=dict)


class _Plan:
    """One deserialized engine and its I/O description."""

    def __init__(self, runtime: trt.Runtime, path: Path) -> None:
        engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            raise ManifestError(
                f"TensorRT could not deserialize {path} (version or GPU mismatch); "
                "rebuild with `kontext build --force`"
            )
        self.engine: trt.ICudaEngine = engine
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.dtypes = {n: _torch_dtype(self.engine.get_tensor_dtype(n)) for n in names}
        self.memory = {
            p: int(self.engine.get_device_memory_size_for_profile_v2(p))
            for p in range(self.engine.num_optimization_profiles)
        }
        missing = set(DENOISER_INPUTS) - set(names)
        if missing or DENOISER_OUTPUT not in names:
            raise ManifestError(
                f"{path} lacks I/O tensors {sorted(missing)}; rebuild with `kontext build --force`"
            )


class TrtDenoiser:
    """A Denoiser over the manifest's TensorRT plans of one precision. Serves the manifest's keys only."""

    def __init__(
        self,
        manifest: Manifest,
        build_dir: Path,
        *,
        weights_id: str,
        precision: str | None = None,
        device: str = "cuda",
        workers: int = 1,
        plan_memory_budget: int | None = None,
        graph_after: int = 1,
        verify_sha256: bool = True,
    ) -> None:
        self.device = torch.device(device)
        require_tensorrt()  # CUDA checked before anything touches TensorRT
        import tensorrt as trt

        self.precision = select_artifact(manifest, BACKEND, precision).precision
        artifacts = tuple(
            a for a in manifest.artifacts if a.backend == BACKEND and a.precision == self.precision
        )
        machine = machine_facts(weights_id, self.device)
        for a in artifacts:  # the plan's name says what it was built for: refuse early, before hashing
            name = parse_plan_name(a.path)
            why = name.mismatch(machine.backend_version, machine.gpu or "") if name is not None else None
            if why is not None:
                raise ManifestError(f"{a.path}: {why}; rebuild with `{rebuild_command(manifest, build_dir)}`")
        self._paths = {
            a.path: check_manifest(manifest, build_dir, a, machine, verify_sha256=verify_sha256)
            for a in artifacts
        }
        self._artifacts: dict[str, Artifact] = {a.path: a for a in artifacts}
        self._keys = frozenset(k for a in artifacts for k in a.shape_keys())
        self.shape_keys: frozenset[ShapeKey] | None = self._keys  # the Denoiser contract's type
        self._table = profile_table(artifacts)
        self.name = f"tensorrt-{self.precision}"
        self._graph_after = graph_after
        self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        total = torch.cuda.get_device_properties(self.device).total_memory
        self._budget = PlanBudget(plan_memory_budget or int(total * 0.8))
        self._plans: dict[str, _Plan] = {}
        self._lock = threading.Lock()  # guards _plans, _budget and block growth
        self._pool: queue.Queue[_Worker] = queue.Queue()
        for i in range(workers):
            self._pool.put(_Worker(i, torch.cuda.Stream(self.device)))
        self._workers = workers
        log.info(
            "TensorRT %s: %d plan(s), %d shape keys, %d worker(s)",
            trt.__version__,
            len(artifacts),
            len(self._keys),
            workers,
        )

    # ------------------------------------------------------------------ plans under the budget

    def _acquire_plan(self, path: str) -> _Plan:
        with self._lock:
            for old in self._budget.admit(path, self._artifacts[path].bytes):
                self._free_plan(old)
            self._budget.pin(path)
            if path not in self._plans:
                log.info("deserializing %s", self._paths[path])
                self._plans[path] = _Plan(self._runtime, self._paths[path])
            return self._plans[path]

    def _release_plan(self, path: str) -> None:
        with self._lock:
            self._budget.unpin(path)

    def _free_plan(self, path: str) -> None:
        """Drop a plan and every worker's contexts, buffers and graphs of it (caller holds the lock)."""
        log.info("freeing %s (plan memory budget)", path)
        for w in list(self._pool.queue):  # idle workers only hold no running context of an unpinned plan
            for d in (w.contexts, w.buffers, w.runs, w.graphs):
                for k in [k for k in d if k[0] == path]:
                    del d[k]
        self._plans.pop(path, None)

    # ------------------------------------------------------------------ contexts and buffers

    def _context(self, w: _Worker, plan: _Plan, route: Route) -> trt.IExecutionContext:
        key = (route.artifact, route.profile)
        if key in w.contexts:
            return w.contexts[key]
        need = device_memory_block(plan.memory)
        if w.block is None or w.block.numel() < need:
            w.block = torch.empty(need, dtype=torch.uint8, device=self.device)
            for ctx in w.contexts.values():  # re-point every context of this worker at the new block
                ctx.set_device_memory(w.block.data_ptr(), w.block.numel())
            w.graphs.clear()  # graphs captured the old addresses
        import tensorrt as trt

        strategy = trt.ExecutionContextAllocationStrategy.USER_MANAGED
        ctx = plan.engine.create_execution_context(strategy)
        ctx.set_device_memory(w.block.data_ptr(), w.block.numel())
        ctx.set_optimization_profile_async(route.profile, w.stream.cuda_stream)
        w.contexts[key] = ctx
        return ctx

    def _buffers(
        self,
        w: _Worker,
        plan: _Plan,
        route: Route,
        ctx: trt.IExecutionContext,
        inputs: dict[str, torch.Tensor],
    ) -> dict[str, torch.Tensor]:
        """Static I/O tensors of this (plan, profile) on this worker, allocated once per shape."""
        key = (route.artifact, route.profile)
        bufs = w.buffers.get(key)
        if bufs is not None and all(bufs[n].shape == t.shape for n, t in inputs.items()):
            return bufs
        bufs = {}
        for name, t in inputs.items():
            bufs[name] = torch.empty(t.shape, dtype=plan.dtypes[name], device=self.device)
            ctx.set_input_shape(name, tuple(t.shape))
        out_shape = tuple(ctx.get_tensor_shape(DENOISER_OUTPUT))
        bufs[DENOISER_OUTPUT] = torch.empty(out_shape, dtype=plan.dtypes[DENOISER_OUTPUT], device=self.device)
        for name, t in bufs.items():
            ctx.set_tensor_address(name, t.data_ptr())
        w.buffers[key], w.runs[key] = bufs, 0
        w.graphs.pop(key, None)
        return bufs

    # ------------------------------------------------------------------ the call

    def __call__(
        self,
        hidden_states: torch.Tensor,  # [B, N + M, 64]
        img_ids: torch.Tensor,  # [N + M, 3]
        encoder_hidden_states: torch.Tensor,  # [B, L, D_txt]
        txt_ids: torch.Tensor,  # [L, 3]
        pooled_projections: torch.Tensor,  # [B, D_pooled]
        timestep: torch.Tensor,  # [B]
        guidance: torch.Tensor,  # [B]
    ) -> torch.Tensor:  # [B, N + M, 64]
        route = route_for(self._table, call_signature(hidden_states, encoder_hidden_states), self._keys)
        inputs = named_inputs(
            hidden_states, img_ids, encoder_hidden_states, txt_ids, pooled_projections, timestep, guidance
        )
        plan = self._acquire_plan(route.artifact)
        w = self._pool.get()
        try:
            return self._run(w, plan, route, inputs)
        finally:
            self._pool.put(w)
            self._release_plan(route.artifact)

    def _run(self, w: _Worker, plan: _Plan, route: Route, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        key = (route.artifact, route.profile)
        caller = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(w.stream):
            w.stream.wait_stream(caller)  # inputs were produced on the caller's stream
            with self._lock:
                ctx = self._context(w, plan, route)
            bufs = self._buffers(w, plan, route, ctx, inputs)
            for name, t in inputs.items():
                bufs[name].copy_(t, non_blocking=True)
            graph = w.graphs.get(key)
            if graph is not None:
                graph.replay()
            else:
                if not ctx.execute_async_v3(w.stream.cuda_stream):
                    raise BackendUnavailableError(
                        f"TensorRT execution failed for {route}; see the TensorRT log"
                    )
                w.runs[key] += 1
                if self._graph_after and w.runs[key] >= self._graph_after:
                    w.graphs[key] = self._capture(w, ctx)
            out = bufs[DENOISER_OUTPUT].clone()  # the static buffer is overwritten by the next call
        caller.wait_stream(w.stream)
        out.record_stream(caller)
        return out

    def _capture(self, w: _Worker, ctx: trt.IExecutionContext) -> torch.cuda.CUDAGraph:
        """Capture one execute_async_v3 of a warmed-up shape (static buffers, static addresses)."""
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=w.stream):
            ctx.execute_async_v3(w.stream.cuda_stream)
        return graph

    def close(self) -> None:
        """Free every plan, context, block and graph. The denoiser cannot be called afterwards."""
        with self._lock:
            for path in list(self._plans):
                self._budget.forget(path)
                self._free_plan(path)
            for w in list(self._pool.queue):
                w.block = None
        torch.cuda.empty_cache()


def load_tensorrt(
    manifest: Manifest,
    build_dir: Path,
    *,
    weights_id: str,
    precision: str | None = None,
    device: str = "cuda",
    workers: int = 1,
    plan_memory_budget: int | None = None,
    verify_sha256: bool = True,
) -> TrtDenoiser:
    return TrtDenoiser(
        manifest,
        build_dir,
        weights_id=weights_id,
        precision=precision,
        device=device,
        workers=workers,
        plan_memory_budget=plan_memory_budget,
        verify_sha256=verify_sha256,
    )
