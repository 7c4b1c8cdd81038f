"""benchmarks/gpu_bench.sh, the first thing a GPU session runs, in its CPU dry run (tiny preset, 2 steps,
the same phases): so it cannot rot between GPU sessions. About 2.5 minutes on two idle cores."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine.buckets import family_shape_keys

ROOT = Path(__file__).resolve().parents[1]


def run_script(tmp: Path, *args: str, budget: int | None = None) -> tuple[subprocess.CompletedProcess, Path]:
    env = dict(os.environ, PYTHON=sys.executable, COMPILE_CACHE=str(tmp / "compile-cache"))
    env.pop("OUT", None)
    if budget is not None:
        env["DRY_RUN_BUDGET_S"] = str(budget)
    cmd = ["bash", "benchmarks/gpu_bench.sh", "--dry-run", "--results-root", str(tmp / "results"), *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    folders = list((tmp / "results").glob("*/*"))
    assert len(folders) == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, folders[0]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    # A budget no loaded CI machine reaches: every phase runs (what is dropped under a short budget is
    # the last test's business), so the assertions below never depend on this machine's speed.
    return run_script(tmp_path_factory.mktemp("gpu_bench"), budget=1200)


def test_dry_run_succeeds_without_wheels(dry_run):
    proc, _ = dry_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "no wheels to install" in proc.stdout  # packages present: the wheel step is skipped
    assert "goals (H100" in proc.stdout and "done in" in proc.stdout


def test_dry_run_benchmarks_every_contestant_or_says_why(dry_run):
    _, folder = dry_run
    (jsonl,) = folder.glob("tiny-*.jsonl")
    lines = [json.loads(x) for x in jsonl.read_text().splitlines()]
    run, results = lines[0], {r["contestant"]: r for r in lines[1:]}
    assert run["schedule"] == "sequential" and run["finished"] and run["steps"] == 2
    assert set(results) == {"diffusers", "torch-eager-fp32", "torch-eager-fp32+qkv", "torch-fp8"}
    for name in ("diffusers", "torch-eager-fp32", "torch-eager-fp32+qkv"):
        r = results[name]
        assert r["skipped"] is None and r["stages"]["total"]["n"] == 1
        assert r["cold_start_s"] is not None and r["first_edit_s"] > 0
    assert results["torch-eager-fp32+qkv"]["quality"]["step_rel_l2_max"] < 1e-5  # fused QKV: same math
    assert "compute capability >= 8.9" in results["torch-fp8"]["skipped"]  # no FP8 on a CPU, and it says so
    assert run["isolation"] and set(run["isolation"].values()) == {"ok"}
    assert "Self CPU" in next(folder.glob("*-profile.txt")).read_text()


def test_dry_run_cold_start_serves_every_key_twice(dry_run):
    _, folder = dry_run
    cold = json.loads((folder / "cold_start.json").read_text())
    keys = len(family_shape_keys("tiny", 32))
    for phase in ("cold", "warm"):
        assert cold[phase]["status"] == "ok", cold[phase]
        assert cold[phase]["keys"] == keys
    assert cold["cold_start_s"] == cold["warm"]["serve_s"]
    assert cold["warm"]["edit_bucket"] == "128x128" and cold["warm"]["edit_s"] > 0


def test_dry_run_report_and_pytest_phase(dry_run):
    _, folder = dry_run
    summary = (folder / "summary.txt").read_text()
    assert "9 keys from a fresh process" in summary and "cold start, warm compile cache" in summary
    goals = json.loads((folder / "goals.json").read_text())
    assert goals["applies"] is False and len(goals["goals"]) == 6
    pytest_log = (folder / "pytest_gpu.txt").read_text()
    status = int(pytest_log.rsplit("exit status", 1)[1])
    assert status in (0, 124), pytest_log[-2000:]  # passed, or stopped by its cap on a slow machine
    if status == 0:
        assert "deselected" in pytest_log  # it selected the gpu marker, and those tests skip here


def test_a_short_budget_drops_phases_and_still_reports(tmp_path):
    proc, folder = run_script(tmp_path, budget=30)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "pytest -m gpu skipped" in proc.stdout and "bench skipped" in proc.stdout
    assert "no benchmark results" in (folder / "summary.txt").read_text()
