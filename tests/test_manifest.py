"""Manifest: round trip, refusal of other versions and of missing or unknown fields, what a build records."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.errors import ManifestError
from engine.manifest import (
    MANIFEST_NAME,
    MANIFEST_VERSION,
    Artifact,
    Manifest,
    Stage,
    Verification,
    read_manifest,
    write_manifest,
)


def _manifest() -> Manifest:
    art = Artifact(
        path="onnxruntime/t.onnx",
        sha256="ab" * 32,
        bytes=10,
        backend="onnxruntime",
        precision="int8",
        family="tiny",
        profiles={"b1_t60_c60_x32": 0},
        profile_mode="dynamic",
        runtime_options={"graph_optimization_level": "ORT_ENABLE_EXTENDED"},
        source_sha256="12" * 32,
        build_options={},
        verification={"b1_t60_c60_x32": Verification(0.02, 0.1, 0.08, 2)},
    )
    return Manifest(
        model="tiny",
        weights_id="w",
        transformer={"num_layers": 1},
        backend="onnxruntime",
        backend_version="1.31.1",
        opset=20,
        onnx_sha256="cd" * 32,
        calibration_sha256="ef" * 32,
        recipes={"int8": {"name": "int8"}},
        artifacts=(art,),
        stages={"export": Stage("k", 1.0, ("onnx/t.onnx",), {"onnx/t.onnx": "00"}, {"onnx/t.onnx": [1, 2]})},
        gpu=None,
        compute_capability=None,
        tool_versions={},
        family="tiny",
        calibration={},
        complete=True,
        pending=(art,),
        build_seconds=1.0,
        request="",
    )


def test_round_trip(tmp_path: Path) -> None:
    m = _manifest()
    write_manifest(tmp_path, m)
    assert read_manifest(tmp_path) == m
    assert not [p for p in tmp_path.iterdir() if p.name != MANIFEST_NAME]  # no temporary left


@pytest.mark.parametrize(
    "change",
    [
        lambda d: d.update(version=MANIFEST_VERSION - 1),  # an older manifest
        lambda d: d.pop("family"),  # a missing field
        lambda d: d.update(extra=1),  # an unknown field
        lambda d: d["artifacts"][0].pop("profile_mode"),
        lambda d: d["artifacts"][0].update(profile_mode="sometimes"),
        lambda d: d["stages"]["export"].pop("output_stat"),
    ],
    ids=["version", "missing", "unknown", "artifact-missing", "bad-mode", "stage-missing"],
)
def test_refuses_any_other_shape(tmp_path: Path, change) -> None:  # type: ignore[no-untyped-def]
    d = json.loads(_manifest().to_json())
    change(d)
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(d))
    with pytest.raises(ManifestError, match="kontext build --force"):
        read_manifest(tmp_path)


def test_malformed_manifest_says_how_to_fix(tmp_path: Path) -> None:
    (tmp_path / MANIFEST_NAME).write_text('{"version": 1}')
    with pytest.raises(ManifestError, match="--force"):
        read_manifest(tmp_path)


def test_built_manifest_records_the_build(built_tiny: Path) -> None:
    m = read_manifest(built_tiny)
    assert m.complete and m.family == "tiny" and m.backend == "onnxruntime" and m.opset >= 19
    assert m.onnx_sha256 and m.calibration_sha256 and m.weights_id
    assert set(m.recipes) == {"fp32", "int8", "fp8"}
    assert {"export", "calibrate", "golden", "quantize:int8", "compile:fp8", "verify:fp32"} <= set(m.stages)
    assert m.tool_versions["nvidia-modelopt"] != "missing"
    for a in m.artifacts:
        assert (built_tiny / a.path).is_file() and len(a.profiles) == 4
        assert set(a.profiles.values()) == {0} and a.profile_mode == "dynamic"  # one graph, every shape
