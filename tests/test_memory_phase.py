"""benchmarks/memory_phase.py --dry-run: the GPU phase's code (plan, apply, edit, compare) on tiny on a
CPU, rows flushed to memory.jsonl, a refusal recorded, the deadline obeyed, exit 1 on an error row."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks import memory_phase


def rows(folder: Path) -> list[dict]:  # type: ignore[type-arg]
    return [json.loads(line) for line in (folder / "memory.jsonl").read_text().splitlines()]


def test_dry_run_plans_applies_edits_and_compares(tmp_path: Path):
    code = memory_phase.main(
        ["--model", "tiny", "--vram", "16,12,1", "--results", str(tmp_path), "--dry-run"]
    )
    assert code == 0
    got = rows(tmp_path)
    assert [r["plan"] for r in got] == ["resident", "16GiB", "12GiB", "1GiB"]
    resident, sixteen, twelve, one = got
    assert resident["rel_l2"] == 0.0 and resident["error"] is None
    assert sixteen["levers"] == ["t5-cpu", "fp8"] and 0 < sixteen["rel_l2"] < 0.05
    assert twelve["levers"] == ["t5-released", "fp8", "vae-tiled", "streamed"]
    assert twelve["plan_json"]["components"]["transformer"]["placement"] == "streamed"
    assert twelve["rel_l2"] > 0 and twelve["error"] is None
    assert "smallest card that fits has 3 GiB" in one["refused"]


def test_an_error_row_fails_the_run_and_the_deadline_stops_it(tmp_path: Path, monkeypatch):
    def broken(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(memory_phase, "run_edit", broken)
    code = memory_phase.main(["--model", "tiny", "--vram", "16", "--results", str(tmp_path), "--dry-run"])
    assert code == 1
    assert all("out of memory" in r["error"] for r in rows(tmp_path))
    code = memory_phase.main(
        ["--model", "tiny", "--vram", "16", "--results", str(tmp_path), "--dry-run", "--deadline-s", "0"]
    )
    assert code == 0 and rows(tmp_path) == [
        {"model": "tiny", "device": "cpu", "dry_run": True, "plan": "resident", "skipped": "deadline"}
    ]
