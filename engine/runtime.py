"""The embeddable API: load(build dir | preset | path) -> KontextEngine with edit(), warmup(), close().

Thread safety: a KontextEngine holds `workers` workers (default 1), each a KontextPipeline. Each edit
checks one out for its whole duration and returns it after; other threads wait. A worker has its own
tokenizers (fast tokenizers are not safe to share across threads) and shares the read-only modules
(text encoders, VAE, transformer); the denoiser, chosen per edit by the dispatcher, is passed to it.
Denoisers are safe to call concurrently: ONNX Runtime's session.run is thread-safe (one IOBinding per
call); torch forward under inference_mode mutates nothing; TensorRT keeps a context per (plan, shape
key, worker) and checks a worker out per call. So concurrent edits give exactly the results of the
same edits run one by one.

What load() decides before the weights and builds after them is loading.py; output writing is
outputs.OutputWriter, the request is request.EditRequest.
"""

from __future__ import annotations

import copy
import logging
import queue
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, overload

import torch
from PIL import Image

from .backends import GraphCapturing
from .backends.inputs import dummy_inputs
from .backends.torch_options import TorchOptions
from .buckets import ShapeKey, family_shape_keys
from .caching import CacheSpec, parse_cache_spec, refuse_unsplit
from .config import LoadOptions, is_synthetic
from .dispatch import Dispatcher, DispatchStats, served_buckets
from .distributed import check_context_parallel
from .errors import BackendUnavailableError, ConfigError
from .images import load_image
from .loading import assemble, resolve
from .loading import is_build_dir as is_build_dir
from .loading import load_artifacts as load_artifacts
from .manifest import Manifest
from .model.components import Components
from .model.lora import LoraSpec, fuse_loras
from .outputs import OutputWriter
from .pipeline import EditResult, KontextPipeline, combine_results, plan_edit
from .prompt_cache import PromptCache
from .request import EditRequest, EncodedImage, ImageInput

if TYPE_CHECKING:
    from .memory import MemoryPlan
    from .provenance import ProvenanceSigner
    from .safety import SafetyPolicy
    from .session import Session

log = logging.getLogger(__name__)


class KontextEngine:
    """A loaded model and denoiser behind edit(). Use as a context manager, or call close()."""

    def __init__(
        self,
        components: Components,
        dispatcher: Dispatcher,
        *,
        device: str,
        dtype: torch.dtype,
        workers: int = 1,
        build_dir: Path | None = None,
        manifest: Manifest | None = None,
        safety: SafetyPolicy | None = None,
        signer: ProvenanceSigner | None = None,
        cache: CacheSpec | None = None,
    ) -> None:
        """safety: the content policy edit() applies (None: off); signer: C2PA signing for save();
        cache: the step cache of every edit whose request names none (None: off). workers:
        LoadOptions.workers (checked there)."""
        self.components = components
        self.dispatcher = dispatcher
        self.device = device
        self.dtype = dtype
        self.build_dir = build_dir
        self.manifest = manifest
        self.workers = workers
        self.prompt_cache = PromptCache()  # a repeated prompt skips T5 and CLIP (keyed by their weights)
        if safety is None:
            from .safety import SafetyPolicy

            safety = SafetyPolicy()
        self.safety = safety
        self.signer = signer
        self.cache = cache if cache is not None and cache.enabled else None
        self.outputs = OutputWriter(
            model=components.preset.name,  # "kontext-dev" for local weights: never a local path
            weights_id=components.weights_id,
            build=build_dir.name if build_dir is not None else None,  # the build's name, never its path
            signer=signer,
            review=safety.review,
        )
        self._pool: queue.Queue[KontextPipeline] = queue.Queue()
        for _ in range(workers):  # each worker: a pipeline over the shared modules, its own tokenizers
            own = replace(
                components,
                tokenizer=copy.deepcopy(components.tokenizer),
                tokenizer_2=copy.deepcopy(components.tokenizer_2),
            )
            self._pool.put(
                KontextPipeline(
                    own, device=device, dtype=dtype, bucket_family=self.family, prompt_cache=self.prompt_cache
                )
            )
        self._closed = False
        self.memory_plan: MemoryPlan | None = None  # set by load(vram=...): where each component lives

    # ------------------------------------------------------------------ what it serves

    @property
    def name(self) -> str:
        return self.dispatcher.primary.name

    @property
    def shape_keys(self) -> frozenset[ShapeKey] | None:
        """The engine's shape keys (None: any shape, e.g. torch)."""
        return self.dispatcher.shape_keys

    @property
    def family(self) -> str:
        return self.dispatcher.family

    @property
    def default_steps(self) -> int:
        """The steps of an edit that names none: the model's preset's (the value `default_steps(source)`
        gives before loading; 8 on tiny and small, 28 on full and the real model)."""
        return self.components.preset.default_steps

    def buckets(self, refs: int = 0) -> list[tuple[int, int]]:
        """The (w, h) buckets whose edits with `refs` reference images the engine serves (all of the
        family's for an any-shape engine)."""
        keys = self.shape_keys
        if keys is None:
            return served_buckets(frozenset(self._family_keys(refs)), self.family, refs)
        return served_buckets(keys, self.family, refs)

    def _family_keys(self, refs: int = 0) -> set[ShapeKey]:
        return set(family_shape_keys(self.family, self.components.preset.max_sequence_length, refs=refs))

    def stats(self) -> DispatchStats:
        return self.dispatcher.stats()

    # ------------------------------------------------------------------ edits

    @overload
    def edit(self, request: EditRequest, /, *, progress: bool = False) -> EditResult: ...

    @overload
    def edit(
        self, image: ImageInput | EncodedImage, prompt: str, /, *, progress: bool = False, **knobs: Any
    ) -> EditResult: ...

    def edit(
        self,
        request: EditRequest | ImageInput | EncodedImage,
        prompt: str | None = None,
        /,
        *,
        progress: bool = False,
        **knobs: Any,
    ) -> EditResult:
        """Run one edit: `engine.edit(EditRequest(...))`, the form servers use, or the shorthand
        `engine.edit(image, prompt, seed=..., steps=..., ...)`, which is `EditRequest.of(image, prompt,
        **knobs)` (image: a PIL image, a file path or its bytes, or a previous result's `encoded()`).
        Invalid values are refused (ConfigError) where the request is made. steps None: `default_steps`.

        references: up to 3 more images placed beside the input as `placement` says (references.py).
        num_images: seeds seed .. seed + N - 1, in one batch where the engine serves that batch size,
        else one after another; result.images has one image per seed. Returns the PIL image
        (result.image), the final latents and the seconds per stage (result.timings).

        Raises ModeratedError("request") when the safety policy flags the prompt or an input image
        (before any model runs), ModeratedError("content") when it flags an output (all are dropped).
        Under review (`self.safety.review`) the result is for a person to approve: outputs.save holds it.

        The steps and the shape key are decided here once (pipeline.plan_edit) and passed down: the
        denoiser is chosen for the key the result reports. result.timings["worker_wait"]: seconds this
        edit waited for a free worker.
        """
        self._check_open()
        if isinstance(request, EditRequest):
            if prompt is not None or knobs:
                raise ConfigError("pass an EditRequest alone, or an image, a prompt and keywords; not both")
        elif prompt is None:
            raise ConfigError("engine.edit(image, prompt, ...) needs a prompt, or pass an EditRequest")
        else:
            request = EditRequest.of(request, prompt, **knobs)
        request, key = plan_edit(request, self.components.preset, self.family)
        if request.cache is None and self.cache is not None:
            request = replace(request, cache=self.cache)  # the engine's default step cache
        # safety: before any encoder, transformer or VAE work
        self.safety.check_request(request.prompt, request.input_images)
        # One batch where the engine serves it (torch serves any); else one seed at a time at batch 1.
        batched = request.num_images == 1 or self.dispatcher.serves(key)
        run_key = key if batched else replace(key, batch=1)
        denoiser = self.dispatcher.resolve(run_key)  # may raise a miss
        t0 = time.perf_counter()
        pipe = self._pool.get()
        try:
            waited = time.perf_counter() - t0
            if batched:
                result = pipe.edit(request, denoiser=denoiser, key=run_key, progress=progress)
            else:
                singles = [replace(request, seed=seed, num_images=1) for seed in request.seeds]
                result = combine_results(
                    [pipe.edit(r, denoiser=denoiser, key=run_key, progress=progress) for r in singles]
                )
        finally:
            self._pool.put(pipe)
        result.timings["worker_wait"] = waited
        for out in result.images:  # safety: a flagged output is never returned, nor are its siblings
            self.safety.check_output(out)
        return result

    def session(self, image: ImageInput, *, reencode: bool = True) -> Session:
        """Successive edits of `image`: each session.edit(prompt, ...) edits the previous turn's output.
        reencode=False feeds the previous turn's final latents as the next context (no VAE round trip)."""
        from .session import Session

        self._check_open()
        return Session(
            self, image if isinstance(image, Image.Image) else load_image(image), reencode=reencode
        )

    def warmup(self, keys: frozenset[ShapeKey] | None = None) -> dict[str, float]:
        """Run every served shape key (default: all of them) through the denoiser, so lazy
        initialisation and compilation happen now, and (TensorRT) capture each key's CUDA graph on
        every worker: call it before serving, since a capture synchronizes the device. Seconds per key."""
        self._check_open()
        keys = keys or self.shape_keys or frozenset(self._family_keys())
        cfg = self.components.preset.transformer
        primary = self.dispatcher.primary
        out: dict[str, float] = {}
        for key in sorted(keys):
            t0 = time.perf_counter()
            with torch.inference_mode():
                if isinstance(primary, GraphCapturing):
                    primary.capture_graphs(key)  # an eager run, then the capture, on every worker
                else:
                    primary(**dummy_inputs(cfg, key, device=self.device, dtype=self.dtype))
            if self.device.startswith("cuda"):
                torch.cuda.synchronize()
            out[str(key)] = time.perf_counter() - t0
        log.info("warmed up %d shape keys in %.1fs", len(out), sum(out.values()))
        return out

    def save_compile_cache(self) -> Path | None:
        """Write the torch compile cache the engine was loaded with (TorchOptions.compile_cache), after
        its edits or warmup compiled what it runs; the path written, or None (no cache named, or not the
        torch path)."""
        from .backends.torch import TorchDenoiser

        primary = self.dispatcher.primary
        return primary.save_compile_cache() if isinstance(primary, TorchDenoiser) else None

    # ------------------------------------------------------------------ lifetime

    def _check_open(self) -> None:
        if self._closed:
            raise BackendUnavailableError("this engine is closed; load it again with engine.load(...)")

    def close(self) -> None:
        """Free the denoiser's sessions, plans and device memory. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for d in (self.dispatcher.primary, self.dispatcher.fallback):
            if d is not None:
                d.close()

    def __enter__(self) -> KontextEngine:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


_DEFAULTS = LoadOptions()  # load()'s keywords default to LoadOptions' own values


def load(
    source: str | Path,
    *,
    options: LoadOptions | None = None,
    backend: str | None = _DEFAULTS.backend,
    precision: str | None = _DEFAULTS.precision,
    device: str | None = _DEFAULTS.device,
    miss_policy: str = _DEFAULTS.miss_policy,
    workers: int = _DEFAULTS.workers,
    threads: int | None = _DEFAULTS.threads,
    torch_mode: str = _DEFAULTS.torch_mode,
    torch_options: TorchOptions | None = None,
    plan_memory_budget: int | None = _DEFAULTS.plan_memory_budget,
    dtype: str | None = _DEFAULTS.dtype,
    context_parallel: int = _DEFAULTS.context_parallel,
    cache: str | None = _DEFAULTS.cache,
    safety: SafetyPolicy | str | None = None,
    signer: ProvenanceSigner | None = None,
    loras: Sequence[LoraSpec | str] = (),
    vram: float | str | MemoryPlan | None = None,
) -> KontextEngine:
    """Load an engine from a build folder (its manifest decides the model and backend), or a preset
    name / local weights path (the torch backend): resolve(), the weights, then assemble().

    Either pass `options` (a LoadOptions), or its fields as keywords; config.LoadOptions documents them.

    safety: a SafetyPolicy (engine.safety.build_policy), or "off" / "review"; None: off for the random
    presets, review for the real model (its licence asks for filters or human review). signer: a
    provenance.ProvenanceSigner; outputs.save then C2PA-signs every output. torch_options: the torch
    path's levers (backends.torch_options.TorchOptions). These are objects, not options, so they are keywords
    beside `options`. loras: LoRA files (LoraSpec, or "PATH[:SCALE]"), fused into the transformer at
    load; they change weights_id. vram: GiB of the card or "auto" (LoadOptions.vram): the memory plan
    (engine/memory) is made before any weight is read, refused in one line when nothing fits, and
    applied after the load; a MemoryPlan object is applied as given (benchmarks, tests).
    """
    from .memory.plan import MemoryPlan

    given_plan = vram if isinstance(vram, MemoryPlan) else None
    keywords = LoadOptions(
        backend=backend,
        precision=precision,
        device=device,
        miss_policy=miss_policy,
        workers=workers,
        threads=threads,
        torch_mode=torch_mode,
        plan_memory_budget=plan_memory_budget,
        dtype=dtype,
        context_parallel=context_parallel,
        vram=None if isinstance(vram, MemoryPlan) else vram,
        cache=cache,
    )
    if options is not None and keywords != LoadOptions():
        raise ConfigError("pass the load options either as options=LoadOptions(...) or as keywords, not both")
    r = resolve(source, options or keywords)
    if r.options.context_parallel > 1:  # before any weights: one line for what cannot run split
        check_context_parallel(
            r.options.context_parallel, mode=r.options.torch_mode, options=torch_options, device=r.device
        )
    from .safety.policy import resolve_policy

    policy = resolve_policy(safety, synthetic=is_synthetic(r.model))  # before the weights: fail fast
    cache_spec = parse_cache_spec(r.options.cache)
    graphs = torch_options is not None and torch_options.cuda_graphs
    if r.options.backend != "torch" or r.options.context_parallel > 1 or graphs:  # one-piece forwards
        refuse_unsplit(cache_spec, f"{r.options.backend} (context_parallel={r.options.context_parallel})")
    from .memory.planning import plan_load

    plan = plan_load(r.model, r.options, torch_options, manifest=r.manifest, given=given_plan)  # or refuse
    from .memory.load import load_planned

    components = load_planned(r.model, plan, dtype=r.dtype, device=r.device)  # a checkpoint: host first
    if loras:
        components = fuse_loras(components, [LoraSpec.parse(x) if isinstance(x, str) else x for x in loras])
    if plan is not None and not plan.resident:  # TensorRT streams its own weights (load_tensorrt)
        from .memory.apply import apply_plan

        torch_path = r.options.backend == "torch"
        fp8 = r.options.torch_mode == "fp8"
        components, _ = apply_plan(components, plan, r.device, torchao_fp8=fp8, transformer_levers=torch_path)
    components, dispatcher = assemble(r, components, torch_options)
    log.info(
        "loaded %s (%s on %s, %d worker(s))", r.model, dispatcher.primary.name, r.device, r.options.workers
    )
    engine = KontextEngine(
        components,
        dispatcher,
        device=r.device,
        dtype=r.dtype,
        workers=r.options.workers,
        build_dir=r.build_dir,
        manifest=r.manifest,
        safety=policy,
        signer=signer,
        cache=cache_spec,
    )
    engine.memory_plan = plan
    return engine
