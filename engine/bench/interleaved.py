"""The interleaved schedule of `kontext bench` (the default): every contestant loaded for the whole run.

Per bucket: warm-up edits (discarded), then `repeats` rounds; each round runs every contestant once, in
an order rotated by one per round, so drift and position effects (noise on our CPUs is +-20-30% per run)
fall on everyone alike. A contestant that cannot open, or raises during an edit, is recorded with the
reason and the others go on.
"""

from __future__ import annotations

from tqdm.auto import tqdm

from .contestants import EditRunner
from .isolation import fingerprint
from .run import (
    BenchRun,
    Case,
    Entry,
    case_golden,
    check_isolation,
    failure,
    measure,
    open_contestant,
    serves,
    timed_run,
)
from .timing import PeakMemory, memory_in_use


def run_interleaved(run: BenchRun, cases: list[Case]) -> None:
    config = run.config
    baseline_print = fingerprint(run.components.transformer)
    base = memory_in_use(run.device)  # the shared components: every contestant's weights count above it
    runners, unopened = _open_all(run, cases)
    meter = PeakMemory(run.device)
    total = len(cases) * (config.warmup + config.repeats) * len(runners)
    bar = tqdm(total=total, desc="bench", unit="edit", disable=not config.progress)
    for i, case in enumerate(cases):
        entries = {
            r.contestant.name: Entry(r.contestant, case.bucket, case.key, memory_base=base) for r in runners
        }
        for name, entry in entries.items():
            entry.weights_bytes = run.weights_bytes.get(name)
        if i == 0:
            for name, entry in entries.items():
                entry.load_s = run.load_seconds.get(name)
        live = [r for r in runners if serves(r, case.key, entries[r.contestant.name])]
        bar.total -= (config.warmup + config.repeats) * (len(runners) - len(live))
        for rnd in range(config.warmup + config.repeats):
            warm = rnd < config.warmup
            order = live[rnd % len(live) :] + live[: rnd % len(live)] if live else []
            for runner in order:
                entry = entries[runner.contestant.name]
                if not entry.skipped:
                    phase = "warm-up" if warm else f"round {rnd - config.warmup + 1}"
                    bar.set_postfix_str(f"{case.bucket[0]}x{case.bucket[1]} {phase} {runner.contestant.name}")
                    timed_run(runner, case, run.config.prompt, entry, meter, keep=not warm)
                bar.update()
        bar.set_postfix_str(f"{case.bucket[0]}x{case.bucket[1]} quality vs the reference")
        golden = case_golden(run, case)
        for runner in live:
            measure(entries[runner.contestant.name], runner, golden, run)
        run.entries.extend(entries.values())
    run.entries.extend(unopened)
    bar.close()
    for runner in runners:
        try:
            runner.close()
        except Exception as e:
            run.notes.append(f"{runner.contestant.name}: close failed: {failure(e)}")
    check_isolation(run, "all contestants", baseline_print)


def _open_all(run: BenchRun, cases: list[Case]) -> tuple[list[EditRunner], list[Entry]]:
    """Every contestant opened; those that could not be, as entries saying why."""
    runners, unopened = [], []
    for c in tqdm(run.contestants, desc="load contestants", leave=False, disable=not run.config.progress):
        probes = [Entry(c, case.bucket, case.key) for case in cases]
        runner = open_contestant(run, c, probes)
        if runner is None:
            unopened.extend(probes)
        else:
            runners.append(runner)
    return runners, unopened
