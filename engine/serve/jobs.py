"""The job store: one SQLite database in WAL mode under --data, plus the input and result files
beside it. A job is committed before its submit is answered, so a SIGKILL never loses one: at the
next start every job still queued or running is queued again (`unfinished`).

States: queued -> running -> ready | held (review) | error | request_moderated | content_moderated.
A held job becomes ready (approved) or content_moderated (rejected). Files are written with
engine.files (atomic) and deleted with their row when the result expires.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..files import atomic_write_bytes
from .params import JobParams

log = logging.getLogger(__name__)

QUEUED, RUNNING, READY, HELD = "queued", "running", "ready", "held"
ERROR, REQUEST_MODERATED, CONTENT_MODERATED = "error", "request_moderated", "content_moderated"
UNFINISHED = (QUEUED, RUNNING)
FINISHED = (READY, HELD, ERROR, REQUEST_MODERATED, CONTENT_MODERATED)
WITH_RESULTS = (*UNFINISHED, READY, HELD)  # the states whose result files are kept (or being written)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    state TEXT NOT NULL,
    params TEXT NOT NULL,          -- JSON of params.JobParams
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    expires REAL,                  -- finished + TTL; the reaper deletes the job after
    sample_token TEXT UNIQUE,      -- the unguessable part of the sample URL
    media_type TEXT,
    details TEXT,                  -- JSON: error message, moderation verdict, review note
    timings TEXT                   -- JSON: seconds per stage
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state);
CREATE INDEX IF NOT EXISTS jobs_expires ON jobs(expires);
"""


@dataclass(frozen=True)
class Job:
    id: str
    owner: str
    state: str
    params: JobParams
    created: float
    started: float | None
    finished: float | None
    expires: float | None
    sample_token: str | None
    media_type: str | None
    details: dict[str, Any] | None
    timings: dict[str, float] | None


class JobStore:
    """Thread-safe: one connection behind a lock (SQLite serializes writers anyway)."""

    def __init__(self, data: Path) -> None:
        self.data = data
        self.inputs = data / "inputs"
        self.results = data / "results"
        for d in (self.inputs, self.results):
            d.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(data / "jobs.sqlite3", check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # a committed submit survives a power cut too
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # ------------------------------------------------------------------ files

    def input_path(self, job_id: str) -> Path:
        return self.inputs / job_id

    def reference_paths(self, job_id: str) -> list[Path]:
        """input_image_2..4 of a job, in order: inputs/<id>.ref2, .ref3, .ref4."""
        return sorted(self.inputs.glob(f"{job_id}.ref[2-4]"))

    def _remove_inputs(self, job_id: str) -> None:
        for path in (self.input_path(job_id), *self.reference_paths(job_id)):
            path.unlink(missing_ok=True)

    def result_path(self, job_id: str, index: int = 0) -> Path:
        """Image `index` of a job's result: results/<id>, then results/<id>.1, .2, ... (num_images > 1)."""
        return self.results / (job_id if index == 0 else f"{job_id}.{index}")

    def result_paths(self, job_id: str) -> list[Path]:
        """Every image of a job's result, in order."""
        extra = sorted(self.results.glob(f"{job_id}.*"), key=lambda p: int(p.suffix[1:] or 0))
        return [self.result_path(job_id), *extra]

    def _remove_results(self, job_id: str) -> None:
        for path in self.result_paths(job_id):
            path.unlink(missing_ok=True)

    # ------------------------------------------------------------------ writes

    def create(
        self, job_id: str, owner: str, params: JobParams, image: bytes, references: Sequence[bytes] = ()
    ) -> None:
        """Write the input images, then commit the job: a job row always has its inputs on disk."""
        for k, data in enumerate(references, start=2):
            atomic_write_bytes(self.inputs / f"{job_id}.ref{k}", data)
        atomic_write_bytes(self.input_path(job_id), image)
        with self._lock:
            self._db.execute(
                "INSERT INTO jobs (id, owner, state, params, created) VALUES (?, ?, ?, ?, ?)",
                (job_id, owner, QUEUED, params.to_json(), time.time()),
            )

    def start(self, job_id: str) -> None:
        with self._lock:
            self._db.execute("UPDATE jobs SET state=?, started=? WHERE id=?", (RUNNING, time.time(), job_id))

    def finish(
        self,
        job_id: str,
        state: str,
        *,
        ttl: float,
        results: Sequence[bytes] = (),
        media_type: str | None = None,
        sample_token: str | None = None,
        details: dict[str, Any] | None = None,
        timings: dict[str, float] | None = None,
    ) -> None:
        """End a job: write its result files first (if any), then commit the state, then drop the inputs."""
        if state not in FINISHED:
            raise ValueError(f"not a finished state: {state}")
        for index, data in enumerate(results):
            atomic_write_bytes(self.result_path(job_id, index), data)
        now = time.time()
        expires = None if state == HELD else now + ttl  # a held result waits for its reviewer
        with self._lock:
            self._db.execute(
                "UPDATE jobs SET state=?, finished=?, expires=?, media_type=?, sample_token=?, details=?, "
                "timings=? WHERE id=?",
                (
                    state,
                    now,
                    expires,
                    media_type,
                    sample_token,
                    None if details is None else json.dumps(details),
                    None if timings is None else json.dumps(timings),
                    job_id,
                ),
            )
        self._remove_inputs(job_id)

    def review(self, job_id: str, approve: bool, *, ttl: float) -> bool:
        """Approve (-> ready) or reject (-> content_moderated, file deleted) a held job. False if not held."""
        now = time.time()
        state = READY if approve else CONTENT_MODERATED
        details = None if approve else json.dumps({"review": "rejected by a reviewer"})
        with self._lock:
            cur = self._db.execute(
                "UPDATE jobs SET state=?, expires=?, details=? WHERE id=? AND state=?",
                (state, now + ttl, details, job_id, HELD),
            )
        if cur.rowcount and not approve:
            self._remove_results(job_id)
        return cur.rowcount == 1

    def requeue(self, job_id: str) -> None:
        with self._lock:
            self._db.execute("UPDATE jobs SET state=?, started=NULL WHERE id=?", (QUEUED, job_id))

    def reap(self, now: float | None = None) -> int:
        """Delete expired jobs with their files, the inputs of finished jobs, the results of jobs that
        keep none (a rejected review), and input/result files no job owns. Returns jobs deleted.
        Each but expiry is what a kill between a commit and its unlink, or a file and its row, leaves."""
        now = time.time() if now is None else now
        with self._lock:
            ids = [
                r[0]
                for r in self._db.execute(
                    "SELECT id FROM jobs WHERE expires IS NOT NULL AND expires<?", (now,)
                )
            ]
            self._db.executemany("DELETE FROM jobs WHERE id=?", [(i,) for i in ids])
            state_of = dict(self._db.execute("SELECT id, state FROM jobs").fetchall())
        for job_id in ids:
            self._remove_results(job_id)
            self._remove_inputs(job_id)
        for d in (self.inputs, self.results):
            for f in d.iterdir():
                with contextlib.suppress(FileNotFoundError):
                    owner_id = f.name.split(".", 1)[0]  # <id>, <id>.ref2 or <id>.1
                    if f.name.startswith("."):  # atomic_write_bytes' temporary files
                        continue
                    state = state_of.get(owner_id)
                    finished_input = d is self.inputs and state in FINISHED  # killed after finish's commit
                    dropped_result = d is self.results and state is not None and state not in WITH_RESULTS
                    orphan = state is None and f.stat().st_mtime < now - 60  # killed before create's commit
                    if finished_input or dropped_result or orphan:
                        f.unlink()
        if ids:
            log.info("reaped %d expired job(s)", len(ids))
        return len(ids)

    # ------------------------------------------------------------------ reads

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
        return None if row is None else _job(row)

    def by_sample_token(self, token: str) -> Job | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE sample_token=?", (token,)).fetchone()
        return None if row is None else _job(row)

    def unfinished(self) -> list[Job]:
        """Jobs accepted and not finished, oldest first (restart recovery)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM jobs WHERE state IN (?, ?) ORDER BY created", UNFINISHED
            ).fetchall()
        return [_job(r) for r in rows]

    def held(self) -> list[Job]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM jobs WHERE state=? ORDER BY created", (HELD,)).fetchall()
        return [_job(r) for r in rows]

    def counts(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall()
        return {state: n for state, n in rows}


def _job(row: tuple[Any, ...]) -> Job:
    (id_, owner, state, params, created, started, finished, expires, token, media, details, timings) = row
    return Job(
        id_,
        owner,
        state,
        JobParams.from_json(params),
        created,
        started,
        finished,
        expires,
        token,
        media,
        None if details is None else json.loads(details),
        None if timings is None else json.loads(timings),
    )
