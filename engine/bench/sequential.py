"""The sequential schedule of `kontext bench` (GPU runs of the 12B model): one contestant at a time.

Each contestant is opened, warmed up, timed over every bucket, checked for quality, closed and freed, so
device memory holds the shared components and ONE contestant. Whatever one contestant raises (a capture
error, an inductor or Triton failure, OOM, a torchao assert) becomes its entries' reason; it is freed and
the next one runs. The deadline counts from the start of the process (runner.BenchConfig.deadline_s).

Budget savers, since a GPU session is minutes long:
- the baseline skips its warm-up: it runs the shared modules the reference edit has just warmed up;
- timed rounds beyond the first run only while three more still fit before the deadline (median of 3
  when the budget allows, of 1 when it does not);
- quality replays QUALITY_STEPS evenly spread steps, not all of them.

`on_progress` is called after every timed round (and after each contestant): `kontext bench` writes its
results there, so a contestant killed mid-run (the GPU script's phase deadline) keeps its timed rounds.
"""

from __future__ import annotations

import logging
import time

from tqdm.auto import tqdm

from .contestants import Contestant, EditRunner
from .isolation import fingerprint
from .quality import Golden
from .run import (
    BenchRun,
    Case,
    Entry,
    Progress,
    case_golden,
    check_isolation,
    failure,
    free_memory,
    measure,
    open_contestant,
    profile_step,
    serves,
    timed_run,
)
from .timing import PeakMemory, memory_in_use, process_age_s

log = logging.getLogger(__name__)

QUALITY_STEPS = 7  # replayed steps per contestant and bucket (first, last and 5 between)
HELD_WARN_BYTES = 1 << 30  # more than this left allocated after a contestant is freed: a warning


def time_left(deadline_s: float | None) -> float | None:
    """Seconds until the deadline, counted from the start of this process; None without one."""
    return None if deadline_s is None else deadline_s - process_age_s()


def run_sequential(run: BenchRun, cases: list[Case], on_progress: Progress | None) -> None:
    """One contestant at a time: open, warm up and time every bucket, replay, close, free."""
    config = run.config
    goldens = {case.bucket: case_golden(run, case) for case in cases}
    baseline_print = fingerprint(run.components.transformer)
    meter = PeakMemory(run.device)
    shared = memory_in_use(run.device)  # components + goldens: no contestant's own
    last_cost: float | None = None
    bar = tqdm(run.contestants, desc="bench", unit="contestant", disable=not config.progress)
    for contestant in bar:
        entries = [Entry(contestant, case.bucket, case.key) for case in cases]
        run.entries.extend(entries)
        left = time_left(config.deadline_s)
        if left is not None and (left <= 0 or (last_cost is not None and last_cost > left)):
            need = f", the last contestant took {last_cost:.0f} s" if last_cost is not None else ""
            for e in entries:
                e.skipped = f"deadline: {max(left, 0):.0f} s left{need}"
            log.warning("%s skipped: %s", contestant.name, entries[0].skipped)
            if on_progress is not None:
                on_progress(run)
            continue
        t0 = time.monotonic()
        try:
            _one_contestant(run, contestant, cases, entries, goldens, meter, on_progress)
        except Exception as e:  # a contestant's failure is its result, never the end of the run
            why = f"failed: {failure(e)}"
            for entry in entries:
                if not entry.samples and not entry.skipped:
                    entry.skipped = why
            run.notes.append(f"{contestant.name} {why}")
            log.warning("%s %s", contestant.name, why, exc_info=True)
        check_isolation(run, contestant.name, baseline_print)
        held = memory_in_use(run.device) - shared
        if held > HELD_WARN_BYTES:
            log.warning(
                "%s freed, but %.1f GiB above the shared components is still held: the next "
                "contestant's peak includes it",
                contestant.name,
                held / 2**30,
            )
        last_cost = time.monotonic() - t0
        if on_progress is not None:
            on_progress(run)


def _one_contestant(
    run: BenchRun,
    contestant: Contestant,
    cases: list[Case],
    entries: list[Entry],
    goldens: dict[tuple[int, int], Golden],
    meter: PeakMemory,
    on_progress: Progress | None = None,
) -> None:
    config = run.config
    reset_dynamo_counters()
    base = memory_in_use(run.device)
    for entry in entries:
        entry.memory_base = base
    runner = open_contestant(run, contestant, entries)
    if runner is None:
        return
    try:
        for case, entry in zip(cases, entries, strict=True):
            if not serves(runner, case.key, entry):
                continue
            _time_bucket(run, runner, case, entry, meter, on_progress)
            if entry.skipped:
                continue
            measure(entry, runner, goldens[case.bucket], run, QUALITY_STEPS)
            if contestant.name in config.profile:
                try:
                    entry.profile = profile_step(runner, goldens[case.bucket])
                except Exception as e:
                    run.notes.append(f"{contestant.name}: profile failed: {failure(e)}")
    finally:
        counts = dynamo_counters()
        for entry in entries:
            entry.dynamo = counts
        try:
            runner.close()
        except Exception as e:
            run.notes.append(f"{contestant.name}: close failed: {failure(e)}")
        del runner
        free_memory(run.device)


def _time_bucket(
    run: BenchRun,
    runner: EditRunner,
    case: Case,
    entry: Entry,
    meter: PeakMemory,
    on_progress: Progress | None = None,
) -> None:
    """Warm-up (none for the baseline, see the module doc), then up to `repeats` timed rounds, each
    reported to `on_progress` as soon as it is measured."""
    config = run.config
    warmup = 0 if runner.contestant.is_baseline else config.warmup
    for _ in range(warmup):
        if timed_run(runner, case, config.prompt, entry, meter, keep=False) is None:
            return
    for rnd in range(config.repeats):
        seconds = timed_run(runner, case, config.prompt, entry, meter, keep=True)
        if seconds is None:
            return
        if on_progress is not None:
            on_progress(run)
        left = time_left(config.deadline_s)
        more = config.repeats - rnd - 1
        if more and left is not None and left < 3 * seconds:
            run.notes.append(
                f"{runner.contestant.name} {case.bucket[0]}x{case.bucket[1]}: {rnd + 1} of "
                f"{config.repeats} rounds ({left:.0f} s left)"
            )
            return


def reset_dynamo_counters() -> None:
    """Zero dynamo's counters so the next read covers one contestant."""
    from torch._dynamo import utils

    utils.counters.clear()
    utils.guard_failures.clear()


def dynamo_counters() -> dict[str, int]:
    """Since the last reset: graphs dynamo captured, graph breaks, recompiles (guard failures)."""
    from torch._dynamo import utils

    c = utils.counters
    return {
        "graphs": int(c["stats"]["unique_graphs"]),
        "graph_breaks": int(sum(c["graph_break"].values())),
        "recompiles": int(sum(len(v) for v in utils.guard_failures.values())),
        "frames_ok": int(c["frames"]["ok"]),
    }
