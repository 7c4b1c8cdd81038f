"""The console script's exit (engine.cli.run): main()'s status, argparse's and Ctrl-C's, with every
atexit handler run and every buffered byte written, and no module teardown after it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine.version import __version__


def _run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "engine.cli", *args], capture_output=True, text=True, timeout=timeout
    )


def test_exit_status_is_mains_and_argparses() -> None:
    ok = _run("--version")
    assert (ok.returncode, ok.stdout.strip()) == (0, f"kontext {__version__}")
    usage = _run("edit", "--bogus")
    assert usage.returncode == 2 and "unrecognized arguments: --bogus" in usage.stderr
    refused = _run("plan", "--model", "full", "--vram", "1")  # main() returns 2 after its own line
    assert refused.returncode == 2 and "the smallest card that fits has 3 GiB" in refused.stderr
    fits = _run("plan", "--model", "full", "--vram", "80")  # several lines on stdout, all flushed
    lines = fits.stdout.splitlines()
    assert fits.returncode == 0 and lines[0].endswith("(everything resident)")
    assert lines[-1].startswith("  expected peak 33.47 GiB")  # the last line too


SCRIPT = """
import atexit, sys
import engine.cli as cli

def handler():  # registered during main(), like multiprocessing's: it must run, its output be kept
    open(sys.argv[1], "w").write("handler ran")
    sys.stdout.write(", then the handler's")  # Python flushed main()'s bytes; these are run()'s to flush

def fake_main():
    atexit.register(handler)
    sys.stdout.write("buffered, no newline")
    if sys.argv[2] == "raise":
        raise RuntimeError("boom")
    if sys.argv[2] == "interrupt":
        raise KeyboardInterrupt
    return int(sys.argv[2])

cli.main = fake_main
cli.run()
"""


@pytest.mark.parametrize(("how", "status"), [("0", 0), ("3", 3), ("raise", 1), ("interrupt", 130)])
def test_handlers_run_and_output_is_flushed_before_the_fast_exit(
    tmp_path: Path, how: str, status: int
) -> None:
    marker = tmp_path / "handler.txt"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # block-buffered, as for users
    r = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(marker), how], capture_output=True, text=True, timeout=60, env=env
    )
    assert r.returncode == status, r.stderr
    assert r.stdout == "buffered, no newline, then the handler's"
    assert marker.read_text() == "handler ran"
    assert ("RuntimeError: boom" in r.stderr) == (how == "raise")  # a traceback still prints


def test_the_console_script_is_run_not_main() -> None:
    """`kontext` (pyproject's [project.scripts]) and `python -m engine.cli` both end through run()."""
    import tomllib

    root = Path(__file__).resolve().parents[1]
    scripts = tomllib.loads((root / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["kontext"] == "engine.cli:run"
    assert "run()" in (root / "engine" / "cli" / "__main__.py").read_text()
