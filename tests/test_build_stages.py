"""Incremental and atomic builds: skipped stages, exact invalidation, and SIGKILL during every stage."""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from engine.builder.builder import BuildOptions, build
from engine.builder.quantize import RECIPES
from engine.builder.stages import outputs_intact
from engine.calibration import CalibrationSpec
from engine.manifest import MANIFEST_NAME, read_manifest
from engine.model.components import Components, fingerprint_module

from .conftest import BUILD_TEST_CALIBRATION

PRECISIONS = ("fp32", "int8", "fp8")
ALL_STAGES = (
    {"export", "calibrate", "reference"}
    | {f"{s}:{p}" for p in PRECISIONS for s in ("compile", "verify")}
    | {"quantize:int8", "quantize:fp8"}
)


def _options(**changes: object) -> BuildOptions:
    spec = CalibrationSpec(**BUILD_TEST_CALIBRATION)  # type: ignore[arg-type]
    return dataclasses.replace(BuildOptions(calibration=spec, progress=False), **changes)  # type: ignore[arg-type]


def _ran(caplog: pytest.LogCaptureFixture) -> set[str]:
    return {
        r.getMessage().split()[1].rstrip(":")
        for r in caplog.records
        if r.getMessage().endswith(")") and ": running (" in r.getMessage()
    }


@pytest.fixture
def copy(built_tiny: Path, tmp_path: Path) -> Path:
    out = tmp_path / "tiny"
    shutil.copytree(built_tiny, out)
    return out


def _build(out: Path, comps: Components, caplog: pytest.LogCaptureFixture, **changes: object) -> set[str]:
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="engine.builder"):
        m = build(
            "tiny",
            out_dir=out,
            precisions=PRECISIONS,
            family="tiny",
            backend="onnxruntime",
            options=_options(**changes),
            components=comps,
        )
    assert m.complete and len(m.artifacts) == 3
    return _ran(caplog)


def test_second_build_does_nothing(copy: Path, tiny: Components, caplog: pytest.LogCaptureFixture) -> None:
    before = read_manifest(copy)
    t0 = time.perf_counter()
    assert _build(copy, tiny, caplog) == set()
    assert time.perf_counter() - t0 < 10
    # the whole-build fast path: same request, every recorded file intact -> no stage is even looked at
    assert any(r.getMessage().endswith("up to date (nothing to do)") for r in caplog.records)
    assert read_manifest(copy).artifacts == before.artifacts


def test_second_build_without_components_does_not_load_the_model(
    copy: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A no-op `make engine` must not import diffusers or build the model: the request hash decides."""
    import engine.builder.builder as builder

    args = {
        "out_dir": copy,
        "precisions": PRECISIONS,
        "family": "tiny",
        "backend": "onnxruntime",
        "options": _options(),
    }
    first = builder.build(
        "tiny", **args
    )  # loads the model once; every stage is up to date; records the request
    monkeypatch.setattr(builder, "load_components", lambda *a, **k: pytest.fail("model loaded on a no-op"))
    with caplog.at_level(logging.INFO, logger="engine.builder"):
        again = builder.build("tiny", **args)
    assert again.to_json() == first.to_json()
    assert any(r.getMessage().endswith("up to date (nothing to do)") for r in caplog.records)


def test_recipe_change_reruns_only_that_recipe(
    copy: Path, tiny: Components, caplog: pytest.LogCaptureFixture
) -> None:
    int8 = dataclasses.replace(RECIPES["int8"], calibration_method="max")
    assert _build(copy, tiny, caplog, recipes={"int8": int8}) == {
        "quantize:int8",
        "compile:int8",
        "verify:int8",
    }
    assert read_manifest(copy).recipes["int8"]["calibration_method"] == "max"


def test_calibration_change_reruns_calibration_and_quantized_recipes(
    copy: Path, tiny: Components, caplog: pytest.LogCaptureFixture
) -> None:
    spec = CalibrationSpec(**{**BUILD_TEST_CALIBRATION, "seed": 1})  # type: ignore[arg-type]
    ran = _build(copy, tiny, caplog, calibration=spec)
    assert ran == {"calibrate"} | {
        f"{s}:{p}" for p in ("int8", "fp8") for s in ("quantize", "compile", "verify")
    }


def test_weights_change_reruns_everything(
    copy: Path, tiny: Components, caplog: pytest.LogCaptureFixture
) -> None:
    transformer = tiny.transformer
    changed = type(transformer)(**transformer.config).eval()
    changed.load_state_dict(transformer.state_dict())
    with torch.no_grad():
        changed.proj_out.bias.add_(1e-3)
    comps = dataclasses.replace(tiny, transformer=changed, weights_id=fingerprint_module(changed))
    assert _build(copy, comps, caplog) == ALL_STAGES


def test_changed_file_on_disk_is_rebuilt(
    copy: Path, tiny: Components, caplog: pytest.LogCaptureFixture
) -> None:
    art = copy / next(a.path for a in read_manifest(copy).artifacts if a.precision == "int8")
    good = art.read_bytes()
    art.write_bytes(good + b"\0")
    # compile is deterministic: the same bytes come back, so the old verification still holds
    assert _build(copy, tiny, caplog) == {"compile:int8"}
    assert art.read_bytes() == good


_SCRIPT = textwrap.dedent("""
    import logging, sys
    from pathlib import Path
    logging.basicConfig(level=logging.WARNING, stream=sys.stdout, format="%(message)s")
    logging.getLogger("engine.builder").setLevel(logging.INFO)
    from engine.builder.builder import BuildOptions, build
    from engine.calibration import CalibrationSpec
    options = BuildOptions(calibration=CalibrationSpec(edits=4, steps=2), progress=False)
    build("tiny", out_dir=Path(sys.argv[1]), precisions=("fp32", "int8"), family="tiny",
          backend="onnxruntime", options=options)
    print("BUILD OK", flush=True)
""")


def _run_until(out: Path, stage: str | None) -> int:
    """Run a build in a subprocess; SIGKILL it as soon as `stage` starts (None: let it finish)."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    proc = subprocess.Popen(
        [sys.executable, "-c", _SCRIPT, str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd=root,
        env=env,
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        if stage is not None and line.startswith(f"stage {stage}: running"):
            proc.send_signal(signal.SIGKILL)
            break
    proc.stdout.close()
    return proc.wait(timeout=300)


def _nothing_half_written_is_accepted(out: Path) -> None:
    if not (out / MANIFEST_NAME).is_file():
        return
    m = read_manifest(out)  # parses: the manifest is never half written
    assert not m.complete
    for name, stage in m.stages.items():
        assert outputs_intact(out, stage), name
    for a in m.artifacts:
        assert (out / a.path).is_file() and a.verification


@pytest.mark.slow
def test_sigkill_during_each_stage_then_resume(tmp_path: Path) -> None:
    out = tmp_path / "killed"
    for stage in (
        "export",
        "calibrate",
        "reference",
        "compile:fp32",
        "verify:fp32",
        "quantize:int8",
        "compile:int8",
        "verify:int8",
    ):
        assert _run_until(out, stage) == -signal.SIGKILL, stage
        _nothing_half_written_is_accepted(out)
    assert _run_until(out, None) == 0
    m = read_manifest(out)
    assert m.complete and [a.precision for a in m.artifacts] == ["fp32", "int8"]
    assert all(v.rel_l2 <= v.bound for a in m.artifacts for v in a.verification.values())
    assert not [p for p in out.rglob(".*") if p.name != ".lock"]  # no leftovers


def test_verify_builds_each_denoiser_through_the_loaders_function(tiny_build: Path, monkeypatch) -> None:
    """The build's verification makes its Denoiser with the function the backend's loader calls
    (onnxruntime.ort_denoiser, tensorrt.trt_denoiser), so the build verifies what engine.load serves:
    one call each from verify and from the loader, with equal settings."""
    import engine
    from engine.backends import onnxruntime as ort_backend
    from engine.backends import tensorrt as trt_backend
    from engine.builder import verify

    made = []
    real = ort_backend.ort_denoiser

    def spy(artifact, path, options):
        d = real(artifact, path, options)
        made.append((artifact.precision, path, d.name, d.shape_keys, options.threads, options.device))
        return d

    monkeypatch.setattr(ort_backend, "ort_denoiser", spy)
    manifest = read_manifest(tiny_build)
    artifact = manifest.artifact("int8")
    verify.artifact_denoiser(tiny_build, artifact, manifest.transformer_config()).close()
    with engine.load(tiny_build, precision="int8") as kontext:
        assert kontext.name == "onnxruntime-int8"
    assert len(made) == 2 and made[0] == made[1]  # verify's and the loader's: the same denoiser
    assert made[0][1] == tiny_build / artifact.path

    calls = []
    monkeypatch.setattr(trt_backend, "trt_denoiser", lambda *a, **k: calls.append((a, k)) or "trt")
    planned = dataclasses.replace(artifact, backend="tensorrt")
    assert verify.artifact_denoiser(tiny_build, planned, manifest.transformer_config(), "cuda:1") == "trt"
    (plans, cfg, options), _ = calls[0]
    assert plans == [(planned, tiny_build / artifact.path)] and options.device == "cuda:1"
    assert cfg == manifest.transformer_config()
