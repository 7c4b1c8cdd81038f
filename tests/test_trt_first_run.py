"""benchmarks/trt_first_run.py without TensorRT: its runner, table, JSON and the two verdicts it prints."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.trt_first_run import (
    CHECKS,
    Check,
    format_table,
    profiles_verdict,
    run_check,
    weights_shared,
    write_report,
)


def test_a_failing_check_is_recorded_and_the_run_goes_on(tmp_path: Path) -> None:
    ok = run_check("G1", "profile shapes", lambda: ("pass", "4 profiles", {"n": 4}))
    bad = run_check("G2", "weights", lambda: 1 / 0)  # type: ignore[arg-type, return-value]
    odd = run_check("G3", "keys", lambda: ("maybe", "", {}))
    assert (ok.status, ok.data) == ("pass", {"n": 4})
    assert bad.status == "error" and "ZeroDivisionError" in bad.summary and "traceback" in bad.data
    assert odd.status == "error" and "unknown status" in odd.summary
    table = format_table([ok, bad])
    assert table.splitlines()[0].split() == ["check", "status", "seconds", "summary"]
    assert "G2 weights" in table and "error" in table
    write_report(tmp_path / "r.json", [ok, bad], {"model": "tiny"})
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["meta"] == {"model": "tiny"} and [c["id"] for c in report["checks"]] == ["G1", "G2"]


def test_verdicts() -> None:
    assert weights_shared(1_000, 1_050) and not weights_shared(1_000, 1_900)  # a second copy doubles it
    static, dynamic = {"a": 9.0, "b": 9.5, "c": 10.0}, {"a": 10.0, "b": 10.0, "c": 10.0}
    assert profiles_verdict(static, dynamic).startswith("static")  # median key 5% faster
    assert profiles_verdict({"a": 9.9, "b": 10.0}, {"a": 10.0, "b": 10.0}).startswith("dynamic")  # within 3%
    assert profiles_verdict({"a": 1.0}, {"b": 1.0}).startswith("undecided")


def test_every_audit_check_is_run() -> None:
    assert sorted(c[0] for c in CHECKS) == [f"G{i}" for i in range(1, 10)]
    assert Check("G1", "x").status == "info"
