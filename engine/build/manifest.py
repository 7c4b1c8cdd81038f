"""build/<name>/manifest.json: what was built, from what, for which machine, and how well it verified.

The manifest is the contract between the build step and the runtime: the runtime serves
exactly the (artifact, profile) pairs listed here and refuses a manifest that does not match
its weights, backend version or GPU. Written atomically (temporary name, fsync, rename).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..buckets import ShapeKey
from ..errors import ManifestError

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1


def shape_key_str(key: ShapeKey) -> str:
    """'b1_t64_c64_x32': the manifest's (and plan profiles') name of a shape key."""
    return str(key)


def parse_shape_key(text: str) -> ShapeKey:
    try:
        b, t, c, x = text.split("_")
        if not (b[0], t[0], c[0], x[0]) == ("b", "t", "c", "x"):
            raise ValueError(text)
        return ShapeKey(int(b[1:]), int(t[1:]), int(c[1:]), int(x[1:]))
    except (ValueError, IndexError):
        raise ManifestError(f"bad shape key {text!r} in manifest (expected like b1_t64_c64_x32)") from None


@dataclass(frozen=True)
class Verification:
    """Artifact output vs the fp32 PyTorch transformer on captured inputs of one shape key."""

    rel_l2: float  # ||a - r|| / ||r||
    max_abs: float
    bound: float  # the recipe's rel_l2 bound the build enforced
    samples: int


@dataclass(frozen=True)
class Artifact:
    """One loadable file: an ONNX Runtime model or a TensorRT plan, serving some shape keys."""

    path: str  # relative to the manifest's folder
    sha256: str
    bytes: int
    backend: str  # "onnxruntime" | "tensorrt"
    precision: str  # recipe name: "fp32" | "bf16" | "fp8" | "int8"
    family: str  # bucket family
    profiles: dict[str, int]  # shape key string -> optimization profile index (0 for ONNX Runtime)
    verification: dict[str, Verification] = field(default_factory=dict)  # shape key string -> errors
    # Added in the build step (defaults keep older manifests readable):
    runtime_options: dict[str, Any] = field(default_factory=dict)  # how to load it (ORT SessionOptions...)
    source_sha256: str = ""  # the (quantized) ONNX graph it was compiled from
    build_options: dict[str, Any] = field(default_factory=dict)  # Q/DQ counts, TensorRT settings, plan info

    def shape_keys(self) -> frozenset[ShapeKey]:
        return frozenset(parse_shape_key(k) for k in self.profiles)


@dataclass(frozen=True)
class Stage:
    """A finished build stage: the hash of its inputs (to skip it next time) and its duration."""

    inputs: str
    seconds: float
    outputs: tuple[str, ...] = ()  # relative paths the stage wrote
    output_sha256: dict[str, str] = field(default_factory=dict)  # relative path -> sha256 when written
    output_stat: dict[str, list[int]] = field(default_factory=dict)  # relative path -> [bytes, mtime_ns]


@dataclass(frozen=True)
class Manifest:
    model: str  # preset name or resolved local path
    weights_id: str  # weights.Components.weights_id
    transformer: dict[str, Any]  # TransformerConfig as a dict
    backend: str  # "onnxruntime" | "tensorrt"
    backend_version: str
    opset: int
    onnx_sha256: str  # of the exported fp32 graph
    calibration_sha256: str  # of the calibration set (images, prompts, settings); "" if none
    recipes: dict[str, dict[str, Any]]  # recipe name -> its settings (quantize.Recipe as a dict)
    artifacts: tuple[Artifact, ...]
    stages: dict[str, Stage]
    gpu: str | None = None  # device name the plans were built on (TensorRT)
    compute_capability: str | None = None  # "9.0"
    tool_versions: dict[str, str] = field(default_factory=dict)  # torch, onnx, modelopt, ...
    # Added in the build step (defaults keep older manifests readable):
    family: str = ""  # bucket family the artifacts serve
    calibration: dict[str, Any] = field(default_factory=dict)  # calibrate.CalibrationSpec as a dict
    complete: bool = True  # False while a build is under way or after it failed
    pending: tuple[Artifact, ...] = ()  # compiled, not (yet) verified: never served
    build_seconds: float = 0.0  # wall time of the last build that ran a stage
    request: str = ""  # hash of the build request and its sources' identity: the no-op fast path
    version: int = MANIFEST_VERSION

    def artifact(self, precision: str) -> Artifact:
        for a in self.artifacts:
            if a.precision == precision:
                return a
        have = ", ".join(a.precision for a in self.artifacts) or "none"
        raise ManifestError(
            f"no {precision} artifact in this build (have: {have}); "
            f"rebuild with `kontext build --precision {precision}`"
        )

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @staticmethod
    def from_dict(d: dict[str, Any]) -> Manifest:
        if d.get("version") != MANIFEST_VERSION:
            raise ManifestError(
                f"manifest version {d.get('version')} is not {MANIFEST_VERSION}; "
                "rebuild with `kontext build --force`"
            )
        try:
            arts = tuple(_artifact(a) for a in d["artifacts"])
            pending = tuple(_artifact(a) for a in d.get("pending", ()))
            stages = {
                k: Stage(**{**v, "outputs": tuple(v.get("outputs", ()))}) for k, v in d["stages"].items()
            }
            return Manifest(**{**d, "artifacts": arts, "stages": stages, "pending": pending})
        except (KeyError, TypeError) as e:
            raise ManifestError(f"manifest is malformed ({e}); rebuild with `kontext build --force`") from e


def _artifact(a: dict[str, Any]) -> Artifact:
    return Artifact(**{**a, "verification": {k: Verification(**v) for k, v in a["verification"].items()}})


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file beside `path`, fsync, then rename: readers see old or new, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_manifest(build_dir: Path, manifest: Manifest) -> Path:
    path = build_dir / MANIFEST_NAME
    atomic_write_bytes(path, manifest.to_json().encode())
    return path


def read_manifest(build_dir: Path) -> Manifest:
    """The manifest of `build_dir`, or a ManifestError saying how to build one."""
    path = Path(build_dir) / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(
            f"no {MANIFEST_NAME} in {build_dir}; build one with `kontext build --out {build_dir}`"
            " (or `make engine`)"
        )
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ManifestError(f"{path} is unreadable ({e}); rebuild with `kontext build --force`") from e
    return Manifest.from_dict(data)


def describe(build_dir: Path) -> str:
    """A human summary of a build folder for `kontext info`."""
    m = read_manifest(build_dir)
    lines = [
        f"build {build_dir}:",
        f"  model {m.model} (weights {m.weights_id}), backend {m.backend} "
        f"{m.backend_version}, opset {m.opset}",
    ]
    if m.gpu:
        lines.append(f"  built on {m.gpu} (compute capability {m.compute_capability})")
    for a in m.artifacts:
        worst = max((v.rel_l2 for v in a.verification.values()), default=float("nan"))
        lines.append(
            f"  {a.precision:<5} {a.path} ({a.bytes / 1e6:.1f} MB), {len(a.profiles)} shape keys, "
            f"family {a.family}, worst rel L2 {worst:.2e}"
        )
    return "\n".join(lines)
