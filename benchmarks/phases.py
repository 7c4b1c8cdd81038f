"""The time plan of benchmarks/gpu_bench.sh: one absolute budget, counted from the script's start, shared
by phases in priority order, each with a minimum (below it the phase is not worth starting) and a cap.

When a phase is about to start, the later phases' minimums are reserved (in order, as many as fit), and
the phase may run until `budget - reserved`, at most its cap. It runs only if its minimum fits. So the
reservations add up: the whole script ends inside its budget as long as every phase ends by its
deadline (the script kills one that does not, KILL_GRACE_S after asking it to stop), and a phase that
ends early leaves its time to the next ones. Standard library only: the script calls it between phases.

    python -m benchmarks.phases BUDGET ELAPSED PHASE "name:min:cap,name:min:cap,..."
    -> prints the seconds PHASE may take from now (0: skip it) and why
    python -m benchmarks.phases budget DEVICE_LEFT_S [--warm]
    -> prints the script's budget for a device with DEVICE_LEFT_S seconds of device time left

The device the script runs on (see docs/gpu.md) lends 15 minutes of device time in all, machine start
(1-2 minutes) included, and runs one command for at most 600 s: `budget_for_device` turns the device
time left (the device tool's `status`, read before the call) into the script's budget.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

KILL_GRACE_S = 5  # a phase is asked to stop at its deadline - KILL_GRACE_S, killed at its deadline
CALL_LIMIT_S = 600  # the device tool runs one command for at most this long
MACHINE_START_S = 120  # a machine start, paid from the device time unless the machine is warm
MARGIN_S = 60  # wheels carried over, results brought back, the last kill grace, a slow exit
DEFAULT_BUDGET_S = CALL_LIMIT_S - MARGIN_S  # 540: gpu_bench.sh's default


@dataclass(frozen=True)
class Phase:
    name: str
    min_s: int  # not worth starting with less
    cap_s: int  # never more (0: no cap)


@dataclass(frozen=True)
class Slot:
    """What one phase gets: `seconds` from now (0: skipped) and the reason in words."""

    name: str
    seconds: int
    why: str


def parse_phases(text: str) -> list[Phase]:
    """'headline:150:0,cold:90:150' -> [Phase('headline', 150, 0), Phase('cold', 90, 150)]."""
    out = []
    for item in filter(None, (t.strip() for t in text.split(","))):
        name, lo, cap = item.split(":")
        out.append(Phase(name, int(lo), int(cap)))
    return out


def slot(budget_s: int, elapsed_s: int, phases: list[Phase], name: str) -> Slot:
    """The time phase `name` gets when it starts `elapsed_s` into a `budget_s` run; `phases` are the
    ones still to run, in priority order (`name` first among them or later: those before it are skipped
    phases whose reservations no longer count)."""
    names = [p.name for p in phases]
    if name not in names:
        raise ValueError(f"unknown phase {name!r}; phases: {', '.join(names)}")
    i = names.index(name)
    me, later = phases[i], phases[i + 1 :]
    left = budget_s - elapsed_s
    reserved = 0
    kept = []
    for p in later:  # in priority order: the earlier of two later phases keeps its reservation
        if me.min_s + reserved + p.min_s <= left:
            reserved += p.min_s
            kept.append(p.name)
    room = left - reserved
    if room < me.min_s:
        return Slot(
            name,
            0,
            f"{max(left, 0)} s left, {reserved} s reserved for later phases: "
            f"under its minimum of {me.min_s} s",
        )
    seconds = min(room, me.cap_s) if me.cap_s else room
    kept_text = f" (reserved {reserved} s for {', '.join(kept)})" if kept else ""
    return Slot(name, seconds, f"{seconds} s of {left} s left{kept_text}")


def plan(budget_s: int, phases: list[Phase], durations: dict[str, int] | None = None) -> list[Slot]:
    """Every phase's slot, when each one takes `durations[name]` seconds (default: its whole slot):
    what the script would do, for tests and the dry run's printout."""
    elapsed = 0
    out = []
    for i, p in enumerate(phases):
        s = slot(budget_s, elapsed, phases[i:], p.name)
        out.append(s)
        if s.seconds:
            elapsed += min(s.seconds, (durations or {}).get(p.name, s.seconds))
    return out


def budget_for_device(device_left_s: int, warm: bool = False) -> int:
    """The script's budget when the device has `device_left_s` seconds left before the call: what is left
    after the machine's start (none when `warm`) and a margin, never more than one call may run."""
    left = device_left_s - (0 if warm else MACHINE_START_S) - MARGIN_S
    return max(0, min(DEFAULT_BUDGET_S, left))


def main(argv: list[str]) -> int:
    if argv[:1] == ["budget"] and len(argv) in (2, 3):
        print(budget_for_device(int(argv[1]), warm=argv[2:] == ["--warm"]))
        return 0
    if len(argv) != 4:
        print(__doc__, file=sys.stderr)
        return 2
    budget, elapsed, name, spec = int(argv[0]), int(argv[1]), argv[2], argv[3]
    phases = parse_phases(spec)
    names = [p.name for p in phases]
    s = slot(budget, elapsed, phases[names.index(name) :] if name in names else phases, name)
    print(s.seconds, s.why)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
