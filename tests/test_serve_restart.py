"""`kontext serve` as a user runs it, in a subprocess: SIGKILL with jobs pending, restart with the same
--data, every accepted job ends Ready; then SIGTERM drains (submits 503, polls answered, jobs finish)
and the process exits 0."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from engine.serve import jobs as J
from engine.serve.keys import new_key
from tests.serve_harness import SAMPLE_B64, free_port, poll

STEPS = 8  # long enough (~0.5 s per job on 2 cores) that jobs are still pending at the kill


def start(data: Path, keys: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    cmd = [
        sys.executable,
        "-m",
        "engine.cli",
        "serve",
        "--model",
        "tiny",
        "--device",
        "cpu",
        "--keys",
        str(keys),
        "--data",
        str(data),
        "--port",
        str(port),
        "--drain-timeout",
        "120",
    ]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    with log.open("ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 180
    while True:
        assert proc.poll() is None, log.read_text()[-3000:]
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "the server did not become ready"
        time.sleep(0.2)


def states(data: Path) -> dict[str, str]:
    store = J.JobStore(data)
    try:
        return {j: store.get(j).state for j in store_ids(store)}  # type: ignore[union-attr]
    finally:
        store.close()


def store_ids(store: J.JobStore) -> list[str]:
    with store._lock:
        return [r[0] for r in store._db.execute("SELECT id FROM jobs")]


@pytest.mark.slow  # server processes killed and restarted: minutes on two cores
def test_sigkill_then_restart_runs_every_accepted_job_and_sigterm_drains(tmp_path: Path) -> None:
    data, keys, log = tmp_path / "data", tmp_path / "keys.jsonl", tmp_path / "server.log"
    key = new_key(keys, "ci")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    body = {"prompt": "add a hat", "input_image": SAMPLE_B64, "steps": STEPS}

    proc = start(data, keys, port, log)
    with httpx.Client(base_url=url, headers={"X-Key": key}, timeout=30) as c:
        ids = [c.post("/v1/flux-kontext-dev", json={**body, "seed": i}).json()["id"] for i in range(6)]
    proc.kill()  # SIGKILL: no handler runs
    proc.wait(30)
    before = states(data)
    assert set(before) == set(ids)
    assert sum(s in J.UNFINISHED for s in before.values()) >= 3, before  # the kill caught jobs pending

    proc = start(data, keys, port, log)
    try:
        with httpx.Client(base_url=url, headers={"X-Key": key}, timeout=30) as c:
            assert [poll(c, i, timeout=120)["status"] for i in ids] == ["Ready"] * 6
            long = {**body, "steps": 50}  # enough queued work (seconds, idle) that the drain can be watched
            more = [
                c.post("/v1/flux-kontext-dev", json={**long, "seed": 10 + i}).json()["id"] for i in range(4)
            ]
            proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 10
            while c.get("/readyz").status_code != 503:  # the signal is handled within milliseconds
                assert time.monotonic() < deadline
                time.sleep(0.01)
            r = c.post("/v1/flux-kontext-dev", json=body)
            assert r.status_code == 503 and "shutting down" in r.json()["detail"]
            assert c.get("/v1/get_result", params={"id": more[0]}).json()["status"] in ("Pending", "Ready")
        assert proc.wait(150) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    after = states(data)
    assert [after[i] for i in ids + more] == [J.READY] * 10
    assert list((data / "inputs").iterdir()) == []  # inputs are dropped once their job ends
