"""What benchmarks/gpu_bench.sh reads back from its own results folder between phases. Standard library
only (no torch import: the script calls it between phases).

    python -m benchmarks.results_check missing FOLDER SINCE NAMES
        -> the comma list of NAMES (the headline's contestants, as requested) without a timed result in
           the bench runs written into FOLDER since SINCE (Unix time): the rest phase runs them first
    python -m benchmarks.results_check errors FOLDER SINCE
        -> every error row of the run, one a line; exit 1 if any (the dry run fails on them)

A contestant "without a result" has no timed round: skipped by the deadline, killed mid-run (the phase's
kill), failed mid-edit, or absent because its bench was killed before it opened. Only a refusal of this
machine (`not loaded: ...`, e.g. FP8 on a CPU) is not run again: the same machine refuses it again.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

REFUSED = "not loaded:"  # a machine's or a build's refusal: running it again changes nothing
# Triton 3.6's CPU interpreter (the GPU image's Triton) cannot run our kernel: int() of a 1-element
# array inside its `range` (the GPU compiles the same kernel; Triton 3.9's interpreter runs it, see
# tests/test_kernels.py). A dry run reports such rows as interpreter-only, never as the kernel's error.
INTERPRETER_ONLY = "error: InterpreterError"


def bench_runs(folder: Path, since: float) -> list[list[dict[str, Any]]]:
    """The JSON lines of every bench run written into `folder` since `since`, oldest first."""
    paths = sorted(
        (p for p in folder.glob("*.jsonl") if p.stat().st_mtime >= since and p.name != "memory.jsonl"),
        key=lambda p: p.stat().st_mtime,
    )
    runs = []
    for p in paths:
        lines = [json.loads(x) for x in p.read_text().splitlines() if x.strip()]
        if lines and lines[0].get("record") == "run":
            runs.append(lines)
    return runs


def _canonical(requested: list[str], run_rec: dict[str, Any]) -> dict[str, str]:
    """Requested name -> the name the bench recorded ('torch-eager' -> 'torch-eager-fp32'): by position
    when the run resolved every name one to one, else unchanged."""
    got = run_rec.get("contestants") or []
    if len(got) == len(requested):
        return dict(zip(requested, got, strict=True))
    return {n: n for n in requested}


def missing(runs: list[list[dict[str, Any]]], requested: list[str]) -> list[str]:
    """The requested names without a timed result in any of `runs`, in the requested order."""
    measured: set[str] = set()
    refused: set[str] = set()
    for lines in runs:
        names = _canonical(requested, lines[0])
        for r in lines[1:]:
            if r.get("record") != "result":
                continue
            requested_name = next((k for k, v in names.items() if v == r["contestant"]), None)
            if requested_name is None:
                continue
            if (r.get("stages") or {}).get("total"):
                measured.add(requested_name)
            elif str(r.get("skipped") or "").startswith(REFUSED):
                refused.add(requested_name)
    return [n for n in requested if n not in measured and n not in refused]


def errors(folder: Path, since: float) -> tuple[list[str], list[str]]:
    """(errors, interpreter-only notes) of the run's files: bench rows that failed, unfinished bench runs,
    notes of failed replays, a broken isolation, attention rows in error, a cold start that failed or
    whose second child loaded no cache, memory rows in error or skipped by the deadline."""
    out: list[str] = []
    notes: list[str] = []
    for lines in bench_runs(folder, since):
        run = lines[0]
        tag = f"bench {run.get('run_id')}"
        if not run.get("finished"):
            out.append(f"{tag}: not finished (killed by its deadline?)")
        out += [f"{tag}: note: {n}" for n in run.get("notes", []) if "failed" in n and REFUSED not in n]
        out += [f"{tag}: isolation {k}: {v}" for k, v in (run.get("isolation") or {}).items() if v != "ok"]
        for r in lines[1:]:
            why = str(r.get("skipped") or "")
            if r.get("record") == "result" and why and not why.startswith(REFUSED):
                out.append(f"{tag}: {r['contestant']} {r['bucket']}: {why}")
    attention = _json(folder / "attention.json")
    if attention is not None:
        if not attention.get("finished"):
            out.append("attention: not finished")
        for row in attention.get("contestants", []):
            status = str(row.get("status", ""))
            if status.startswith(INTERPRETER_ONLY) and attention.get("interpreter"):
                notes.append(f"attention {row['name']}: interpreter only: {status}")
            elif status.startswith("error"):
                out.append(f"attention {row['name']}: {status}")
    cold = _json(folder / "cold_start.json")
    if cold is not None:
        for phase in ("cold", "warm"):
            status = cold.get(phase, {}).get("status")
            if status != "ok":
                out.append(f"cold start, {phase} child: {status}")
        if cold.get("warm", {}).get("status") == "ok" and cold["warm"].get("cache_loaded") is not True:
            out.append("cold start: the warm child loaded no compile cache")
    memory = folder / "memory.jsonl"
    if memory.is_file():
        for line in memory.read_text().splitlines():
            row = json.loads(line) if line.strip() else {}
            status = str(row.get("status") or "")
            if row.get("error") or row.get("skipped") or status.startswith(("error", "failed")):
                why = row.get("error") or row.get("skipped") or status
                out.append(f"memory {row.get('plan', '?')}: {why}")
    return out, notes


def _json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def main(argv: list[str]) -> int:
    if len(argv) == 4 and argv[0] == "missing":
        requested = [n.strip() for n in argv[3].split(",") if n.strip()]
        print(",".join(missing(bench_runs(Path(argv[1]), float(argv[2])), requested)))
        return 0
    if len(argv) == 3 and argv[0] == "errors":
        found, notes = errors(Path(argv[1]), float(argv[2]))
        for line in notes:
            print(f"  {line}")
        for line in found:
            print(f"  ERROR {line}")
        return 1 if found else 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
