"""The load benchmark's own logic on a short run against a real server on 127.0.0.1: every phase
runs, the overload level past the queue bound draws 429s and nothing else fails, the server's RSS is
sampled, and the table and JSON are written."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from engine.bench.loadtest import LoadConfig, format_table, rss_trend, run_loadtest, write_report
from tests.serve_harness import SAMPLE, serve, tiny_editor


@pytest.mark.slow  # every phase of the load benchmark against a real server: about a minute
def test_short_loadtest(tmp_path: Path) -> None:
    with serve(tmp_path, tiny_editor, queue=2) as s:
        config = LoadConfig(
            url=s.url,
            key=s.keys["alice"],
            image=SAMPLE,
            steps=1,
            queue=2,
            requests=2,
            soak=6,
            open_seconds=1.5,
            levels=(1, 2),
            pid=os.getpid(),
        )
        report = run_loadtest(config)
    names = [p.name for p in report.phases]
    assert names[:3] == ["closed c=1", "closed c=2", "closed c=6"]
    assert names[3].startswith("open 0.5x") and names[-1] == "soak 6"
    assert sum(p.errors for p in report.phases) == 0, [p.error_samples for p in report.phases]
    overload = report.phases[2]
    assert overload.offered == 12 and overload.rejected > 0 and overload.ok + overload.rejected == 12
    assert report.capacity_images_per_s > 0
    first = report.phases[0]
    assert first.ok == 2 and set(first.queue_wait) == set(first.service) == {"p50", "p95", "p99"}
    assert report.phases[-1].ok == 6 and len(report.phases[-1].rss_mb) >= 1
    table, files = write_report(report, tmp_path / "results")
    assert "closed c=6" in table and table == format_table(report)
    saved = json.loads(files[1].read_text())
    assert saved["phases"][2]["rejected"] == overload.rejected
    assert files[0].read_text().strip() == table


def test_rss_trend() -> None:
    flat = [(float(t), 100.0) for t in range(20)]
    slope, growth = rss_trend(flat, 100, 19.0)
    assert abs(slope) < 1e-9 and growth == 0.0  # type: ignore[arg-type]
    growing = [(float(t), 100.0 + t) for t in range(20)]  # 1 MiB/s over 19 s and 100 requests
    slope, growth = rss_trend(growing, 100, 19.0)
    assert abs(slope - 19.0) < 1e-9  # type: ignore[operator]
    assert abs(growth - 18.0 / 100.5 * 100) < 1e-9  # type: ignore[operator]  # medians of the first and last two
    assert rss_trend(flat[:3], 100, 2.0) == (None, None)
