"""benchmarks/gpu_bench.sh's decisions, with a stand-in for python: the measuring phases (the preflight,
kontext bench, cold start, memory, attention) write canned results in milliseconds, and the script's own
helpers (phases.py, results_check.py) run for real. So the phase order, the rest phase's list, where the
files go, the budget and the dry run's verdict are tested on any machine, at any load, without a timed
assertion. The dry run itself (the real phases, tiny preset) runs once, in `make rehearse`.

Also the pieces the script reads back: results_check.py, cold_start.py's headline, gpu_report.py --all.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks import results_check
from benchmarks.cold_start import headline
from benchmarks.phases import DEFAULT_BUDGET_S

ROOT = Path(__file__).resolve().parents[1]

STUB = r'''#!PYTHON
"""python, for gpu_bench.sh: its measuring phases write canned results; everything else runs for real."""
import json, os, sys
from pathlib import Path

argv = sys.argv[1:]
env = os.environ


def record(kind):
    with open(env["STUB_LOG"], "a") as f:
        f.write(json.dumps([kind, argv]) + "\n")


def arg(name):
    return argv[argv.index(name) + 1]


def names(text):
    return [n for n in text.split(",") if n]


if argv == ["-c", "import diffusers, torchao"]:
    sys.exit(0)
if argv[:2] == ["-m", "benchmarks.preflight"]:
    record("preflight")
    print("preflight: 26 modules import (0.1 s)")
    print(f"results: {arg('--results-root')}/stub-gpu/{arg('--day')}")
    refused = names(env.get("STUB_REFUSE", ""))
    for n in names(arg("--contestants")):
        if n in refused:
            print(f"refused {n}: ConfigError: unknown lever")
    print("contestants: " + ",".join(n for n in names(arg("--contestants")) if n not in refused))
    print(f"optional benchmarks.memory_phase: {env.get('STUB_MEMORY', 'ok')}")
    print(f"optional engine.caching: {env.get('STUB_CACHING', 'absent')}")
    sys.exit(0)
if argv[:1] == ["benchmarks/bench.py"]:
    record("bench")
    folder = Path(arg("--results-dir"))
    n = len(list(folder.glob("stub-*.jsonl")))
    skips = dict(x.split("=", 1) for x in names(env.get("STUB_SKIP", "")))  # name=reason
    run = {"record": "run", "run_id": f"run{n}", "started": f"2026-12-07T10:0{n}:00",
           "contestants": names(arg("--contestants")), "finished": True, "notes": [], "isolation": {},
           "steps": 28, "buckets": ["1024x1024"], "device_type": "cuda"}
    rows = [{"record": "result", "contestant": c, "bucket": "1024x1024", "skipped": skips.get(c),
             "stages": {"total": None if c in skips else {"median_s": 1.0}}}
            for c in names(arg("--contestants"))]
    (folder / f"stub-{n}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [run, *rows]))
    sys.exit(0)
if argv[:2] == ["-m", "benchmarks.cold_start"]:
    record("cold")
    loaded = env.get("STUB_CACHE_LOADED", "1") == "1"
    child = {"status": "ok", "ready_s": 30.0}
    Path(arg("--out")).write_text(json.dumps(
        {"cold": child, "warm": {**child, "cache_loaded": loaded}}))
    sys.exit(0)
if argv[:2] == ["-m", "benchmarks.memory_phase"]:
    record("memory")
    Path(arg("--results"), "memory.jsonl").write_text(json.dumps({"vram": 24, "fits": True}) + "\n")
    sys.exit(0)
if argv[:2] == ["-m", "benchmarks.attention_bench"]:
    record("attention")
    status = env.get("STUB_ATTENTION", "ok")
    rows = [{"name": "triton bf16", "status": status}]
    Path(arg("--out")).write_text(json.dumps({"finished": True, "interpreter": False, "contestants": rows}))
    sys.exit(0)
os.execv(sys.executable, [sys.executable, *argv])
'''


def run_script(tmp: Path, *args: str, **stub_env: str) -> tuple[subprocess.CompletedProcess, list, Path]:
    """gpu_bench.sh with the stand-in python; (the process, the calls it made, the results folder)."""
    tmp.mkdir(parents=True, exist_ok=True)
    stub = tmp / "python"
    stub.write_text(STUB.replace("PYTHON", sys.executable, 1))
    stub.chmod(0o755)
    calls = tmp / "calls.jsonl"
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "DRY_RUN_BUDGET_S")}
    env.update(PYTHON=str(stub), STUB_LOG=str(calls), COMPILE_CACHE=str(tmp / "cc"), **stub_env)
    cmd = ["bash", "benchmarks/gpu_bench.sh", "--results-root", str(tmp / "results"), *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    made = [json.loads(x) for x in calls.read_text().splitlines()] if calls.is_file() else []
    folders = list((tmp / "results").glob("*/*"))
    assert len(folders) <= 1, folders
    return proc, made, folders[0] if folders else tmp / "results"


def _arg(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def _phases(proc: subprocess.CompletedProcess) -> list[str]:
    """The phases the planner was asked about, in order (each logs its slot)."""
    return [
        line.split("] ", 1)[1].split(":")[0]
        for line in proc.stdout.splitlines()
        if line.startswith("== gpu_bench [") and (" s left" in line or "under its minimum" in line)
    ]


def test_the_gpu_run_order_one_folder_and_no_report_or_pytest(tmp_path):
    proc, calls, folder = run_script(tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"of {DEFAULT_BUDGET_S} s]" in proc.stdout  # the default budget: phases.DEFAULT_BUDGET_S
    assert _phases(proc) == ["headline", "cold", "memory", "rest", "attention"]
    assert [kind for kind, _ in calls] == ["preflight", "bench", "cold", "memory", "bench", "attention"]
    assert "gpu_report" not in proc.stdout.split("the report, on any machine")[0]  # no report phase
    benches = [argv for kind, argv in calls if kind == "bench"]
    # one folder for every phase, named once at the start (a run crossing midnight keeps it)
    assert {_arg(b, "--results-dir") for b in benches} == {str(folder)}
    assert folder.name == _arg(calls[0][1], "--day")  # the preflight made it: the script's start date
    assert _arg(benches[0], "--profile") == ""  # the profiler never runs in the headline
    rest = _arg(benches[1], "--contestants").split(",")
    assert _arg(benches[1], "--profile") == rest[-1] == "torch-fp8+all"  # the rest's last one
    cold = next(argv for kind, argv in calls if kind == "cold")
    assert _arg(cold, "--torch-mode") == "fp8" and "--one-key" not in cold
    memory = next(argv for kind, argv in calls if kind == "memory")
    assert _arg(memory, "--model") == "full" and _arg(memory, "--vram") == "24,16"
    assert _arg(memory, "--results") == str(folder) and int(_arg(memory, "--deadline-s")) > 0


def test_a_headline_contestant_without_a_result_opens_the_rest(tmp_path):
    """Skipped by the deadline (or killed, or failed): it is measured first in the rest phase. A refusal
    of this machine (not loaded) is not run again. The step-cached contestants come right after."""
    skip = "torch-fp8+qkv+graphs=deadline: 12 s left,torch-fp8=not loaded: no FP8 here"
    proc, calls, _ = run_script(tmp_path, STUB_SKIP=skip, STUB_CACHING="ok")
    assert proc.returncode == 0, proc.stdout[-3000:]
    rest = _arg([argv for kind, argv in calls if kind == "bench"][1], "--contestants").split(",")
    assert rest[:3] == [
        "torch-fp8+qkv+graphs",
        "torch-fp8+qkv+cache=magcache-kontext",
        "torch-fp8+qkv+cache=fbc",
    ]
    assert "torch-fp8" not in rest and rest.count("torch-fp8+qkv+graphs") == 1
    assert "first in the rest: torch-fp8+qkv+graphs" in proc.stdout


def test_step_cached_names_are_dropped_while_their_branch_is_absent(tmp_path):
    refuse = "torch-fp8+qkv+cache=magcache-kontext,torch-fp8+qkv+cache=fbc"
    proc, calls, _ = run_script(tmp_path, STUB_REFUSE=refuse, STUB_CACHING="absent")
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "engine/caching is not in this checkout" in proc.stdout
    rest = _arg([argv for kind, argv in calls if kind == "bench"][1], "--contestants")
    assert "+cache=" not in rest and rest.startswith("torch-fp8+graphs")


def test_the_dry_run_fails_on_a_refused_name_once_the_caches_exist(tmp_path):
    refuse = "torch-eager+qkv+cache=fbc"
    proc, _, _ = run_script(tmp_path, "--dry-run", STUB_REFUSE=refuse, STUB_CACHING="ok")
    assert proc.returncode == 1 and "FAILED: contestant torch-eager+qkv+cache=fbc" in proc.stdout


def test_the_dry_run_runs_the_same_phases_cpu_sized_and_passes_when_clean(tmp_path):
    proc, calls, _ = run_script(tmp_path, "--dry-run")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert _phases(proc) == ["headline", "cold", "memory", "rest", "attention"]
    cold = next(argv for kind, argv in calls if kind == "cold")
    assert _arg(cold, "--torch-mode") == "compile" and "--one-key" in cold  # it compiles, one key
    memory = next(argv for kind, argv in calls if kind == "memory")
    assert _arg(memory, "--model") == "tiny" and "--dry-run" in memory
    assert "checking the results" in proc.stdout and "s of a 1800 s budget (within)" in proc.stdout


@pytest.mark.parametrize(
    ("stub_env", "says"),
    [
        ({"STUB_ATTENTION": "error: RuntimeError: boom"}, "ERROR attention triton bf16: error: RuntimeError"),
        ({"STUB_CACHE_LOADED": "0"}, "ERROR cold start: the warm child loaded no compile cache"),
        ({"STUB_SKIP": "diffusers=failed: RuntimeError: x"}, "ERROR bench run0: diffusers 1024x1024: failed"),
        ({"STUB_MEMORY": "broken: ImportError: no engine.memory"}, "FAILED: benchmarks.memory_phase: broken"),
        ({"DRY_RUN_BUDGET_S": "10"}, "skipped by the budget"),
    ],
)
def test_the_dry_run_fails_on_error_rows_missing_modules_and_skipped_phases(tmp_path, stub_env, says):
    proc, _, _ = run_script(tmp_path, "--dry-run", **stub_env)
    assert proc.returncode == 1, proc.stdout[-3000:]
    assert says in proc.stdout


def test_on_a_gpu_an_absent_memory_module_drops_its_phase_and_a_short_budget_drops_phases(tmp_path):
    """150 s: the headline's minimum (150 s) and cold's (170 s) can never fit, whatever the machine's
    speed; rest's 60 s and attention's 40 s fit unless the stand-ins took 50 s to start."""
    proc, calls, _ = run_script(tmp_path, "--budget-s", "150", STUB_MEMORY="absent")
    assert proc.returncode == 0, proc.stdout[-3000:]  # on a GPU what was measured still counts
    assert "memory_phase.py is not in this checkout" in proc.stdout and "memory" not in _phases(proc)
    assert "under its minimum of 150 s" in proc.stdout and "under its minimum of 170 s" in proc.stdout
    # so the rest phase measures the headline's contestants (none has a result) before its own
    assert [kind for kind, _ in calls] == ["preflight", "bench", "attention"]
    rest = _arg(calls[1][1], "--contestants").split(",")
    assert rest[:3] == ["diffusers", "torch-fp8", "torch-fp8+qkv+graphs"]


def test_the_budget_comes_from_the_device_time_left(tmp_path):
    proc, _, _ = run_script(tmp_path, "--device-left-s", "400", "--skip-cold-start", STUB_MEMORY="absent")
    assert "of 220 s]" in proc.stdout  # 400 - 120 (machine start) - 60 (margin)
    warm, _, _ = run_script(tmp_path / "w", "--device-left-s", "400", "--warm", "--skip-attention")
    assert "of 340 s]" in warm.stdout


# ----------------------------------------------------------------------------- what the script reads back


def _bench_file(folder: Path, stem: str, started: str, rows: list[tuple[str, str | None]], names=None):
    run = {"record": "run", "run_id": stem, "started": started, "finished": True, "notes": [],
           "isolation": {}, "contestants": names or [n for n, _ in rows]}  # fmt: skip
    results = [
        {"record": "result", "contestant": n, "bucket": "128x128", "skipped": why,
         "stages": {"total": None if why is not None else {"median_s": 1.0}}}
        for n, why in rows
    ]  # fmt: skip
    (folder / f"{stem}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [run, *results]))


def test_missing_maps_requested_names_and_keeps_refusals_out(tmp_path):
    _bench_file(
        tmp_path,
        "tiny-1",
        "2026-12-07T10:00:00",
        [("diffusers", None), ("torch-eager-fp32", "deadline: 3 s left"), ("torch-fp8", "not loaded: cpu")],
    )
    runs = results_check.bench_runs(tmp_path, 0)
    # 'torch-eager' was recorded as torch-eager-fp32; a name the killed bench never reached is missing too
    assert results_check.missing(runs, ["diffusers", "torch-eager", "torch-fp8"]) == ["torch-eager"]
    assert results_check.missing([], ["diffusers", "torch-fp8"]) == ["diffusers", "torch-fp8"]
    assert results_check.bench_runs(tmp_path, time.time() + 60) == []  # only what this run wrote


def test_errors_reads_every_file_and_keeps_the_interpreter_apart(tmp_path):
    _bench_file(
        tmp_path, "tiny-1", "2026-12-07T10:00:00", [("diffusers", None), ("torch-fp8", "not loaded: cpu")]
    )
    (tmp_path / "attention.json").write_text(
        json.dumps(
            {
                "finished": True,
                "interpreter": True,
                "contestants": [
                    {"name": "sdpa math", "status": "ok"},
                    {"name": "triton bf16", "status": "error: InterpreterError: int() of an array"},
                ],
            }
        )
    )
    cold = {"cold": {"status": "ok"}, "warm": {"status": "ok", "cache_loaded": True}}
    (tmp_path / "cold_start.json").write_text(json.dumps(cold))
    found, notes = results_check.errors(tmp_path, 0)
    assert found == [] and notes == [
        "attention triton bf16: interpreter only: error: InterpreterError: int() of an array"
    ]
    # negative control: the same row on a GPU (no interpreter) is an error; so is an unfinished run
    attention = json.loads((tmp_path / "attention.json").read_text())
    (tmp_path / "attention.json").write_text(json.dumps({**attention, "interpreter": False}))
    _bench_file(tmp_path, "tiny-2", "2026-12-07T10:01:00", [("torch-eager-fp32", "failed: RuntimeError: x")])
    found, _ = results_check.errors(tmp_path, 0)
    assert found == [
        "bench tiny-2: torch-eager-fp32 128x128: failed: RuntimeError: x",
        "attention triton bf16: error: InterpreterError: int() of an array",
    ]


def test_no_warm_number_without_a_loaded_cache():
    cold = {"status": "ok", "ready_s": 90.0, "peak_memory_gb": 20.0}
    assert headline(cold, {"status": "ok", "ready_s": 40.0, "cache_loaded": True})["cold_start_s"] == 40.0
    ran_cold = headline(cold, {"status": "ok", "ready_s": 85.0, "cache_loaded": False})
    assert "cold_start_s" not in ran_cold and "loaded no compile cache" in ran_cold["cold_start_note"]
    assert ran_cold["peak_memory_gb"] is not None  # the memory number does not need the cache


def test_the_report_on_a_cpu_reads_every_run_in_their_recorded_order(tmp_path):
    """--all: the returned folder's runs ordered by their recorded start (copies change file times)."""
    from benchmarks.gpu_report import summarize

    rec = {"bucket": "1024x1024", "baseline": False, "quality": None, "ratio_total": None, "ratio_step": None}
    for stem, started, name, base in (("b", "2026-12-07T10:05:00", "torch-fp8", False),
                                      ("a", "2026-12-07T10:00:00", "diffusers", True)):  # fmt: skip
        run = {
            "record": "run",
            "started": started,
            "steps": 28,
            "buckets": ["1024x1024"],
            "device_type": "cuda",
        }
        row = {**rec, "record": "result", "contestant": name, "baseline": base,
               "stages": {"total": {"median_s": 12.0 if base else 4.0}, "step": None}}  # fmt: skip
        (tmp_path / f"{stem}.jsonl").write_text(json.dumps(run) + "\n" + json.dumps(row) + "\n")
        os.utime(tmp_path / f"{stem}.jsonl", (0, 0))  # as a copy may leave them
    (tmp_path / "memory.jsonl").write_text(json.dumps({"vram": 16, "fits": True}) + "\n")
    text = summarize(tmp_path, every=True)
    goals = json.loads((tmp_path / "goals.json").read_text())
    assert goals["bench"] == ["a.jsonl", "b.jsonl"]  # memory.jsonl is not a bench run
    speedup = next(g for g in goals["goals"] if g["name"] == "speed-up over diffusers eager")
    assert speedup["measured"] == pytest.approx(3.0)  # torch-fp8's ratio from the other run's baseline
    assert "memory plans (memory.jsonl, 1 rows)" in text
    summarize(tmp_path)  # without --all: the newest run only
    assert json.loads((tmp_path / "goals.json").read_text())["bench"] == ["b.jsonl"]


# ----------------------------------------------------------------------------- the preflight's pieces


def test_preflight_checks_names_as_well_as_imports(monkeypatch):
    from benchmarks import preflight

    assert "torchao.quantization" in preflight.NAMES  # the names engine/backends/fp8.py imports
    assert preflight.check(("json",)) == []
    monkeypatch.setitem(preflight.NAMES, "json", ("dumps", "no_such_name"))
    (failure,) = preflight.check(("json",))
    assert failure.startswith("json: AttributeError") and "no_such_name" in failure


def test_preflight_tells_an_absent_module_from_a_broken_one(tmp_path, monkeypatch):
    from benchmarks import preflight

    (tmp_path / "broken_phase_mod.py").write_text("raise ImportError('needs engine.memory')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert preflight.optional("benchmarks.no_such_phase") == "absent"
    assert preflight.optional("broken_phase_mod") == "broken: ImportError: needs engine.memory"
    assert preflight.optional("benchmarks.phases") == "ok"


def test_preflight_refuses_what_kontext_bench_would_refuse():
    from benchmarks import preflight

    refused = preflight.refusals(["torch-eager+qkv", "torch-eager+nope", "diffusers"], "cpu")
    assert (
        list(refused) == ["torch-eager+nope"] and "unknown torch lever 'nope'" in refused["torch-eager+nope"]
    )
