"""The time plan of benchmarks/gpu_bench.sh (benchmarks/phases.py): given a budget and the phases'
minimums and caps, which phases run and until when. The arithmetic only: nothing is timed here."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.phases import (
    CALL_LIMIT_S,
    DEFAULT_BUDGET_S,
    KILL_GRACE_S,
    MACHINE_START_S,
    MARGIN_S,
    budget_for_device,
    parse_phases,
    plan,
    slot,
)

ROOT = Path(__file__).resolve().parents[1]
GPU = parse_phases("headline:150:0,cold:90:150,rest:90:0,attention:20:90,report:10:15,pytest:10:30")


def test_every_phase_runs_inside_the_budget_when_each_takes_its_whole_slot():
    slots = plan(480, GPU)
    assert [s.seconds for s in slots] == [260, 90, 90, 20, 10, 10]  # 480 - the others' minimums first
    assert sum(s.seconds for s in slots) == 480  # the reservations add up: never past the budget


def test_time_a_phase_leaves_goes_to_the_next_ones():
    slots = plan(480, GPU, durations={"headline": 180, "cold": 100})
    by = {s.name: s.seconds for s in slots}
    assert by["headline"] == 260 and by["cold"] == 150  # cold reaches its cap: 70 s were left over
    assert by["rest"] == 480 - 180 - 100 - (20 + 10 + 10)
    assert by["attention"] == 20 and by["pytest"] == 10


def test_an_overrun_drops_the_last_phases_first_never_the_earlier_ones():
    # 400 s gone (start-up was slow): 80 left; cold's 90 s minimum no longer fits, the rest does.
    assert slot(480, 400, GPU[1:], "cold").seconds == 0
    rest = slot(480, 400, GPU[2:], "rest")
    assert rest.seconds == 0 and "under its minimum of 90 s" in rest.why
    attention = slot(480, 400, GPU[3:], "attention")
    assert attention.seconds == 80 - 20 and "reserved 20 s for report, pytest" in attention.why
    assert slot(480, 475, GPU[4:], "report").seconds == 0  # 5 s left: under report's 10 s
    assert slot(480, 470, GPU[4:], "report").seconds == 10  # pytest (last) gives up its reservation


def test_a_phase_with_no_time_left_is_skipped_and_says_why():
    s = slot(30, 22, parse_phases("headline:20:0,report:5:20"), "headline")
    assert s.seconds == 0 and "8 s left" in s.why
    with pytest.raises(ValueError, match="unknown phase"):
        slot(480, 0, GPU, "nope")


def test_the_script_calls_it_from_the_command_line():
    spec = "headline:150:0,cold:90:150,rest:90:0,attention:20:90,report:10:15,pytest:10:30"
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.phases", "480", "30", "headline", spec],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.split()[0] == "230" and "reserved 220 s" in out
    assert KILL_GRACE_S == 5  # gpu_bench.sh's run_phase asks a phase to stop 5 s before its deadline


def test_the_scripts_own_plans_fit_their_budgets():
    """gpu_bench.sh's phase lists (GPU, then dry run): every minimum fits the default budget after 40 s of
    start-up (wheels, the preflight), so a run without overruns reaches every phase, and the slots add up
    to the budget."""
    script = (ROOT / "benchmarks" / "gpu_bench.sh").read_text()
    specs = [
        line.split('phases="', 1)[1].split('"', 1)[0]
        for line in script.splitlines()
        if line.strip().startswith("phases=")
    ]
    assert len(specs) == 2 and "DRY_RUN_BUDGET_S:-1800}" in script  # a CPU compiles for minutes
    for spec in specs:
        phases = parse_phases(spec)
        assert [p.name for p in phases] == ["headline", "cold", "memory", "rest", "attention"]
        assert sum(p.min_s for p in phases) <= DEFAULT_BUDGET_S - 40
        slots = plan(DEFAULT_BUDGET_S - 40, phases)
        assert all(s.seconds > 0 for s in slots) and sum(s.seconds for s in slots) <= DEFAULT_BUDGET_S - 40


def test_the_gpu_plan_fits_the_h100_estimate_with_margin():
    """docs/gpu.md's table at its upper ends: start-up 25 s (one torch import), the headline taking all it
    is given, cold 125 s (both children), memory 75 s (its cap): cold still gets its minimum, and the
    rest phase (bench start-up ~50 s, then the missed headline contestant and the step-cached ones) and
    the attention bench still get theirs."""
    script = (ROOT / "benchmarks" / "gpu_bench.sh").read_text()
    spec = next(line.split('"')[1] for line in script.splitlines() if line.startswith("phases="))
    phases = parse_phases(spec)
    mins = {p.name: p.min_s for p in phases}
    assert sum(mins.values()) + 25 <= DEFAULT_BUDGET_S - 40  # 40 s of margin at the minimums
    assert mins["cold"] >= 125 + 40  # the estimate's upper end and a margin: the cold child saves
    took = {"cold": 125, "memory": 75}
    slots = {s.name: s for s in plan(DEFAULT_BUDGET_S - 25, phases, took)}
    assert slots["headline"].seconds >= 155  # the estimate's lower end; a later contestant may move on
    assert slots["cold"].seconds >= mins["cold"]
    assert slots["rest"].seconds >= 100 and slots["attention"].seconds >= mins["attention"]
    assert sum(min(s.seconds, took.get(s.name, s.seconds)) for s in slots.values()) <= DEFAULT_BUDGET_S - 25


def test_the_budget_from_the_device_time_left():
    assert DEFAULT_BUDGET_S == CALL_LIMIT_S - MARGIN_S == 540  # one device call runs at most 600 s
    assert budget_for_device(900) == 540  # a fresh 15 minutes: the call's limit decides
    assert budget_for_device(500) == 500 - MACHINE_START_S - MARGIN_S  # a slow start took its share
    assert budget_for_device(500, warm=True) == 440  # a warm machine has no start to pay
    assert budget_for_device(100) == 0  # nothing fits: the script skips every phase
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.phases", "budget", "400", "--warm"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.strip() == "340"
