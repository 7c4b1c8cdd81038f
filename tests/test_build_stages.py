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
from pathlib import Path

import pytest
import torch

from engine.builder.builder import BuildOptions, build
from engine.builder.quantize import RECIPES
from engine.builder.stages import outputs_intact
from engine.calibration import CalibrationSpec
from engine.manifest import MANIFEST_NAME, read_manifest, write_manifest
from engine.model.components import Components, fingerprint_module

from .conftest import BUILD_TEST_CALIBRATION

PRECISIONS = ("fp32", "int8", "fp8")
ALL_STAGES = (
    {"export", "calibrate", "golden"}
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
    assert _build(copy, tiny, caplog) == set()
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


@pytest.mark.slow  # calibration and two quantized recipes run again
def test_calibration_change_reruns_calibration_and_quantized_recipes(
    copy: Path, tiny: Components, caplog: pytest.LogCaptureFixture
) -> None:
    spec = CalibrationSpec(**{**BUILD_TEST_CALIBRATION, "seed": 1})  # type: ignore[arg-type]
    ran = _build(copy, tiny, caplog, calibration=spec)
    assert ran == {"calibrate"} | {
        f"{s}:{p}" for p in ("int8", "fp8") for s in ("quantize", "compile", "verify")
    }


@pytest.mark.slow  # every stage of a build runs again
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


@pytest.mark.slow  # two partial builds
def test_a_build_from_before_the_golden_rename_keeps_its_trajectory(
    copy: Path, tiny: Components, caplog: pytest.LogCaptureFixture
) -> None:
    """A build whose golden stage was recorded as "reference" (verify/reference.npz, before the rename):
    the next build that runs adopts it: the golden stage does not run, its bytes are kept."""
    m = read_manifest(copy)
    stages = dict(m.stages)
    golden = stages.pop("golden")
    (copy / "verify/golden.npz").rename(copy / "verify/reference.npz")
    old = "verify/reference.npz"
    stages["reference"] = dataclasses.replace(
        golden,
        outputs=(old,),
        output_sha256={old: golden.output_sha256["verify/golden.npz"]},
        output_stat={old: golden.output_stat["verify/golden.npz"]},
    )
    write_manifest(copy, dataclasses.replace(m, stages=stages))
    int8 = dataclasses.replace(RECIPES["int8"], calibration_method="max")  # a request that runs stages
    ran = _build(copy, tiny, caplog, recipes={"int8": int8})
    assert "golden" not in ran and {"quantize:int8", "compile:int8", "verify:int8"} <= ran
    after = read_manifest(copy)
    assert "reference" not in after.stages and after.stages["golden"].output_sha256 == golden.output_sha256
    assert outputs_intact(copy, after.stages["golden"])
    # negative control: without the old stage's file the golden stage runs again
    (copy / "verify/reference.npz").unlink()
    (copy / "verify/golden.npz").unlink()
    write_manifest(copy, dataclasses.replace(m, stages=stages))
    assert "golden" in _build(copy, tiny, caplog, recipes={"int8": int8})


def test_the_default_folder_is_never_replaced_by_another_recipe(
    built_tiny: Path, tiny: Components, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`kontext build --refs 0,1` (or --batch, --lora) without --out, over the default build/tiny: a
    one-line refusal naming --out, before any model is loaded; the same recipe there is a no-op."""
    from engine.errors import BuildError
    from engine.model.lora import LoraSpec

    monkeypatch.chdir(tmp_path)
    shutil.copytree(built_tiny, tmp_path / "build/tiny")
    before = read_manifest(tmp_path / "build/tiny")
    lora = tmp_path / "style.safetensors"
    lora.write_bytes(b"not loaded: the refusal comes first")
    common = {"precisions": PRECISIONS, "family": "tiny", "backend": "onnxruntime", "components": tiny}
    for change, words in (
        ({"refs": (0, 1)}, "refs 0, batch 1, LoRAs none; this one: refs 0,1, batch 1"),
        ({"batches": (1, 2)}, "this one: refs 0, batch 1,2, LoRAs none"),
        ({"loras": (LoraSpec(lora, 0.5),)}, "this one: refs 0, batch 1, LoRAs style.safetensors:0.5"),
    ):
        with pytest.raises(BuildError, match=r"build/tiny holds a build of another recipe") as e:
            build("tiny", options=_options(**change), **common)  # type: ignore[arg-type]
        assert words in str(e.value) and "--build DIR" in str(e.value) and "\n" not in str(e.value)
    assert read_manifest(tmp_path / "build/tiny") == before  # untouched
    # negative control: the default recipe into the default folder is the no-op it always was
    assert build("tiny", options=_options(), **common).to_json() == before.to_json()  # type: ignore[arg-type]


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
def test_sigkill_during_each_stage_then_resume(tmp_path: Path, tiny_build: Path) -> None:
    out = tmp_path / "killed"
    for stage in (
        "export",
        "calibrate",
        "golden",
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
    # resumed eight times, it wrote what one uninterrupted build writes (tiny_build: the same request)
    whole = read_manifest(tiny_build)
    assert m.onnx_sha256 == whole.onnx_sha256
    assert [(a.path, a.sha256) for a in m.artifacts] == [(a.path, a.sha256) for a in whole.artifacts]
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
