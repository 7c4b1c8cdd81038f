"""What a build is asked, settled before any stage runs: the machine it targets (looked up once), the
request hash that decides whether anything runs, the manifest draft every stage fills in, and the
previous build's manifest (up to date, or the verifications it can lend)."""

from __future__ import annotations

import dataclasses
import importlib.metadata as md
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..backends.tensorrt_plans import cuda_device
from ..config import PRESETS
from ..errors import BuildError, ManifestError
from ..manifest import MANIFEST_NAME, Artifact, Manifest, read_manifest
from ..model.components import Components
from ..model.load import source_signature
from ..model.lora import LoraSpec, file_sha256
from . import calibrate, quantize
from .backend import backend_version
from .export import EXPORT_VERSION
from .options import DEFAULT_BATCHES, DEFAULT_REFS, BuildOptions
from .stages import input_hash, outputs_intact

log = logging.getLogger(__name__)

TOOLS = ("torch", "diffusers", "onnx", "onnxruntime", "nvidia-modelopt")  # versions a build records


@dataclass(frozen=True)
class Target:
    """What the artifacts are built for, looked up once per build: the backend, its version and (for
    TensorRT) the GPU, as cuda_device() gives it: (name, (major, minor))."""

    backend: str
    version: str
    device: tuple[str, tuple[int, int]] | None = None

    @classmethod
    def of(cls, backend: str) -> Target:
        return cls(backend, backend_version(backend), cuda_device() if backend == "tensorrt" else None)


def tool_versions() -> dict[str, str]:
    return {d: _version(d) for d in TOOLS}


def request_hash(
    model: str,
    components: Components | None,
    precisions: Sequence[str],
    family: str | None,
    target: Target,
    versions: Mapping[str, str],
    recipes: Sequence[quantize.Recipe],
    opts: BuildOptions,
) -> str:
    """Everything a build's result depends on, hashed without loading the model (see source_signature).
    opts: resolved (BuildOptions.resolved).

    An option enters the hash only when it differs from its default (refs, batches, loras; dtype when
    not fp32; TensorRT weight streaming), so adding an option never changes the hash of a request that
    does not use it, and the builds made from such requests stay up to date. A LoRA enters by its file's
    sha256 and scale, as its weights_id does.
    """
    if opts.device is None or opts.dtype is None:
        raise BuildError("the request hash takes resolved options: BuildOptions(...).resolved()")
    options = dataclasses.asdict(dataclasses.replace(opts, loras=()))
    for name in ("progress", "refs", "batches", "loras"):
        del options[name]
    if options["dtype"] == "fp32":
        del options["dtype"]
    if not opts.tensorrt.weight_streaming:  # the default: a plan built for streaming hashes apart
        del options["tensorrt"]["weight_streaming"]
    if opts.refs != DEFAULT_REFS:
        options["refs"] = list(opts.refs)
    if opts.batches != DEFAULT_BATCHES:
        options["batches"] = list(opts.batches)
    if opts.loras:
        options["loras"] = [lora_record(spec) for spec in opts.loras]
    return input_hash(
        {
            "model": _model_key(model),
            "source": components.weights_id if components is not None else source_signature(model),
            "precisions": list(precisions),
            "family": family,
            "backend": target.backend,
            "backend_version": target.version,
            "gpu": target.device,
            "versions": dict(versions),
            "recipes": [r.to_dict() for r in recipes],
            "options": options,
            "calibration_set": calibrate.calibration_hash(opts.calibration, family or _default_family(model)),
            "export": EXPORT_VERSION,
        }
    )


def draft_manifest(
    comps: Components,
    target: Target,
    family: str,
    recipes: Sequence[quantize.Recipe],
    versions: Mapping[str, str],
    request: str,
    opts: BuildOptions,
) -> Manifest:
    """The manifest before any stage: what the build is made from and for. The stages add the exported
    graph's sha256, their records and the artifacts (BuildContext.manifest)."""
    device = target.device
    return Manifest(
        model=comps.source,
        weights_id=comps.weights_id,
        transformer=dataclasses.asdict(comps.preset.transformer),
        backend=target.backend,
        backend_version=target.version,
        opset=opts.opset,
        onnx_sha256="",
        calibration_sha256=calibrate.calibration_hash(opts.calibration, family),
        recipes={r.name: r.to_dict() for r in recipes},
        artifacts=(),
        stages={},
        gpu=device[0] if device else None,
        compute_capability=f"{device[1][0]}.{device[1][1]}" if device else None,
        tool_versions=dict(versions),
        family=family,
        calibration=dataclasses.asdict(opts.calibration),
        complete=False,
        pending=(),
        build_seconds=0.0,
        request=request,
        refs=tuple(opts.refs),
        batches=tuple(opts.batches),
        loras=tuple(lora_record(spec) for spec in opts.loras),
    )


def lora_record(spec: LoraSpec) -> dict[str, Any]:
    """What the manifest and the request hash record of one LoRA: the path given, its sha256, its scale."""
    if not spec.path.is_file():
        raise BuildError(f"LoRA {spec.path}: no such file")
    return {"path": str(spec.path), "sha256": file_sha256(spec.path), "scale": spec.scale}


def refuse_another_recipe(root: Path, opts: BuildOptions) -> None:
    """A build into the default folder never replaces a build of another recipe there (reference
    counts, batch sizes, LoRAs): what loads that folder by default would then refuse or miss."""
    previous = read_previous(root)
    if previous is None:
        return
    ours = [lora_record(spec) for spec in opts.loras]
    same = (previous.refs, previous.batches) == (opts.refs, opts.batches) and [
        (x["sha256"], x["scale"]) for x in previous.loras
    ] == [(x["sha256"], x["scale"]) for x in ours]
    if not same:
        theirs = _recipe(previous.refs, previous.batches, previous.loras)
        raise BuildError(
            f"{root} holds a build of another recipe ({theirs}; this one: "
            f"{_recipe(opts.refs, opts.batches, ours)}): build it elsewhere with --build DIR, "
            f"or replace it by naming it: --build {root}"
        )


def _recipe(refs: Sequence[int], batches: Sequence[int], loras: Sequence[Mapping[str, Any]]) -> str:
    named = ", ".join(f"{Path(x['path']).name}:{x['scale']:g}" for x in loras) or "none"
    return f"refs {','.join(map(str, refs))}, batch {','.join(map(str, batches))}, LoRAs {named}"


def read_previous(root: Path) -> Manifest | None:
    if not (root / MANIFEST_NAME).is_file():
        return None
    try:
        return read_manifest(root)
    except ManifestError as e:
        log.warning("ignoring the old manifest (%s); every stage runs again", e)
        return None


def up_to_date(root: Path, request: str) -> Manifest | None:
    """The previous manifest when it is complete, was built from this very request, and every file it
    recorded is intact on disk (size + mtime, else sha256): then there is nothing to do."""
    previous = read_previous(root)
    if previous is None or not previous.complete or previous.request != request:
        return None
    if not all(outputs_intact(root, stage) for stage in previous.stages.values()):
        return None
    return previous


def previous_artifact(previous: Manifest | None, art: Artifact) -> Artifact | None:
    """The verified artifact of the last build with the same file, to reuse its verification."""
    if previous is None:
        return None
    for a in previous.artifacts:
        if a.precision == art.precision and a.sha256 == art.sha256 and a.path == art.path:
            return dataclasses.replace(art, verification=a.verification)
    return None


def _version(dist: str) -> str:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return "missing"


def _model_key(model: str) -> str:
    """A preset's name, or a local path made absolute and normalized (K, K/ and ./K are one build);
    symlinks are not resolved (a cache snapshot stays a snapshot)."""
    name = str(model)
    return name if name in PRESETS else os.path.abspath(Path(name).expanduser())


def _default_family(model: str) -> str:
    name = str(model)
    return PRESETS[name].bucket_family if name in PRESETS else PRESETS["kontext-dev"].bucket_family
