"""The report of a gpu_bench.sh results folder, made on any machine from the files the GPU run returned
(the GPU run itself makes none: its seconds go to measurements): the bench tables, the goals with the
cold-start numbers folded in, the memory plans and what the attention benchmark wrote, printed and saved
as summary.txt and goals.json beside the results.

The script benches in two runs (the headline contestants, then the rest): the goals read the records of
every run (`--all`, ordered by each run's start as recorded, not by file times, which a copy changes),
and a run without the diffusers baseline gets its ratios from the baseline another run measured on the
same bucket and steps.

    python -m benchmarks.gpu_report benchmarks/results/<gpu>/<date> --all   # the returned folder
    python -m benchmarks.gpu_report FOLDER [--since EPOCH | --stem full-123456]  # newest run by default
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from engine.bench.goals import evaluate_goals, format_goals, goals_apply
from engine.files import atomic_write_bytes


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def merge_runs(runs: list[list[dict[str, Any]]]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Several bench runs' lines -> the first run's record and every result, ratios filled in from a
    baseline of another run where a run had none (same bucket and steps)."""
    run_rec = dict(runs[0][0])
    records: list[dict[str, Any]] = []
    for lines in runs:
        steps = lines[0]["steps"]
        records += [{**r, "steps": steps} for r in lines[1:] if r.get("record") == "result"]
    run_rec["contestants"] = [r["contestant"] for r in records]
    base = {(r["bucket"], r["steps"]): r for r in records if r["baseline"] and r["stages"]["total"]}
    for r in records:
        b = base.get((r["bucket"], r["steps"]))
        for key, stage in (("ratio_total", "total"), ("ratio_step", "step")):
            if r.get(key) is None and b is not None and b["stages"][stage] and r["stages"][stage]:
                r[key] = b["stages"][stage]["median_s"] / r["stages"][stage]["median_s"]
    return run_rec, records


MEMORY = "memory.jsonl"  # benchmarks.memory_phase's rows, not a bench run


def _started(path: Path) -> str:
    """A bench run's recorded start (ISO time), '' when unreadable: the order of the runs."""
    try:
        with path.open() as f:
            return str(json.loads(f.readline()).get("started", ""))
    except (OSError, ValueError):
        return ""


def summarize(folder: Path, stem: str | None = None, since: float | None = None, every: bool = False) -> str:
    """The summary text; writes summary.txt and goals.json into `folder`."""
    found = [p for p in folder.glob(f"{stem}.jsonl" if stem else "*.jsonl") if p.name != MEMORY]
    runs = sorted(found, key=lambda p: (_started(p), p.name))
    if since is not None:
        runs = [p for p in runs if p.stat().st_mtime >= since]
    elif stem is None and not every:
        runs = runs[-1:]
    parts: list[str] = []
    goals_json: dict[str, Any] = {}
    cold = _read_json(folder / "cold_start.json")
    if runs:
        loaded = [[json.loads(x) for x in p.read_text().splitlines() if x.strip()] for p in runs]
        run_rec, records = merge_runs(loaded)
        for path in runs:
            table = path.with_suffix(".txt")
            if table.is_file():
                parts.append(table.read_text().split("\n\ngoals (")[0].rstrip())
        goals = evaluate_goals(run_rec, records, cold)
        applies = goals_apply(run_rec)
        parts.append(format_goals(goals, applies))
        names = [p.name for p in runs]
        goals_json = {"bench": names, "applies": applies, "goals": [asdict(g) for g in goals]}
    else:
        parts.append(f"no benchmark results in {folder}")
    if cold is not None:
        for phase in ("cold", "warm"):
            r = cold.get(phase, {})
            if r.get("status") == "ok":
                peak = f", peak {r['peak_memory_gb']:.1f} GB" if "peak_memory_gb" in r else ""
                if phase == "warm":
                    peak += f"; compile cache loaded: {r.get('cache_loaded')}"
                parts.append(
                    f"cold start, {phase} compile cache: load {r['load_s']:.1f} s + {r['keys']} keys "
                    f"{r['warmup_s']:.1f} s; ready {r.get('ready_s', r['serve_s']):.1f} s after process "
                    f"start; one edit {r.get('edit_s', 0):.2f} s{peak} ({cold['contestant']})"
                )
            else:
                parts.append(f"cold start, {phase} compile cache: {r.get('status', 'not run')}")
        if "cold_start_note" in cold:
            parts.append(f"cold start: {cold['cold_start_note']}")
    memory = folder / MEMORY
    if memory.is_file():
        rows = [x for x in memory.read_text().splitlines() if x.strip()]
        parts.append("\n".join([f"memory plans ({MEMORY}, {len(rows)} rows):", *(r[:400] for r in rows)]))
    attention = _read_json(folder / "attention.json")
    if attention is not None:
        parts.append("attention benchmark: " + json.dumps(attention)[:1500])
    text = "\n\n".join(parts)
    atomic_write_bytes(folder / "summary.txt", (text + "\n").encode())
    if goals_json:
        atomic_write_bytes(folder / "goals.json", (json.dumps(goals_json, indent=2) + "\n").encode())
    return text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder", type=Path)
    p.add_argument("--stem", default=None, help="the bench run's file stem (default: the newest)")
    p.add_argument("--since", type=float, default=None, help="every bench run written since (Unix time)")
    p.add_argument("--all", action="store_true", help="every bench run in the folder (a returned GPU run)")
    args = p.parse_args(argv)
    print(summarize(args.folder, args.stem, args.since, every=args.all))
    return 0


if __name__ == "__main__":
    sys.exit(main())
