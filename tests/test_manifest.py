"""Manifest: round trip, backward compatibility of the fields the build step added, atomic writes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.build.manifest import (
    MANIFEST_NAME,
    Artifact,
    Manifest,
    Stage,
    Verification,
    atomic_write_bytes,
    read_manifest,
    write_manifest,
)
from engine.errors import ManifestError


def _manifest() -> Manifest:
    art = Artifact(
        "onnxruntime/t.onnx",
        "ab" * 32,
        10,
        "onnxruntime",
        "int8",
        "tiny",
        {"b1_t60_c60_x32": 0},
        {"b1_t60_c60_x32": Verification(0.02, 0.1, 0.08, 2)},
        runtime_options={"graph_optimization_level": "ORT_ENABLE_EXTENDED"},
    )
    return Manifest(
        "tiny",
        "w",
        {"num_layers": 1},
        "onnxruntime",
        "1.31.1",
        20,
        "cd" * 32,
        "ef" * 32,
        {"int8": {"name": "int8"}},
        (art,),
        {"export": Stage("k", 1.0, ("onnx/t.onnx",), {"onnx/t.onnx": "00"}, {"onnx/t.onnx": [1, 2]})},
        family="tiny",
        complete=True,
        pending=(art,),
    )


def test_round_trip(tmp_path: Path) -> None:
    m = _manifest()
    write_manifest(tmp_path, m)
    assert read_manifest(tmp_path) == m
    assert not [p for p in tmp_path.iterdir() if p.name != MANIFEST_NAME]  # no temporary left


def test_reads_manifests_without_the_new_fields(tmp_path: Path) -> None:
    d = json.loads(_manifest().to_json())
    for k in ("family", "calibration", "complete", "pending", "build_seconds"):
        d.pop(k)
    for a in d["artifacts"]:
        for k in ("runtime_options", "source_sha256", "build_options"):
            a.pop(k)
    for s in d["stages"].values():
        s.pop("output_sha256")
        s.pop("output_stat")
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(d))
    m = read_manifest(tmp_path)
    assert m.complete and m.pending == () and m.artifacts[0].runtime_options == {}


def test_malformed_manifest_says_how_to_fix(tmp_path: Path) -> None:
    (tmp_path / MANIFEST_NAME).write_text('{"version": 1}')
    with pytest.raises(ManifestError, match="--force"):
        read_manifest(tmp_path)


def test_atomic_write_keeps_old_content_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "f.bin"
    atomic_write_bytes(target, b"old")

    with pytest.raises(TypeError):
        atomic_write_bytes(target, 123)  # type: ignore[arg-type]
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def test_built_manifest_records_the_build(built_tiny: Path) -> None:
    m = read_manifest(built_tiny)
    assert m.complete and m.family == "tiny" and m.backend == "onnxruntime" and m.opset >= 19
    assert m.onnx_sha256 and m.calibration_sha256 and m.weights_id
    assert set(m.recipes) == {"fp32", "int8", "fp8"}
    assert {"export", "calibrate", "reference", "quantize:int8", "compile:fp8", "verify:fp32"} <= set(
        m.stages
    )
    assert m.tool_versions["nvidia-modelopt"] != "missing"
    for a in m.artifacts:
        assert (built_tiny / a.path).is_file() and len(a.profiles) == 4
        assert set(a.profiles.values()) == {0}
