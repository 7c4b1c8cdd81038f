"""benchmarks/gpu_bench.sh, the first thing a GPU session runs, in its CPU dry run (tiny preset, 2 steps,
the same phases): so it cannot rot between GPU sessions. About 4 minutes on two busy cores."""

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
    cmd = [
        "bash",
        "benchmarks/gpu_bench.sh",
        "--dry-run",
        "--results-root",
        str(tmp / "results"),
        *args,
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    folders = list((tmp / "results").glob("*/*"))
    assert len(folders) == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, folders[0]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    # A budget no loaded CI machine reaches: every phase runs (what is dropped under a short budget is
    # the last test's business), so the assertions below never depend on this machine's speed.
    return run_script(tmp_path_factory.mktemp("gpu_bench"), budget=1200)


def test_dry_run_succeeds_without_wheels_inside_its_budget(dry_run):
    proc, _ = dry_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "no wheels to install" in proc.stdout  # packages present: the wheel step is skipped
    assert "preflight: " in proc.stdout and "modules import" in proc.stdout  # every import, checked first
    assert "goals (H100" in proc.stdout
    assert "s of a 1200 s budget (within)" in proc.stdout  # wall time against the budget


def test_dry_run_phases_run_in_priority_order(dry_run):
    proc, _ = dry_run
    order = [
        line.split("] ", 1)[1].split(":")[0]
        for line in proc.stdout.splitlines()
        if line.startswith("== gpu_bench [") and " s left" in line
    ]
    assert order == ["headline", "cold", "rest", "attention", "report", "pytest"]


def _runs(folder: Path) -> list[tuple[dict, dict[str, dict]]]:
    out = []
    for jsonl in sorted(folder.glob("tiny-*.jsonl")):
        lines = [json.loads(x) for x in jsonl.read_text().splitlines()]
        out.append((lines[0], {r["contestant"]: r for r in lines[1:]}))
    return out


def test_dry_run_benchmarks_every_contestant_or_says_why(dry_run):
    _, folder = dry_run
    (head_run, head), (rest_run, rest) = _runs(folder)  # the headline first, the rest after cold start
    assert set(head) == {"diffusers", "torch-eager-fp32", "torch-fp8"}
    assert set(rest) == {"torch-eager-fp32+qkv", "torch-eager-bf16"}
    for run in (head_run, rest_run):
        assert run["schedule"] == "sequential" and run["finished"] and run["steps"] == 2
        assert run["isolation"] and set(run["isolation"].values()) == {"ok"}
    for r in (head["diffusers"], head["torch-eager-fp32"], rest["torch-eager-fp32+qkv"]):
        assert r["skipped"] is None and r["stages"]["total"]["n"] == 1
        assert r["cold_start_s"] is not None and r["first_edit_s"] > 0
        assert r["weights_bytes"] is not None and r["dynamo"] is not None
    assert rest["torch-eager-fp32+qkv"]["quality"]["step_rel_l2_max"] < 1e-5  # fused QKV: same math
    assert 0 < rest["torch-eager-bf16"]["quality"]["step_rel_l2_max"] < 0.3  # bf16 vs the fp32 reference
    assert "compute capability >= 8.9" in head["torch-fp8"]["skipped"]  # no FP8 on a CPU, and it says so
    assert "Self CPU" in next(folder.glob("*-profile.txt")).read_text()


def test_dry_run_cold_start_serves_every_key_twice(dry_run):
    _, folder = dry_run
    cold = json.loads((folder / "cold_start.json").read_text())
    keys = len(family_shape_keys("tiny", 32))
    for phase in ("cold", "warm"):
        assert cold[phase]["status"] == "ok", cold[phase]
        assert cold[phase]["keys"] == keys
        assert cold[phase]["edit_bucket"] == "128x128" and cold[phase]["edit_s"] > 0  # both edit
        # from process start: the interpreter and imports count, so it exceeds load + warm-up
        assert cold[phase]["ready_s"] > cold[phase]["import_s"] + cold[phase]["serve_s"] - 0.5
    assert cold["cold_start_s"] == cold["warm"]["ready_s"]


def test_dry_run_report_and_pytest_phase(dry_run):
    _, folder = dry_run
    summary = (folder / "summary.txt").read_text()
    assert "9 keys from a fresh process" in summary and "cold start, warm compile cache" in summary
    assert "torch-eager-bf16" in summary  # both bench runs' tables
    assert "PASS" not in summary and "SHORT" not in summary  # a CPU run: values, no verdicts
    goals = json.loads((folder / "goals.json").read_text())
    assert goals["applies"] is False and len(goals["goals"]) == 7 and len(goals["bench"]) == 2
    attention = json.loads((folder / "attention.json").read_text())
    assert attention["shapes"] == {"tiny": [1, 2, 130, 64]} and attention["contestants"]
    pytest_log = (folder / "pytest_gpu.txt").read_text()
    status = int(pytest_log.rsplit("exit status", 1)[1])
    assert status in (0, 124), pytest_log[-2000:]  # passed, or stopped by its cap on a slow machine
    if status == 0:
        assert "deselected" in pytest_log  # it selected the gpu marker, and those tests skip here


def test_a_short_budget_drops_phases_and_still_ends_inside_it(tmp_path):
    """20 s: under the headline's 20 s minimum once the preflight has run, whatever the machine's speed
    (45 s dropped phases on a busy machine and none on an idle one)."""
    proc, _ = run_script(tmp_path, "--skip-pytest", budget=20)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "under its minimum" in proc.stdout  # the planner said which phases did not fit, and why
    assert "budget (within)" in proc.stdout
