"""What engine.load decides and builds before an engine exists: resolve() the model, build, backend,
device and dtype from LoadOptions (checked there, once) before any weights; then, over the loaded
components, assemble() the Dispatcher of the resolved backend: the build's artifacts through their
backend's loader (load_artifacts), or the torch denoiser with its levers. runtime.load runs the two
around load_components and wraps the result in a KontextEngine.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch

from .backends import Denoiser
from .backends.torch import TorchDenoiser, default_dtype, torch_denoiser, with_vae_lever
from .backends.torch_options import TorchOptions
from .config import DEFAULT_STEPS, PRESETS, LoadOptions
from .dispatch import Dispatcher
from .distributed import check_context_parallel, context_parallel_denoiser
from .errors import BackendUnavailableError, ConfigError
from .manifest import MANIFEST_NAME, Manifest, read_manifest, rebuild_command
from .model.checkpoints import local_preset
from .model.components import Components


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
    """Decide the backend (the build's, or torch), device (cuda for TensorRT or
    when torch sees a GPU) and dtype, before loading anything."""
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


def assemble(
    r: Resolved, components: Components, torch_options: TorchOptions | None
) -> tuple[Components, Dispatcher]:
    """The components the engine runs and the dispatcher over the resolved backend: the build's
    artifacts (with the torch fallback when the miss policy asks for it), or the torch denoiser over
    `components`, with the torch path's levers (its `vae` lever too)."""
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
        components = with_vae_lever(components, torch_options is not None and torch_options.compile_vae)
        family, hint = components.preset.bucket_family, f"`kontext build --model {r.model}`"
    else:
        primary = load_artifacts(r.manifest, r.build_dir, weights_id=components.weights_id, options=opts)
        family, hint = r.manifest.family, f"`{rebuild_command(r.manifest, r.build_dir)}`"
    dispatcher = Dispatcher(
        primary, family=family, policy=opts.miss_policy, fallback=fallback, rebuild_hint=hint
    )
    return components, dispatcher


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
