"""The embeddable API: load(build dir | preset | path) -> KontextEngine with edit(), warmup(), close().

Thread safety: a KontextEngine holds `workers` workers (default 1). Each edit checks one out for
its whole duration and returns it after; other threads wait. A worker has its own tokenizers (fast
tokenizers are not safe to share across threads) and shares the read-only modules (text encoders,
VAE, transformer) and the denoiser. Denoisers are safe to call concurrently: ONNX Runtime's
session.run is thread-safe (one IOBinding per call); torch forward under inference_mode mutates
nothing; TensorRT keeps a context per (profile, worker) and checks a worker out per call. So
concurrent edits give exactly the results of the same edits run one by one.
"""

from __future__ import annotations

import copy
import logging
import queue
import time
from dataclasses import replace
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
from PIL import Image

from .backends import BACKENDS, Denoiser
from .backends.torch import TORCH_MODES, TorchDenoiser, TorchOptions, default_dtype, torch_denoiser
from .buckets import ShapeKey
from .build.manifest import MANIFEST_NAME, Manifest, read_manifest
from .config import EditSettings
from .dispatch import Dispatcher, DispatchStats, edit_key, served_buckets
from .errors import BackendUnavailableError, ConfigError
from .pipeline import EditResult, KontextPipeline
from .prompt_cache import PromptCache
from .weights import Components, load_components

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
    ) -> None:
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
        return self.dispatcher.engine.name

    @property
    def shape_keys(self) -> frozenset[ShapeKey] | None:
        """The engine's shape keys (None: any shape, e.g. torch)."""
        return self.dispatcher.shape_keys

    @property
    def family(self) -> str:
        return self.dispatcher.family

    def buckets(self) -> list[tuple[int, int]]:
        """The (w, h) buckets whose edits the engine serves (all of the family's for an any-shape engine)."""
        keys = self.shape_keys
        if keys is None:
            return served_buckets(frozenset(self._family_keys()), self.family)
        return served_buckets(keys, self.family)

    def _family_keys(self) -> set[ShapeKey]:
        from .buckets import family_shape_keys

        return set(family_shape_keys(self.family, self.components.preset.max_sequence_length))

    def stats(self) -> DispatchStats:
        return self.dispatcher.stats()

    # ------------------------------------------------------------------ edits

    def edit(
        self,
        image: Image.Image | str | Path,
        prompt: str,
        *,
        seed: int = 0,
        steps: int | None = None,
        guidance: float = 2.5,
        size: tuple[int, int] | None = None,
        progress: bool = False,
    ) -> EditResult:
        """Edit `image` as `prompt` says. steps None: 28 (8 on synthetic presets). Returns the PIL image
        (result.image), the final latents and the timings in seconds (result.timings)."""
        self._check_open()
        if not isinstance(image, Image.Image):
            from .images import load_image

            image = load_image(Path(image))
        if steps is None:
            steps = self.components.preset.default_steps
        settings = EditSettings(steps=steps, guidance=guidance, seed=seed, size=size)
        key = edit_key(image.size, size, self.family, self.components.preset.max_sequence_length)
        denoiser = self.dispatcher.resolve(key)  # raises ShapeNotServedError under the error policy
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
            result = pipe.edit(image, prompt, settings, progress=progress)
        finally:
            self._pool.put(worker)
        result.timings["queue"] = waited
        return result

    def warmup(self, keys: frozenset[ShapeKey] | None = None) -> dict[str, float]:
        """Run every served shape key (default: all of them) through the denoiser on every worker, so
        lazy initialisation, compilation and CUDA-graph capture happen now. Seconds per key."""
        self._check_open()
        keys = keys or self.shape_keys or frozenset(self._family_keys())
        cfg = self.components.preset.transformer
        engine = self.dispatcher.engine
        out: dict[str, float] = {}
        for key in sorted(keys):
            b, n, l = key.batch, key.image_tokens, key.text_tokens  # noqa: E741
            args = (
                torch.zeros(b, n, cfg.in_channels, dtype=self.dtype, device=self.device),  # hidden_states
                torch.zeros(n, 3, device=self.device),  # img_ids
                torch.zeros(b, l, cfg.joint_attention_dim, dtype=self.dtype, device=self.device),
                torch.zeros(l, 3, device=self.device),  # txt_ids
                torch.zeros(b, cfg.pooled_projection_dim, dtype=self.dtype, device=self.device),
                torch.full((b,), 0.5, dtype=self.dtype, device=self.device),  # timestep
                torch.full((b,), 2.5, dtype=torch.float32, device=self.device),  # guidance
            )
            t0 = time.perf_counter()
            with torch.inference_mode():
                for _ in range(2 * self.workers):  # TensorRT: eager run, then graph capture, on each worker
                    engine(*args)
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
        for d in (self.dispatcher.engine, self.dispatcher.fallback):
            close = getattr(d, "close", None)
            if close is not None:
                close()

    def __enter__(self) -> KontextEngine:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def is_build_dir(source: str | Path) -> bool:
    return (Path(source) / MANIFEST_NAME).is_file()


def load(
    source: str | Path,
    *,
    backend: str | None = None,
    precision: str | None = None,
    device: str | None = None,
    miss_policy: str = "error",
    workers: int = 1,
    threads: int | None = None,
    torch_mode: str = "eager",
    torch_options: TorchOptions | None = None,
    plan_memory_budget: int | None = None,
    verify_sha256: bool = True,
) -> KontextEngine:
    """Load an engine from a build folder (its manifest decides the model and backend), or a preset
    name / local weights path (the torch backend).

    backend: torch | onnxruntime | tensorrt (default: the build's backend, or torch). precision: the
    build's artifact (default: the first listed). device: default cuda for TensorRT or when torch
    sees a GPU, else cpu. miss_policy: error | torch. workers: concurrent edits (see the module doc).
    threads: ONNX Runtime intra-op threads. torch_mode: eager | compile | fp8. torch_options: the torch
    path's levers (backends.torch.TorchOptions).
    """
    if backend is not None and backend not in BACKENDS:
        raise ConfigError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if torch_mode not in TORCH_MODES:
        raise ConfigError(f"torch_mode must be one of {', '.join(TORCH_MODES)}, got {torch_mode!r}")
    build_dir = Path(source) if is_build_dir(source) else None
    manifest = read_manifest(build_dir) if build_dir is not None else None
    backend = backend or (manifest.backend if manifest is not None else "torch")
    if manifest is None and backend != "torch":
        raise ConfigError(
            f"backend {backend!r} runs built artifacts: pass a build folder (with {MANIFEST_NAME}), "
            f"made by `kontext build --model {source}`"
        )
    if device is None:
        device = "cuda" if backend == "tensorrt" or torch.cuda.is_available() else "cpu"
    if backend == "tensorrt":
        from .backends.tensorrt import require_tensorrt

        require_tensorrt()  # before loading anything onto a GPU that may not exist
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BackendUnavailableError(f"device {device!r} asked for, but torch sees no CUDA device; use cpu")
    dtype = default_dtype(device)
    if backend == "onnxruntime":
        dtype = torch.float32  # the fp32 encoders feed the graph; it casts internally
    model = manifest.model if manifest is not None else str(source)
    components = load_components(model, dtype=dtype, device=device)
    if backend == "torch" and torch_options is not None and torch_options.compile_vae:
        from .backends.torch import compile_vae

        components = replace(components, vae=compile_vae(components.vae))
    engine = _engine(
        backend,
        components,
        manifest,
        build_dir,
        precision=precision,
        device=device,
        dtype=dtype,
        torch_mode=torch_mode,
        torch_options=torch_options,
        threads=threads,
        workers=workers,
        plan_memory_budget=plan_memory_budget,
        verify_sha256=verify_sha256,
    )
    out = f" --out {build_dir} --force" if build_dir is not None else ""
    rebuild = f"`kontext build --model {model}{out}`"
    fallback = None
    if miss_policy == "torch" and backend != "torch":
        fallback = TorchDenoiser(components.transformer, name="torch-eager-fallback")
    family = _family(manifest, precision, components)
    dispatcher = Dispatcher(
        engine, family=family, policy=miss_policy, fallback=fallback, rebuild_hint=rebuild
    )
    log.info("loaded %s (%s on %s, %d worker(s))", model, engine.name, device, workers)
    return KontextEngine(
        components,
        dispatcher,
        device=device,
        dtype=dtype,
        workers=workers,
        build_dir=build_dir,
        manifest=manifest,
    )


def _engine(
    backend: str,
    components: Components,
    manifest: Manifest | None,
    build_dir: Path | None,
    *,
    precision: str | None,
    device: str,
    dtype: torch.dtype,
    torch_mode: str,
    torch_options: TorchOptions | None,
    threads: int | None,
    workers: int,
    plan_memory_budget: int | None,
    verify_sha256: bool,
) -> Denoiser:
    """The backend's denoiser: torch over the components' transformer, or the build's artifacts."""
    if backend == "torch":
        amax = None
        if torch_mode == "fp8" and torch_options is not None and torch_options.fp8_scales == "static":
            from .backends.fp8_static import calibrate_amax

            amax = calibrate_amax(components, device=device, dtype=dtype)
        return torch_denoiser(
            components.transformer,
            mode=torch_mode,
            device=device,
            dtype=dtype,
            options=torch_options,
            amax=amax,
        )
    if manifest is None or build_dir is None:
        raise ConfigError(
            f"backend {backend!r} runs built artifacts: pass a build folder made by `kontext build`"
        )
    return load_artifacts(
        manifest,
        build_dir,
        backend,
        weights_id=components.weights_id,
        precision=precision,
        device=device,
        threads=threads,
        workers=workers,
        plan_memory_budget=plan_memory_budget,
        verify_sha256=verify_sha256,
    )


def load_artifacts(
    manifest: Manifest,
    build_dir: Path,
    backend: str,
    *,
    weights_id: str,
    precision: str | None,
    device: str,
    threads: int | None = None,
    workers: int = 1,
    plan_memory_budget: int | None = None,
    verify_sha256: bool = True,
) -> Denoiser:
    """The Denoiser of one precision of a build, through its backend's loader (which refuses a
    manifest that does not match these weights, this backend version or this GPU)."""
    if backend == "onnxruntime":
        from .backends.onnxruntime import load_onnxruntime

        return load_onnxruntime(
            manifest,
            build_dir,
            weights_id=weights_id,
            precision=precision,
            threads=threads,
            device=device,
            verify_sha256=verify_sha256,
        )
    if backend == "tensorrt":
        from .backends.tensorrt import load_tensorrt

        return load_tensorrt(
            manifest,
            build_dir,
            weights_id=weights_id,
            precision=precision,
            device=device,
            workers=workers,
            plan_memory_budget=plan_memory_budget,
            verify_sha256=verify_sha256,
        )
    raise BackendUnavailableError(
        f"{build_dir}: no loader for backend {backend!r}; use onnxruntime or tensorrt"
    )


def _family(manifest: Manifest | None, precision: str | None, components: Components) -> str:
    if manifest is not None and manifest.artifacts:
        art: Any = next((a for a in manifest.artifacts if a.precision == precision), manifest.artifacts[0])
        return str(art.family)
    return components.preset.bucket_family


def build_report(build_dir: str | Path) -> str:
    """For `kontext info build/...`: the buckets each artifact serves and whether this machine can run it.

    Checks what loading would check (backend library and version, GPU, files, sha256), except the
    weights, which are only fingerprinted when loaded.
    """
    from .backends.artifacts import MachineFacts, check_manifest

    build_dir = Path(build_dir)
    m = read_manifest(build_dir)
    lines = ["served by this build:"]
    machine, why = _machine_for(m)
    for a in m.artifacts:
        bs = ", ".join(f"{w}x{h}" for w, h in served_buckets(a.shape_keys(), a.family)) or "none"
        status = f"no: {why}" if machine is None else "yes"
        if machine is not None:
            try:
                check_manifest(m, build_dir, a, MachineFacts(m.weights_id, *machine))
            except Exception as e:  # a ManifestError says why and how to rebuild
                status = f"no: {e}"
        lines.append(f"  {a.backend}-{a.precision}: buckets {bs}")
        lines.append(f"    runs on this machine: {status}")
    return "\n".join(lines)


def _machine_for(m: Manifest) -> tuple[tuple[str, str | None, str | None] | None, str]:
    """(backend version, GPU, compute capability) of this machine for the manifest's backend, or why not."""
    try:
        if m.backend == "tensorrt":
            from .backends.tensorrt import machine_facts

            f = machine_facts(m.weights_id, torch.device("cuda"))
            return (f.backend_version, f.gpu, f.compute_capability), ""
        from .backends.onnxruntime import ort_version

        return (ort_version(), None, None), ""
    except BackendUnavailableError as e:
        return None, str(e)
