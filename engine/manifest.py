"""build/<name>/manifest.json: the contract between the build step (which writes it) and the runtime.

What was built, from what, for which machine, and how well it verified. The runtime serves exactly
the (artifact, profile) pairs listed here and refuses, with the one command that rebuilds it
(`rebuild_command`), a manifest that does not match its weights, backend version or GPU. Nothing
here imports a backend library or the build package.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .buckets import ShapeKey
from .config import TransformerConfig
from .errors import ManifestError
from .files import atomic_write_bytes

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 2  # 2: Artifact.profile_mode; strict fields. Any other version is refused.
PROFILE_MODES: tuple[str, ...] = ("dynamic", "static")  # see Artifact.profile_mode


def parse_shape_key(text: str) -> ShapeKey:
    """'b1_t64_c64_x32' (str(ShapeKey)) -> ShapeKey, or a ManifestError."""
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
    profiles: dict[str, int]  # shape key string -> optimization profile index
    # "static": one TensorRT profile per shape key (min = opt = max); "dynamic": one profile for the
    # whole family (every key -> profile 0; ONNX Runtime graphs are always dynamic).
    profile_mode: str
    runtime_options: dict[str, Any]  # how to load it (ORT SessionOptions; {} for TensorRT)
    source_sha256: str  # the (quantized) ONNX graph it was compiled from
    build_options: dict[str, Any]  # Q/DQ counts, TensorRT settings
    verification: dict[str, Verification] = field(default_factory=dict)  # shape key string -> errors

    def shape_keys(self) -> frozenset[ShapeKey]:
        return frozenset(parse_shape_key(k) for k in self.profiles)

    def keys_of_profile(self, profile: int) -> list[ShapeKey]:
        """The shape keys one optimization profile serves, sorted."""
        return sorted(parse_shape_key(k) for k, p in self.profiles.items() if p == profile)


@dataclass(frozen=True)
class Stage:
    """A finished build stage: the hash of its inputs (to skip it next time) and its duration."""

    inputs: str
    seconds: float
    outputs: tuple[str, ...]  # relative paths the stage wrote
    output_sha256: dict[str, str]  # relative path -> sha256
    output_stat: dict[str, list[int]]  # relative path -> [bytes, mtime_ns]


@dataclass(frozen=True)
class Manifest:
    model: str  # preset name or absolute local path as given (not resolved: cache snapshots stay reusable)
    weights_id: str  # model.components.Components.weights_id
    transformer: dict[str, Any]  # TransformerConfig as a dict
    backend: str  # "onnxruntime" | "tensorrt"
    backend_version: str
    opset: int
    onnx_sha256: str  # of the exported fp32 graph
    calibration_sha256: str  # of the calibration set (images, prompts, settings)
    recipes: dict[str, dict[str, Any]]  # recipe name -> its settings (quantize.Recipe as a dict)
    artifacts: tuple[Artifact, ...]
    stages: dict[str, Stage]
    gpu: str | None  # device name the plans were built on (TensorRT); None for ONNX Runtime
    compute_capability: str | None  # "9.0"
    tool_versions: dict[str, str]  # torch, onnx, modelopt, ...
    family: str  # bucket family the artifacts serve
    calibration: dict[str, Any]  # calibrate.CalibrationSpec as a dict
    complete: bool  # False while a build is under way or after it failed
    pending: tuple[Artifact, ...]  # compiled, not (yet) verified: never served
    build_seconds: float  # wall time of the last build that ran a stage
    request: str  # hash of the build request and its sources' identity: the no-op fast path
    version: int = MANIFEST_VERSION
    # Added within version 2, so a manifest without them means these defaults (see _check_fields):
    refs: tuple[int, ...] = (0,)  # reference-image counts the keys serve (kontext build --refs)
    batches: tuple[int, ...] = (1,)  # batch sizes the keys serve (kontext build --batch)
    loras: tuple[dict[str, Any], ...] = ()  # fused LoRAs, in order: {"path", "sha256", "scale"}

    def artifact(self, precision: str) -> Artifact:
        """The artifact of `precision`, or a ManifestError naming those that exist (select_artifact adds
        the rebuild command)."""
        for a in self.artifacts:
            if a.precision == precision:
                return a
        have = ", ".join(a.precision for a in self.artifacts) or "none"
        raise ManifestError(f"no {precision} artifact in this build (have: {have})")

    def transformer_config(self) -> TransformerConfig:
        return TransformerConfig(
            **{**self.transformer, "axes_dims_rope": tuple(self.transformer["axes_dims_rope"])}
        )

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @staticmethod
    def from_dict(d: dict[str, Any]) -> Manifest:
        """The manifest of a JSON dict, refusing any other version and any missing or unknown field."""
        if d.get("version") != MANIFEST_VERSION:
            raise ManifestError(
                f"manifest version {d.get('version')} is not {MANIFEST_VERSION}; "
                "rebuild with `kontext build --force`"
            )
        try:
            _check_fields(Manifest, d)
            arts = tuple(_artifact(a) for a in d["artifacts"])
            pending = tuple(_artifact(a) for a in d["pending"])
            stages = {k: _stage(v) for k, v in d["stages"].items()}
            fields: dict[str, Any] = {**d, "artifacts": arts, "stages": stages, "pending": pending}
            fields.update({k: tuple(d[k]) for k in OPTIONAL_FIELDS if k in d})
            return Manifest(**fields)
        except (KeyError, TypeError, AttributeError) as e:
            raise ManifestError(f"manifest is malformed ({e}); rebuild with `kontext build --force`") from e


# Fields added after their version was released: a manifest may lack them (they take their defaults).
OPTIONAL_FIELDS = frozenset({"refs", "batches", "loras"})


def _check_fields(cls: type, d: dict[str, Any]) -> None:
    names = {f.name for f in dataclasses.fields(cls)}
    if not names - OPTIONAL_FIELDS <= set(d) <= names:
        missing, unknown = sorted(names - OPTIONAL_FIELDS - set(d)), sorted(set(d) - names)
        raise TypeError(f"{cls.__name__} fields missing {missing}, unknown {unknown}")


def _artifact(a: dict[str, Any]) -> Artifact:
    _check_fields(Artifact, a)
    if a["profile_mode"] not in PROFILE_MODES:
        raise TypeError(f"profile_mode {a['profile_mode']!r} is not one of {PROFILE_MODES}")
    return Artifact(**{**a, "verification": {k: Verification(**v) for k, v in a["verification"].items()}})


def _stage(s: dict[str, Any]) -> Stage:
    _check_fields(Stage, s)
    return Stage(**{**s, "outputs": tuple(s["outputs"])})


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_manifest(build_dir: Path, manifest: Manifest) -> Path:
    path = build_dir / MANIFEST_NAME
    atomic_write_bytes(path, manifest.to_json().encode())
    return path


def read_manifest(build_dir: Path) -> Manifest:
    """The manifest of `build_dir`, or a ManifestError saying how to build one."""
    path = Path(build_dir) / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(
            f"no {MANIFEST_NAME} in {build_dir}; build one with `kontext build --build {build_dir}`"
            " (or `make engine`)"
        )
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ManifestError(f"{path} is unreadable ({e}); rebuild with `kontext build --force`") from e
    return Manifest.from_dict(data)


# ----------------------------------------------------------------------------- the runtime's checks


def rebuild_command(manifest: Manifest, build_dir: Path, precision: str | None = None) -> str:
    """The command that rebuilds this build folder for this machine (what every refusal names)."""
    prec = f" --precision {precision}" if precision else ""
    return f"kontext build --model {manifest.model}{prec}{build_flags(manifest)} --build {build_dir} --force"


def build_flags(manifest: Manifest) -> str:
    """The --refs, --batch and --lora flags of the build that wrote `manifest`, and its TensorRT plans'
    --profiles static and --weight-streaming ('' for the defaults)."""
    flags = ""
    if tuple(manifest.refs) != (0,):
        flags += " --refs " + ",".join(str(r) for r in manifest.refs)
    if tuple(manifest.batches) != (1,):
        flags += " --batch " + ",".join(str(b) for b in manifest.batches)
    trt = [a.build_options.get("tensorrt", {}) for a in manifest.artifacts if a.backend == "tensorrt"]
    if any(o.get("profiles") == "static" for o in trt):
        flags += " --profiles static"
    if any(o.get("weight_streaming") for o in trt):
        flags += " --weight-streaming"
    return flags + "".join(f" --lora {lora_arg(x)}" for x in manifest.loras)


def lora_arg(lora: dict[str, Any]) -> str:
    """One recorded LoRA as the PATH:SCALE argument of --lora / loras=."""
    return f"{lora['path']}:{lora['scale']:g}"


@dataclass(frozen=True)
class MachineFacts:
    """What the running machine offers, compared to what a manifest was built for."""

    weights_id: str  # of the transformer weights the runtime will use (Components.weights_id)
    backend_version: str  # onnxruntime.__version__ or tensorrt.__version__
    gpu: str | None = None  # torch.cuda.get_device_name(); None on a CPU machine
    compute_capability: str | None = None  # "9.0"


def select_artifact(manifest: Manifest, build_dir: Path, backend: str, precision: str | None) -> Artifact:
    """The artifact of `precision` (None: the first listed) for `backend`, or a ManifestError."""
    candidates = [a for a in manifest.artifacts if a.backend == backend]
    if not candidates:
        raise ManifestError(
            f"this build has no {backend} artifacts (it was built for {manifest.backend}); "
            f"rebuild with `{rebuild_command(manifest, build_dir)}` on this machine"
        )
    for a in candidates:
        if precision is None or a.precision == precision:
            return a
    have = ", ".join(a.precision for a in candidates)
    raise ManifestError(
        f"no {precision} artifact in this build (have: {have}); "
        f"rebuild with `{rebuild_command(manifest, build_dir, precision)}`"
    )


def check_manifest(manifest: Manifest, build_dir: Path, artifact: Artifact, machine: MachineFacts) -> Path:
    """Refuse a manifest that does not match `machine`; return the artifact's absolute path.

    Checked, in order: weights, backend version, GPU model and compute capability (when the
    manifest names a GPU), the file's presence, size and sha256.
    """
    fix = rebuild_command(manifest, build_dir, artifact.precision)
    if not manifest.complete:
        raise ManifestError(f"{build_dir} holds an unfinished or failed build; finish it with `{fix}`")
    if manifest.weights_id != machine.weights_id:
        if manifest.loras:
            named = ", ".join(
                f"{Path(x['path']).name} at scale {x['scale']:g} (sha256 {x['sha256'][:12]}...)"
                for x in manifest.loras
            )
            args = " ".join(f"--lora {lora_arg(x)}" for x in manifest.loras)
            loras = (
                f"; it was built with the LoRA(s) {named}: load it with those LoRAs, in that order "
                f"(`{args}`, or engine.load(..., loras=[...]))"
            )
        else:
            loras = "; it was built without LoRAs (drop loras=/--lora if you passed any)"
        raise ManifestError(
            f"{build_dir} was built from weights {manifest.weights_id}, but the loaded weights are "
            f"{machine.weights_id}{loras}, or rebuild with `{fix}`"
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
    digest = sha256_file(path)
    if digest != artifact.sha256:
        raise ManifestError(
            f"{path} has sha256 {digest[:12]}..., the manifest says {artifact.sha256[:12]}... "
            f"(corrupted or replaced); rebuild with `{fix}`"
        )
    log.debug("artifact %s matches its manifest", path)
    return path
