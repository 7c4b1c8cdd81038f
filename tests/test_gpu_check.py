"""The prepared GPU check runs end to end on a CPU at tiny scale and says why it skips what it skips."""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from torch import nn

from benchmarks import gpu_check
from engine.buckets import ShapeKey

ROOT = Path(__file__).resolve().parents[1]
TINY_SHAPES = ("b1_t64_c64_x32", "b1_t16_c16_x32")


def run_check(tmp_path: Path, *extra: str) -> dict:
    out = tmp_path / "gpu_check.json"
    args = ["--scale", "tiny", "--device", "cpu", "--out", str(out), *extra]
    cmd = [sys.executable, "-m", "benchmarks.gpu_check", *args]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "contestant" in proc.stdout  # the table is printed last
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return run_check(tmp_path_factory.mktemp("gpu_check"))


def test_report_lists_every_contestant_at_both_shapes(tiny_report: dict) -> None:
    names = [(c["name"], c["shape"]) for c in tiny_report["contestants"]]
    expected = {(f"{p} {m}", s) for p in ("bf16", "fp8") for m in ("eager", "compile") for s in TINY_SHAPES}
    assert len(names) == 8
    assert set(names) == expected
    assert tiny_report["finished"] is True


def test_eager_bf16_numbers_are_finite(tiny_report: dict) -> None:
    eager = [c for c in tiny_report["contestants"] if c["name"] == "bf16 eager"]
    for c in eager:
        assert c["status"] == "ok"
        for key in ("median_ms", "p90_ms", "first_call_s", "tflops"):
            assert math.isfinite(c[key]) and c[key] > 0, key
        assert c["p90_ms"] >= c["median_ms"]
        assert c["iters"] == 10
        assert c["output_finite"] is True
        assert c["rel_l2_vs_bf16_eager"] == 0.0  # its own reference
        assert c["peak_mem_gb"] is None and c["pct_bf16_peak"] is None  # no GPU, no known peak


def test_skips_say_why(tiny_report: dict) -> None:
    by_name = {(c["name"], c["shape"]): c["status"] for c in tiny_report["contestants"]}
    for shape in TINY_SHAPES:
        assert by_name[("bf16 compile", shape)].startswith("skipped: compile is off on a CPU")
        for mode in ("eager", "compile"):
            status = by_name[(f"fp8 {mode}", shape)]
            assert status.startswith("skipped: fp8 needs") and "8.9" in status


def test_meta_describes_the_run(tiny_report: dict) -> None:
    meta = tiny_report["meta"]
    assert meta["scale"] == "tiny"
    assert meta["device"]["type"] == "cpu"
    assert meta["versions"]["torch"] and meta["versions"]["diffusers"]
    assert meta["config"]["num_layers"] == 1
    assert [s["key"] for s in meta["shapes"]] == list(TINY_SHAPES)
    assert all(s["tflop"] > 0 for s in meta["shapes"])
    assert meta["compile"] == {"scope": "regional", "mode": "default", "dynamic": False}
    assert tiny_report["build"]["params"] > 0


def test_zero_budget_skips_everything_and_still_writes(tmp_path: Path) -> None:
    report = run_check(tmp_path, "--budget-s", "0")
    assert report["finished"] is False
    assert all(c["status"].startswith("skipped: budget") for c in report["contestants"])


def test_importing_the_check_pulls_in_no_heavy_package() -> None:
    code = (
        "import json, sys, benchmarks.gpu_check; "
        "print(json.dumps([m for m in sys.modules if m.split('.')[0] in ('engine', 'diffusers', 'torchao')]))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    loaded = set(json.loads(out.stdout.strip().splitlines()[-1]))
    assert loaded == {"engine", "engine.buckets", "engine.config", "engine.errors", "engine.flops"}


@pytest.mark.parametrize(
    ("name", "bf16"),
    [
        ("NVIDIA H100 80GB HBM3", 989.0),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA H200", 989.0),
        ("NVIDIA H20", 148.0),
        ("NVIDIA L40S", 362.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("Some Future GPU", None),
    ],
)
def test_device_peaks_match_longest_name_first(name: str, bf16: float | None) -> None:
    assert gpu_check.gpu_peaks(name)[0] == bf16  # engine.flops.gpu_peaks, as the check imports it


def _cpu_state(budget_s: float) -> gpu_check.State:
    import torch

    shapes = [ShapeKey(1, 4096, 4096, 512), ShapeKey(1, 1024, 1024, 512)]
    state = gpu_check.State(nn.Identity(), torch.device("cpu"), [], shapes, gpu_check.Deadline(budget_s))
    state.eager_ms = {0: 1.0, 1: 1.0}  # measured eager times make run estimates tiny
    return state


def test_budget_skips_a_compile_that_cannot_fit() -> None:
    args = argparse.Namespace(scale="full", warmup=2, iters=10, compile_scope="regional", compile_on_cpu=True)
    state = _cpu_state(budget_s=30)  # less than one guessed compile
    assert gpu_check.skip_reason(gpu_check.PLAN[0], 0, state, args, set()) is None  # eager: fits
    reason = gpu_check.skip_reason(gpu_check.PLAN[2], 2, state, args, set())  # bf16 compile at 1024^2
    assert reason is not None and reason.startswith("skipped: budget")


def test_budget_keeps_time_for_priority_one_work() -> None:
    args = argparse.Namespace(scale="full", warmup=2, iters=10, compile_scope="regional", compile_on_cpu=True)
    guess = gpu_check.COMPILE_GUESS_S["regional"]
    # Room for one compile and a half: the 0.25 MP compile (priority 2) would eat the time kept for the
    # 1024^2 one (priority 1), so it is skipped; with room for both it runs (fp8 is blocked on a CPU).
    state = _cpu_state(budget_s=1.5 * guess)
    assert gpu_check.skip_reason(gpu_check.PLAN[3], 3, state, args, set()) is None  # nothing later to keep
    bf16_compile_b = gpu_check.Contestant("bf16", True, 1, 2)
    plan = (bf16_compile_b, gpu_check.PLAN[2])
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gpu_check, "PLAN", plan)
        assert gpu_check.skip_reason(bf16_compile_b, 0, state, args, set()) is not None
        roomy = _cpu_state(budget_s=3 * guess)
        assert gpu_check.skip_reason(bf16_compile_b, 0, roomy, args, set()) is None
