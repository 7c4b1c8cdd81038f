"""The last step of gpu_bench.sh: one summary of a results folder (the bench table, the goals with the
cold-start numbers folded in, what the attention benchmark wrote), printed and saved as summary.txt and
goals.json beside the results.

    python -m benchmarks.gpu_report benchmarks/results/<gpu>/<date> [--stem full-123456]
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


def summarize(folder: Path, stem: str | None = None) -> str:
    """The summary text; writes summary.txt and goals.json into `folder`."""
    runs = sorted(folder.glob(f"{stem}.jsonl" if stem else "*.jsonl"), key=lambda p: p.stat().st_mtime)
    parts: list[str] = []
    goals_json: dict[str, Any] = {}
    cold = _read_json(folder / "cold_start.json")
    if runs:
        lines = [json.loads(x) for x in runs[-1].read_text().splitlines() if x.strip()]
        run_rec, records = lines[0], [r for r in lines[1:] if r.get("record") == "result"]
        table = runs[-1].with_suffix(".txt")
        if table.is_file():
            parts.append(table.read_text().split("\n\ngoals (")[0].rstrip())
        goals = evaluate_goals(run_rec, records, cold)
        applies = goals_apply(run_rec)
        parts.append(format_goals(goals, applies))
        goals_json = {"bench": runs[-1].name, "applies": applies, "goals": [asdict(g) for g in goals]}
    else:
        parts.append(f"no benchmark results in {folder}")
    if cold is not None:
        for phase in ("cold", "warm"):
            r = cold.get(phase, {})
            if r.get("status") == "ok":
                parts.append(
                    f"cold start, {phase} compile cache: load {r['load_s']:.1f} s + {r['keys']} keys "
                    f"{r['warmup_s']:.1f} s = {r['serve_s']:.1f} s ({cold['contestant']})"
                )
            else:
                parts.append(f"cold start, {phase} compile cache: {r.get('status', 'not run')}")
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
    args = p.parse_args(argv)
    print(summarize(args.folder, args.stem))
    return 0


if __name__ == "__main__":
    sys.exit(main())
