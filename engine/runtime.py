"""The embeddable API: load(build dir | preset | path) -> KontextEngine with edit(), warmup(), close().

Thread safety: a KontextEngine holds `workers` workers (default 1). Each edit checks one out for
its whole duration and returns it after; other threads wait. A worker has its own tokenizers (fast
tokenizers are not safe to share across threads) and shares the read-only modules (text encoders,
VAE, transformer) and the denoiser. Denoisers are safe to call concurrently: ONNX Runtime's
session.run is thread-safe (one IOBinding per call); torch forward under inference_mode mutates
nothing; TensorRT keeps a context per (plan, shape key, worker) and checks a worker out per call.
So concurrent edits give exactly the results of the same edits run one by one.

(Over 400 lines: the engine and its loader, resolve() then assemble(), read best together; output
writing is outputs.OutputWriter, the request is request.EditRequest.)
"""

from __future__ import annotations

import copy
import logging
import queue
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, overload

import torch
from PIL import Image

from .backends import BACKENDS, Denoiser, GraphCapturing
from .backends.inputs import dummy_inputs
from .backends.torch import TorchDenoiser, default_dtype, torch_denoiser
from .backends.torch_options import TORCH_MODES, TorchOptions
from .buckets import ShapeKey, family_shape_keys
from .caching import CacheSpec, parse_cache_spec, refuse_unsplit
from .config import DEFAULT_STEPS, PRESETS, LoadOptions, is_synthetic
from .dispatch import MISS_POLICIES, Dispatcher, DispatchStats, served_buckets
from .distributed import check_context_parallel, context_parallel_denoiser
from .errors import BackendUnavailableError, ConfigError
from .images import load_image
from .manifest import MANIFEST_NAME, Manifest, read_manifest, rebuild_command
from .model.checkpoints import local_preset
from .model.components import Components
from .model.load import load_components
from .model.lora import LoraSpec, fuse_loras
from .outputs import OutputWriter
from .pipeline import EditResult, KontextPipeline, combine_results
from .prompt_cache import PromptCache
from .request import EditRequest, EncodedImage, ImageInput

if TYPE_CHECKING:
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
        cache: the step cache of every edit whose request names none (None: off)."""
        if workers < 1:
            raise ConfigError(f"workers must be at least 1, got {workers}")
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
        self._pool: queue.Queue[Components] = queue.Queue()
        for _ in range(workers):  # each worker: the shared modules, its own tokenizers
            self._pool.put(
                replace(
                    components,
                    tokenizer=copy.deepcopy(components.tokenizer),
                    tokenizer_2=copy.deepcopy(components.tokenizer_2),
                )
            )
        self._closed = False

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
        """
        self._check_open()
        if isinstance(request, EditRequest):
            if prompt is not None or knobs:
                raise ConfigError("pass an EditRequest alone, or an image, a prompt and keywords; not both")
        elif prompt is None:
            raise ConfigError("engine.edit(image, prompt, ...) needs a prompt, or pass an EditRequest")
        else:
            request = EditRequest.of(request, prompt, **knobs)
        request = request.resolved(self.default_steps)
        if request.cache is None and self.cache is not None:
            request = replace(request, cache=self.cache)  # the engine's default step cache
        # safety: before any encoder, transformer or VAE work
        self.safety.check_request(request.prompt, request.input_images)
        key = request.shape_key(self.family, self.components.preset.max_sequence_length)
        # One batch where the engine serves it (torch serves any); else one seed at a time at batch 1.
        batched = request.num_images == 1 or self.dispatcher.serves(key)
        denoiser = self.dispatcher.resolve(key if batched else replace(key, batch=1))  # may raise a miss
        t0 = time.perf_counter()
        worker = self._pool.get()
        try:
            waited = time.perf_counter() - t0
            pipe = KontextPipeline(
                worker,
                denoiser,
                device=self.device,
                dtype=self.dtype,
                bucket_family=self.family,
                prompt_cache=self.prompt_cache,
            )
            if batched:
                result = pipe.edit(request, progress=progress)
            else:
                singles = [replace(request, seed=seed, num_images=1) for seed in request.seeds]
                result = combine_results([pipe.edit(r, progress=progress) for r in singles])
        finally:
            self._pool.put(worker)
        result.timings["queue"] = waited
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


def is_build_dir(source: str | Path) -> bool:
    return (Path(source) / MANIFEST_NAME).is_file()


def default_steps(source: str | Path) -> int:
    """The steps an edit runs when it names none, for a build folder, a preset or local weights, known
    before loading: the model's preset's `default_steps` (SYNTHETIC_STEPS on tiny and small,
    DEFAULT_STEPS on full and the real model). The one rule behind `kontext edit`, `kontext serve`,
    `kontext bench` and a loaded engine's `default_steps`."""
    model = read_manifest(Path(source)).model if is_build_dir(source) else str(source)
    if model in PRESETS:
        return PRESETS[model].default_steps
    folder = Path(model)
    return local_preset(folder).default_steps if folder.is_dir() else DEFAULT_STEPS


@dataclass(frozen=True)
class Resolved:
    """What a load decides before any weights: the model, the build (if any), backend, device, dtype."""

    model: str  # preset name or local path (a build's: its manifest's)
    options: LoadOptions  # backend and device filled in
    dtype: torch.dtype
    build_dir: Path | None = None
    manifest: Manifest | None = None

    @property
    def device(self) -> str:
        return self.options.device or "cpu"


def resolve(source: str | Path, opts: LoadOptions) -> Resolved:
    """Check the options and decide the backend (the build's, or torch), device (cuda for TensorRT or
    when torch sees a GPU) and dtype, before loading anything."""
    if opts.backend is not None and opts.backend not in BACKENDS:
        raise ConfigError(f"backend must be one of {', '.join(BACKENDS)}, got {opts.backend!r}")
    if opts.torch_mode not in TORCH_MODES:
        raise ConfigError(f"torch_mode must be one of {', '.join(TORCH_MODES)}, got {opts.torch_mode!r}")
    if opts.miss_policy not in MISS_POLICIES:
        raise ConfigError(f"miss_policy must be one of {', '.join(MISS_POLICIES)}, got {opts.miss_policy!r}")
    build_dir = Path(source) if is_build_dir(source) else None
    manifest = read_manifest(build_dir) if build_dir is not None else None
    backend = opts.backend or (manifest.backend if manifest is not None else "torch")
    if manifest is None and backend != "torch":
        raise ConfigError(
            f"backend {backend!r} runs built artifacts: pass a build folder (with {MANIFEST_NAME}), "
            f"made by `kontext build --model {source}`"
        )
    device = opts.device or ("cuda" if backend == "tensorrt" or torch.cuda.is_available() else "cpu")
    if backend == "tensorrt":
        from .backends.tensorrt_plans import require_tensorrt

        require_tensorrt()  # before loading anything onto a GPU that may not exist
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BackendUnavailableError(f"device {device!r} asked for, but torch sees no CUDA device; use cpu")
    if opts.dtype is not None and backend != "torch":
        raise ConfigError(
            f"dtype={opts.dtype!r} sets the torch path's weights; a {backend} build has its own"
        )
    if opts.context_parallel > 1 and backend != "torch":
        check_context_parallel(opts.context_parallel, backend=backend)  # refuses, naming the fix
    if backend == "onnxruntime":
        dtype = torch.float32  # ORT: fp32 encoders
    else:
        dtype = (
            torch.bfloat16 if opts.dtype == "bf16" else torch.float32 if opts.dtype else default_dtype(device)
        )
    model = manifest.model if manifest is not None else str(source)
    return Resolved(model, replace(opts, backend=backend, device=device), dtype, build_dir, manifest)


def assemble(r: Resolved, components: Components, torch_options: TorchOptions | None) -> Dispatcher:
    """The dispatcher over the resolved backend: the build's artifacts (with the torch fallback when the
    miss policy asks for it), or the torch denoiser over `components`."""
    opts = r.options
    fallback = None
    if opts.miss_policy == "torch" and opts.backend != "torch":
        fallback = TorchDenoiser(components.transformer, name="torch-eager-fallback")
    if r.manifest is None or r.build_dir is None:
        primary: Denoiser
        if opts.context_parallel > 1:  # the workers get the plain transformer; rank 0 a weight-sharing copy
            primary = context_parallel_denoiser(
                components.transformer, opts.context_parallel, mode=opts.torch_mode, options=torch_options
            )
        else:
            primary = _torch_denoiser(components, opts.torch_mode, torch_options, r.device, r.dtype)
        family, hint = components.preset.bucket_family, f"`kontext build --model {r.model}`"
    else:
        primary = load_artifacts(r.manifest, r.build_dir, weights_id=components.weights_id, options=opts)
        family, hint = r.manifest.family, f"`{rebuild_command(r.manifest, r.build_dir)}`"
    return Dispatcher(primary, family=family, policy=opts.miss_policy, fallback=fallback, rebuild_hint=hint)


def load(
    source: str | Path,
    *,
    options: LoadOptions | None = None,
    backend: str | None = None,
    precision: str | None = None,
    device: str | None = None,
    miss_policy: str = "error",
    workers: int = 1,
    threads: int | None = None,
    torch_mode: str = "eager",
    torch_options: TorchOptions | None = None,
    plan_memory_budget: int | None = None,
    dtype: str | None = None,
    context_parallel: int = 1,
    cache: str | None = None,
    safety: SafetyPolicy | str | None = None,
    signer: ProvenanceSigner | None = None,
    loras: Sequence[LoraSpec | str] = (),
) -> KontextEngine:
    """Load an engine from a build folder (its manifest decides the model and backend), or a preset
    name / local weights path (the torch backend): resolve(), the weights, then assemble().

    Either pass `options` (a LoadOptions), or its fields as keywords; config.LoadOptions documents them.

    safety: a SafetyPolicy (engine.safety.build_policy), or "off" / "review"; None: off for the random
    presets, review for the real model (its licence asks for filters or human review). signer: a
    provenance.ProvenanceSigner; outputs.save then C2PA-signs every output. torch_options: the torch
    path's levers (backends.torch_options.TorchOptions). These are objects, not options, so they are keywords
    beside `options`. loras: LoRA files (LoraSpec, or "PATH[:SCALE]"), fused into the transformer at
    load; they change weights_id.
    """
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
    components = load_components(r.model, dtype=r.dtype, device=r.device)
    if loras:
        components = fuse_loras(components, [LoraSpec.parse(x) if isinstance(x, str) else x for x in loras])
    if r.options.backend == "torch" and torch_options is not None and torch_options.compile_vae:
        from .backends.torch import compile_vae

        components = replace(components, vae=compile_vae(components.vae))
    dispatcher = assemble(r, components, torch_options)
    log.info(
        "loaded %s (%s on %s, %d worker(s))", r.model, dispatcher.primary.name, r.device, r.options.workers
    )
    return KontextEngine(
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


def _torch_denoiser(
    components: Components, mode: str, options: TorchOptions | None, device: str, dtype: torch.dtype
) -> Denoiser:
    """The torch backend over the components' transformer (changed in place: FP8, fused QKV...); static
    FP8 scales are calibrated first, on the build's calibration edits."""
    amax = None
    if mode == "fp8" and options is not None and options.fp8_scales == "static":
        from .calibration import calibrate_amax

        amax = calibrate_amax(components, device=device, dtype=dtype)
    return torch_denoiser(
        components.transformer, mode=mode, device=device, dtype=dtype, options=options, amax=amax
    )


def load_artifacts(manifest: Manifest, build_dir: Path, *, weights_id: str, options: LoadOptions) -> Denoiser:
    """The Denoiser of one precision of a build (`options.backend`, default the build's), through its
    backend's loader, which refuses a manifest that does not match these weights, this backend
    version or this GPU."""
    backend = options.backend or manifest.backend
    if backend == "onnxruntime":
        from .backends.onnxruntime import load_onnxruntime

        return load_onnxruntime(manifest, build_dir, weights_id=weights_id, options=options)
    if backend == "tensorrt":
        from .backends.tensorrt import load_tensorrt

        return load_tensorrt(manifest, build_dir, weights_id=weights_id, options=options)
    raise BackendUnavailableError(
        f"{build_dir}: no loader for backend {backend!r}; use onnxruntime or tensorrt"
    )
