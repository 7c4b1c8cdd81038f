"""The embeddable API: load(build dir | preset | path) -> KontextEngine with edit(), warmup(), close().

Thread safety: a KontextEngine holds `workers` workers (default 1). Each edit checks one out for
its whole duration and returns it after; other threads wait. A worker has its own tokenizers (fast
tokenizers are not safe to share across threads) and shares the read-only modules (text encoders,
VAE, transformer) and the denoiser. Denoisers are safe to call concurrently: ONNX Runtime's
session.run is thread-safe (one IOBinding per call); torch forward under inference_mode mutates
nothing; TensorRT keeps a context per (plan, shape key, worker) and checks a worker out per call.
So concurrent edits give exactly the results of the same edits run one by one.
"""

from __future__ import annotations

import copy
import logging
import queue
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

import torch
from PIL import Image

from .backends import BACKENDS, Denoiser, GraphCapturing
from .backends.inputs import dummy_inputs
from .backends.torch import TorchDenoiser, default_dtype, torch_denoiser
from .backends.torch_options import TORCH_MODES, TorchOptions
from .buckets import ShapeKey, family_shape_keys
from .config import EditSettings, LoadOptions, is_synthetic
from .dispatch import MISS_POLICIES, Dispatcher, DispatchStats, edit_key, served_buckets
from .errors import BackendUnavailableError, ConfigError
from .lora import LoraSpec, fuse_loras
from .manifest import MANIFEST_NAME, Manifest, read_manifest, rebuild_command
from .pipeline import EditResult, EncodedImage, KontextPipeline, check_edit_inputs, combine_results
from .prompt_cache import PromptCache
from .references import DEFAULT_PLACEMENT
from .weights import Components, load_components

if TYPE_CHECKING:
    from .outputs import SavedOutput
    from .provenance import ProvenanceSigner
    from .safety import SafetyPolicy
    from .session import Session

ImageInput = Image.Image | str | Path  # a PIL image or a file path (decoded by images.load_image)

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
    ) -> None:
        """safety: the content policy edit() applies (None: off); signer: C2PA signing for save()."""
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

    def edit(
        self,
        image: ImageInput | EncodedImage,
        prompt: str,
        *,
        seed: int = 0,
        steps: int | None = None,
        guidance: float = 2.5,
        size: tuple[int, int] | None = None,
        references: Sequence[ImageInput] = (),
        placement: str = DEFAULT_PLACEMENT,
        num_images: int = 1,
        progress: bool = False,
    ) -> EditResult:
        """Edit `image` as `prompt` says. steps None: 28 (8 on synthetic presets). Returns the PIL image
        (result.image), the final latents and the timings in seconds (result.timings).

        references: up to 3 more images (character, style, object), placed beside the input as
        `placement` says (offset | index, see references.py). num_images: seeds seed .. seed + N - 1, in
        one batch where the engine serves that batch size, else one after another; result.images has one
        image per seed. image may be a previous result's `encoded()` latents (see session()).

        Raises ModeratedError("request") when the safety policy flags the prompt or the image (before any
        model runs), ModeratedError("content") when it flags the output (which is then dropped). Under
        review (`self.safety.review`) the result is for a person to approve: save() holds it.
        """
        self._check_open()
        if not isinstance(image, EncodedImage):
            image = _as_image(image)
        refs = [_as_image(r) for r in references]
        # safety: before any encoder, transformer or VAE work
        self.safety.check_request(prompt, [i for i in (image, *refs) if isinstance(i, Image.Image)])
        if steps is None:
            steps = self.components.preset.default_steps
        settings = EditSettings(steps=steps, guidance=guidance, seed=seed, size=size)
        check_edit_inputs(refs, placement, num_images)
        text_tokens = self.components.preset.max_sequence_length
        key = edit_key(image.size, size, self.family, text_tokens, [r.size for r in refs], num_images)
        # One batch where the engine serves it (torch serves any); else one seed at a time at batch 1.
        batched = num_images == 1 or self.dispatcher.serves(key)
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
                result = pipe.edit(
                    image, prompt, settings,
                    references=refs, placement=placement, num_images=num_images, progress=progress,
                )  # fmt: skip
            else:
                result = combine_results([
                    pipe.edit(image, prompt, replace(settings, seed=seed + i),
                              references=refs, placement=placement, progress=progress)
                    for i in range(num_images)
                ])  # fmt: skip
        finally:
            self._pool.put(worker)
        result.timings["queue"] = waited
        for out in result.images:  # safety: a flagged output is never returned, nor are its siblings
            self.safety.check_output(out)
        return result

    def save(
        self,
        result: EditResult,
        path: str | Path,
        *,
        index: int = 0,
        source: Image.Image | str | Path | bytes | None = None,
        prompt: str | None = None,
        seed: int | None = None,
        guidance: float | None = None,
        include_prompt: bool = True,
        review_dir: str | Path | None = None,
        extra: Mapping[str, str | None] | None = None,
    ) -> SavedOutput:
        """Write `result` to `path` (.png or .jpg) with its metadata and AI disclosure, C2PA-signed when
        this engine has a signer (source: the input image, the manifest's parent ingredient). Under the
        review policy the file goes to `review_dir` (default: `review/` beside `path`), not to `path`.
        include_prompt: write the prompt into the file (prompts can be private). index: which of
        result.images (num_images > 1); seed defaults to its seed. extra: more text items (None: left out).
        """
        from .outputs import save_output
        from .safety.review import default_review_dir

        meta = self.output_metadata(
            result, index=index, source=source, prompt=prompt, seed=seed, guidance=guidance,
            include_prompt=include_prompt, extra=extra,
        )  # fmt: skip
        parent = _encoded(source) if self.signer is not None and source is not None else None
        held = (review_dir or default_review_dir(path)) if self.safety.review else None
        return save_output(
            result.images[index], path, meta, parent=parent, signer=self.signer, review_dir=held
        )

    def encode(
        self,
        result: EditResult,
        fmt: str = "PNG",
        *,
        index: int = 0,
        source: bytes | None = None,
        include_prompt: bool = False,
        prompt: str | None = None,
        guidance: float | None = None,
    ) -> bytes:
        """Image `index` of `result` as PNG or JPEG bytes with the same metadata, AI disclosure and C2PA
        signature as save() (source: the input file's bytes, the parent ingredient), for callers that
        send bytes rather than write files (the server). The prompt is left out unless asked for."""
        from .outputs import encode_output

        meta = self.output_metadata(result, index=index, prompt=prompt, guidance=guidance,
                                    include_prompt=include_prompt)  # fmt: skip
        parent = source if self.signer is not None else None
        return encode_output(result.images[index], fmt, meta, parent=parent, signer=self.signer)

    def output_metadata(
        self,
        result: EditResult,
        *,
        index: int = 0,
        source: Image.Image | str | Path | bytes | None = None,
        prompt: str | None = None,
        seed: int | None = None,
        guidance: float | None = None,
        include_prompt: bool = True,
        extra: Mapping[str, str | None] | None = None,
    ) -> dict[str, str]:
        """The text metadata of one output image: disclosure, model, weights, seed, steps, backend..."""
        from .outputs import output_metadata

        c = self.components
        return output_metadata(
            c.preset.name,  # "kontext-dev" for local weights: a file must not reveal a local path
            prompt=prompt,
            include_prompt=include_prompt,
            seed=seed if seed is not None else result.seeds[index],
            steps=len(result.step_times),
            guidance=guidance,
            weights=c.weights_id,
            backend=result.backend,
            size=f"{result.size[0]}x{result.size[1]}",
            engine=self.build_dir,
            source_image=Path(source).name if isinstance(source, (str, Path)) else None,
            **(extra or {}),
        )

    def session(self, image: ImageInput, *, reencode: bool = True) -> Session:
        """Successive edits of `image`: each session.edit(prompt, ...) edits the previous turn's output.
        reencode=False feeds the previous turn's final latents as the next context (no VAE round trip)."""
        from .session import Session

        self._check_open()
        return Session(self, _as_image(image), reencode=reencode)

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
            close = getattr(d, "close", None)
            if close is not None:
                close()

    def __enter__(self) -> KontextEngine:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _as_image(image: ImageInput) -> Image.Image:
    if isinstance(image, Image.Image):
        return image
    from .images import load_image

    return load_image(Path(image))


def is_build_dir(source: str | Path) -> bool:
    return (Path(source) / MANIFEST_NAME).is_file()


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
    safety: SafetyPolicy | str | None = None,
    signer: ProvenanceSigner | None = None,
    loras: Sequence[LoraSpec | str] = (),
) -> KontextEngine:
    """Load an engine from a build folder (its manifest decides the model and backend), or a preset
    name / local weights path (the torch backend).

    Either pass `options` (a LoadOptions), or its fields as keywords; config.LoadOptions documents them.

    safety: a SafetyPolicy (engine.safety.build_policy), or "off" / "review"; None: off for the random
    presets, review for the real model (its licence asks for filters or human review). signer: a
    provenance.ProvenanceSigner; save() then C2PA-signs every output. torch_options: the torch path's
    levers (backends.torch.TorchOptions). These are objects, not options, so they are keywords beside
    `options`. loras: LoRA files (LoraSpec, or "PATH[:SCALE]"), fused into the transformer at load;
    they change weights_id.
    """
    keywords = LoadOptions(backend=backend, precision=precision, device=device, miss_policy=miss_policy,
                           workers=workers, threads=threads, torch_mode=torch_mode,
                           plan_memory_budget=plan_memory_budget)  # fmt: skip
    if options is not None and keywords != LoadOptions():
        raise ConfigError("pass the load options either as options=LoadOptions(...) or as keywords, not both")
    opts = options or keywords
    if opts.backend is not None and opts.backend not in BACKENDS:
        raise ConfigError(f"backend must be one of {', '.join(BACKENDS)}, got {opts.backend!r}")
    if opts.torch_mode not in TORCH_MODES:
        raise ConfigError(f"torch_mode must be one of {', '.join(TORCH_MODES)}, got {opts.torch_mode!r}")
    if opts.miss_policy not in MISS_POLICIES:
        raise ConfigError(f"miss_policy must be one of {', '.join(MISS_POLICIES)}, got {opts.miss_policy!r}")
    build_dir = Path(source) if is_build_dir(source) else None
    manifest = read_manifest(build_dir) if build_dir is not None else None
    chosen = opts.backend or (manifest.backend if manifest is not None else "torch")
    if manifest is None and chosen != "torch":
        raise ConfigError(
            f"backend {chosen!r} runs built artifacts: pass a build folder (with {MANIFEST_NAME}), "
            f"made by `kontext build --model {source}`"
        )
    dev = opts.device or ("cuda" if chosen == "tensorrt" or torch.cuda.is_available() else "cpu")
    if chosen == "tensorrt":
        from .backends.tensorrt_plans import require_tensorrt

        require_tensorrt()  # before loading anything onto a GPU that may not exist
    if dev.startswith("cuda") and not torch.cuda.is_available():
        raise BackendUnavailableError(f"device {dev!r} asked for, but torch sees no CUDA device; use cpu")
    opts = replace(opts, backend=chosen, device=dev)
    dtype = (
        torch.float32 if chosen == "onnxruntime" else default_dtype(dev)
    )  # ORT: fp32 encoders feed the graph
    model = manifest.model if manifest is not None else str(source)
    from .safety.policy import resolve_policy

    policy = resolve_policy(safety, synthetic=is_synthetic(model))  # before the weights: fail fast
    components = load_components(model, dtype=dtype, device=dev)
    if loras:
        components = fuse_loras(components, [LoraSpec.parse(x) if isinstance(x, str) else x for x in loras])
    if chosen == "torch" and torch_options is not None and torch_options.compile_vae:
        from .backends.torch import compile_vae

        components = replace(components, vae=compile_vae(components.vae))
    fallback = None
    if opts.miss_policy == "torch" and chosen != "torch":
        fallback = TorchDenoiser(components.transformer, name="torch-eager-fallback")
    if manifest is None or build_dir is None:
        primary: Denoiser = _torch_denoiser(components, opts.torch_mode, torch_options, dev, dtype)
        family, hint = components.preset.bucket_family, f"`kontext build --model {model}`"
    else:
        primary = load_artifacts(manifest, build_dir, weights_id=components.weights_id, options=opts)
        family = manifest.family
        hint = f"`{rebuild_command(manifest, build_dir)}`"
    dispatcher = Dispatcher(
        primary, family=family, policy=opts.miss_policy, fallback=fallback, rebuild_hint=hint
    )
    log.info("loaded %s (%s on %s, %d worker(s))", model, primary.name, dev, opts.workers)
    return KontextEngine(
        components,
        dispatcher,
        device=dev,
        dtype=dtype,
        workers=opts.workers,
        build_dir=build_dir,
        manifest=manifest,
        safety=policy,
        signer=signer,
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


def _encoded(source: Image.Image | str | Path | bytes) -> bytes:
    """The input image's bytes for the C2PA ingredient: the file as given, or a PIL image as PNG."""
    if isinstance(source, Image.Image):
        import io

        buf = io.BytesIO()
        source.save(buf, format="PNG")
        return buf.getvalue()
    return bytes(source) if isinstance(source, (bytes, bytearray)) else Path(source).read_bytes()


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
