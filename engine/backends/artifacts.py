"""Checks a built artifact against its manifest and this machine before any backend loads it.

Shared by the ONNX Runtime and TensorRT backends: a manifest built for other weights, another
backend version, another GPU, or whose files are missing or corrupted is refused with the command
that rebuilds it. Nothing here imports a backend library.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from ..build.manifest import Artifact, Manifest, sha256_file
from ..errors import ManifestError

log = logging.getLogger(__name__)


def rebuild_command(manifest: Manifest, build_dir: Path, precision: str | None = None) -> str:
    """The command that rebuilds this build folder for this machine (what every refusal names)."""
    prec = f" --precision {precision}" if precision else ""
    return f"kontext build --model {manifest.model}{prec} --out {build_dir} --force"


@dataclass(frozen=True)
class MachineFacts:
    """What the running machine offers, compared to what a manifest was built for."""

    weights_id: str  # of the transformer weights the runtime will use (Components.weights_id)
    backend_version: str  # onnxruntime.__version__ or tensorrt.__version__
    gpu: str | None = None  # torch.cuda.get_device_name(); None on a CPU machine
    compute_capability: str | None = None  # "9.0"


def select_artifact(manifest: Manifest, backend: str, precision: str | None) -> Artifact:
    """The artifact of `precision` (None: the first listed) for `backend`, or a ManifestError."""
    candidates = [a for a in manifest.artifacts if a.backend == backend]
    if not candidates:
        raise ManifestError(
            f"this build has no {backend} artifacts (it was built for {manifest.backend}); "
            f"rebuild with `kontext build --model {manifest.model} --force` on this machine"
        )
    if precision is None:
        return candidates[0]
    for a in candidates:
        if a.precision == precision:
            return a
    return manifest.artifact(precision)  # raises, naming the precisions that exist


def check_manifest(
    manifest: Manifest,
    build_dir: Path,
    artifact: Artifact,
    machine: MachineFacts,
    *,
    verify_sha256: bool = True,
) -> Path:
    """Refuse a manifest that does not match `machine`; return the artifact's absolute path.

    Checked, in order: weights, backend version, GPU model and compute capability (when the
    manifest names a GPU), the file's presence, size and (if `verify_sha256`) sha256.
    """
    fix = rebuild_command(manifest, build_dir, artifact.precision)
    if not manifest.complete:
        raise ManifestError(f"{build_dir} holds an unfinished or failed build; finish it with `{fix}`")
    if manifest.weights_id != machine.weights_id:
        raise ManifestError(
            f"{build_dir} was built from weights {manifest.weights_id}, but the loaded weights are "
            f"{machine.weights_id}; rebuild with `{fix}`"
        )
    if manifest.backend_version != machine.backend_version:
        raise ManifestError(
            f"{build_dir} was built with {manifest.backend} {manifest.backend_version}, but this "
            f"machine has {machine.backend_version}; rebuild with `{fix}`"
        )
    if manifest.gpu is not None:
        if machine.gpu is None:
            raise ManifestError(
                f"{build_dir} was built for {manifest.gpu}, and this machine has no CUDA GPU; "
                f"run it on that GPU, or rebuild here with `{fix}`"
            )
        if manifest.gpu != machine.gpu or manifest.compute_capability != machine.compute_capability:
            raise ManifestError(
                f"{build_dir} was built for {manifest.gpu} (compute capability "
                f"{manifest.compute_capability}), but this GPU is {machine.gpu} "
                f"({machine.compute_capability}); rebuild with `{fix}`"
            )
    path = (Path(build_dir) / artifact.path).resolve()
    if not path.is_file():
        raise ManifestError(f"{path} is listed in the manifest but missing; rebuild with `{fix}`")
    size = path.stat().st_size
    if size != artifact.bytes:
        raise ManifestError(
            f"{path} is {size} bytes, the manifest says {artifact.bytes} (corrupted or "
            f"replaced); rebuild with `{fix}`"
        )
    if verify_sha256:
        digest = sha256_file(path)
        if digest != artifact.sha256:
            raise ManifestError(
                f"{path} has sha256 {digest[:12]}..., the manifest says {artifact.sha256[:12]}... "
                f"(corrupted or replaced); rebuild with `{fix}`"
            )
    log.debug("artifact %s matches its manifest", path)
    return path
