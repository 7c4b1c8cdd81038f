"""How fast `kontext` answers: each command run as a whole process several times (after a warm-up
run), its wall time's median, min and max and its CPU seconds (user + sys, which the machine's load
moves least), against the targets of docs/usage.md ("How fast the CLI
answers"):

- a usage error, a missing file, an unwritable output path: under 1 s;
- `kontext keys new`: under 1 s;
- a tiny edit: its wall time at most the edit's own time (the `wrote` line's seconds) plus 3 s.

Then the import floor: the seconds `import torch`, `torch._dynamo` and the model's classes take in a
fresh interpreter, which a tiny edit pays before its first tensor.

    .venv/bin/python -m benchmarks.cli_latency                       # this checkout, 5 runs each
    .venv/bin/python -m benchmarks.cli_latency --repo ../other-checkout --runs 3

`--repo` times another checkout of the engine with the same interpreter (its code first on the path),
to compare before and after a change on the same machine, in the same minutes. The machine's load
moves every number: quote medians, and compare two checkouts in one call.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WROTE = re.compile(r"^wrote .*?, (\d+(?:\.\d+)?)s, ", re.MULTILINE)  # the edit's own seconds


@dataclass
class Case:
    name: str
    args: list[str]
    target: str  # "1s" (wall under a second) or "own+3s" (wall minus the edit's own time under 3 s)
    walls: list[float] = field(default_factory=list)
    cpus: list[float] = field(default_factory=list)  # user + sys seconds: what the load moves least
    owns: list[float] = field(default_factory=list)
    codes: set[int] = field(default_factory=set)


def cases(tmp: Path) -> list[Case]:
    return [
        Case("usage error (edit --bogus)", ["edit", "--bogus"], "1s"),
        Case("missing image", ["edit", str(tmp / "nothere.png"), "a hat"], "1s"),
        Case("unwritable -o /proc/out.png", ["edit", "-o", "/proc/out.png", "--no-progress"], "1s"),
        Case("keys new", ["keys", "new", "--file", str(tmp / "keys.jsonl")], "1s"),
        Case("tiny edit", ["edit", "-o", str(tmp / "out.png"), "--no-progress"], "own+3s"),
    ]


def run_once(case: Case, repo: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(repo)}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    r = subprocess.run(  # cwd: `-m` puts the working folder first on the path
        [sys.executable, "-m", "engine.cli", *case.args],
        capture_output=True,
        text=True,
        env=env,
        cwd=repo,
        timeout=600,
    )
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    case.walls.append(wall)
    case.cpus.append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
    case.codes.add(r.returncode)
    if case.target == "own+3s":
        found = WROTE.search(r.stdout)
        if found is None:
            raise SystemExit(f"cli_latency: {case.name}: no 'wrote' line in its output: {r.stderr[-300:]}")
        case.owns.append(float(found.group(1)))


def measure(repo: Path, runs: int, warmup: int) -> list[Case]:
    with tempfile.TemporaryDirectory(prefix="cli-latency-") as folder:
        chosen = cases(Path(folder))
        for case in chosen:
            for i in range(warmup + runs):
                run_once(case, repo)
                if i < warmup:  # the warm-up fills the page cache and Python's bytecode cache
                    case.walls.pop()
                    case.cpus.pop()
                    if case.owns:
                        case.owns.pop()
    return chosen


def table(repo: Path, chosen: list[Case]) -> str:
    rows = [
        (
            "command",
            "exit",
            "wall s med",
            "min",
            "max",
            "cpu s med",
            "own s med",
            "over own s",
            "target",
            "met",
        )
    ]
    for c in chosen:
        med = statistics.median(c.walls)
        own = statistics.median(c.owns) if c.owns else None
        over = statistics.median(w - o for w, o in zip(c.walls, c.owns, strict=True)) if c.owns else None
        met = (over is not None and over <= 3.0) if c.target == "own+3s" else med < 1.0
        rows.append(
            (
                c.name,
                ",".join(str(x) for x in sorted(c.codes)),
                f"{med:.2f}",
                f"{min(c.walls):.2f}",
                f"{max(c.walls):.2f}",
                f"{statistics.median(c.cpus):.2f}",
                "-" if own is None else f"{own:.2f}",
                "-" if over is None else f"{over:.2f}",
                "wall < 1 s" if c.target == "1s" else "wall - own <= 3 s",
                "yes" if met else "NO",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(
            v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in rows
    ]
    lines.insert(1, "-" * len(lines[0]))
    runs = len(chosen[0].walls)
    load = os.getloadavg()[0]
    cpus = os.cpu_count()
    head = f"{repo} ({runs} runs each after a warm-up; {cpus} CPUs; load average {load:.1f} at the end)"
    return head + "\n" + "\n".join(lines)


# What a tiny edit must import before its first tensor, cumulative, timed inside one fresh interpreter.
IMPORT_STEPS = (
    ("import torch", "import torch"),
    ("+ torch._dynamo (diffusers imports it)", "import torch._dynamo"),
    (
        "+ the model classes (diffusers', transformers')",
        "from diffusers import AutoencoderKL, FluxTransformer2DModel\n"
        "from transformers import CLIPTextModel, T5EncoderModel",
    ),
)


def import_floor(runs: int) -> str:
    """The seconds of each import step (cumulative, medians of `runs` fresh interpreters): the part of
    a tiny edit's overhead that no order of our own imports can remove."""
    code = "import time, sys\nt0 = time.perf_counter()\n" + "".join(
        f"{stmt}\nprint(time.perf_counter() - t0)\n" for _, stmt in IMPORT_STEPS
    )
    samples = []
    for _ in range(runs):
        r = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True
        )
        samples.append([float(x) for x in r.stdout.split()])
    rows = [
        f"  {name}: {statistics.median(s[i] for s in samples):.2f} s"
        for i, (name, _) in enumerate(IMPORT_STEPS)
    ]
    return f"imports, cumulative ({runs} fresh interpreters, medians):\n" + "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument(
        "--repo", type=Path, action="append", default=None, help="checkout(s) to time (default: this one)"
    )
    p.add_argument("--runs", type=int, default=5, help="counted runs per command")
    p.add_argument("--warmup", type=int, default=1, help="runs not counted, first")
    args = p.parse_args(argv)
    for repo in args.repo or [ROOT]:
        print(table(repo.resolve(), measure(repo.resolve(), args.runs, args.warmup)), flush=True)
    print(import_floor(args.runs), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
