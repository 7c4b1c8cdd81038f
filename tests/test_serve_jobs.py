"""The job store's crash windows, without a server: what a SIGKILL can leave on disk between a file
and its row, and what the reaper (run at start and periodically) deletes and keeps."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from engine.serve import jobs as J
from engine.serve.params import JobParams

PARAMS = JobParams(prompt="add a hat", seed=0, steps=2, guidance=2.5)


def names(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


def test_a_kill_between_finish_and_unlink_leaves_inputs_the_reaper_deletes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = J.JobStore(tmp_path)
    store.create("done", "k", PARAMS, b"image", references=[b"ref"])
    store.create("queued", "k", PARAMS, b"image", references=[b"ref"])
    with monkeypatch.context() as m:  # the process dies after finish's commit, before its unlink
        m.setattr(store, "_remove_inputs", lambda job_id: None)
        store.finish("done", J.READY, ttl=600, results=[b"result"])
    assert names(store.inputs) == ["done", "done.ref2", "queued", "queued.ref2"]

    assert store.reap() == 0  # nothing expired
    assert names(store.inputs) == ["queued", "queued.ref2"]  # a queued job keeps its inputs to run
    assert names(store.results) == ["done"]
    assert store.get("done").state == J.READY  # type: ignore[union-attr]
    store.close()


def test_orphans_wait_a_minute_and_temporary_files_stay(tmp_path: Path) -> None:
    store = J.JobStore(tmp_path)
    young, old = store.inputs / "young-orphan", store.results / "old-orphan.1"
    temporary = store.inputs / ".partial-write"
    for path in (young, old, temporary):
        path.write_bytes(b"x")
    past = time.time() - 120
    os.utime(old, (past, past))
    os.utime(temporary, (past, past))

    store.reap()
    assert young.exists()  # may be a submit between its file and its commit
    assert not old.exists()
    assert temporary.exists()  # atomic_write_bytes' file, renamed or removed by its writer
    store.close()


def test_expired_jobs_go_with_every_file(tmp_path: Path) -> None:
    store = J.JobStore(tmp_path)
    store.create("a", "k", PARAMS, b"image")
    store.finish("a", J.READY, ttl=10, results=[b"r0", b"r1"])
    assert names(store.results) == ["a", "a.1"]
    assert store.reap(now=time.time() + 5) == 0
    assert store.reap(now=time.time() + 11) == 1
    assert (names(store.inputs), names(store.results), store.get("a")) == ([], [], None)
    store.close()


def test_a_restart_reaps_before_it_recovers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Service.start deletes what the killed run left of its finished jobs, then queues the rest."""
    from engine.serve.service import Service
    from engine.serve.settings import ServeSettings

    store = J.JobStore(tmp_path)
    store.create("done", "k", PARAMS, b"image")
    store.create("queued", "k", PARAMS, b"image")
    monkeypatch.setattr(store, "_remove_inputs", lambda job_id: None)
    store.finish("done", J.READY, ttl=600, results=[b"result"])
    store.close()

    def never_loads() -> None:
        raise RuntimeError("this test runs no engine")

    service = Service(ServeSettings(data=tmp_path), never_loads)  # type: ignore[arg-type]
    service.start()
    assert names(service.store.inputs) == ["queued"]
    assert service.queue.in_flight == 1  # the queued job, recovered
    service.close()


def test_a_kill_between_a_rejection_and_its_unlink_leaves_an_image_the_reaper_deletes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reviewer's rejected image must not outlive the kill: the reaper deletes results of a job whose
    state keeps none, and keeps those of held and ready jobs."""
    store = J.JobStore(tmp_path)
    for job_id in ("rejected", "held", "ready"):
        store.create(job_id, "k", PARAMS, b"image")
        store.finish(job_id, J.READY if job_id == "ready" else J.HELD, ttl=600, results=[b"r0", b"r1"])
    with monkeypatch.context() as m:  # the process dies after review's commit, before its unlink
        m.setattr(store, "_remove_results", lambda job_id: None)
        assert store.review("rejected", approve=False, ttl=600)
    assert store.get("rejected").state == J.CONTENT_MODERATED  # type: ignore[union-attr]
    assert names(store.results) == ["held", "held.1", "ready", "ready.1", "rejected", "rejected.1"]

    store.reap()
    assert names(store.results) == ["held", "held.1", "ready", "ready.1"]
    store.close()
