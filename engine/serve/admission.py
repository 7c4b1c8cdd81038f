"""The bounded work queue: admission control (a global bound on accepted, unfinished jobs and one per
API key), a FIFO of job ids, and N worker threads that run each job to its end.

Admission counts a job from its accept until its end, so the bound is BFL's "tasks in flight", not
just the jobs waiting. Refusing at the door keeps memory flat under any overload: a refused request
costs one 429, never a queued image.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """The server has `capacity` jobs in flight."""


class KeyLimit(Exception):
    """This API key has its limit of jobs in flight."""


class WorkQueue:
    def __init__(self, run: Callable[[str], None], *, workers: int, capacity: int, per_key: int) -> None:
        self._run = run
        self.workers = workers
        self.capacity = capacity
        self.per_key = per_key
        self._fifo: queue.Queue[tuple[str, str] | None] = queue.Queue()
        self._lock = threading.Condition()
        self._owners: dict[str, str] = {}  # job id -> owner, for every job in flight
        self._per_owner: Counter[str] = Counter()
        self._running = 0
        self._threads: list[threading.Thread] = []
        self._service_ewma: float | None = None  # seconds per job, for Retry-After
        self._closed = False

    # ------------------------------------------------------------------ admission

    def admit(self, job_id: str, owner: str) -> None:
        """Reserve a slot for `job_id` or raise QueueFull / KeyLimit. Call `put` or `release` after."""
        with self._lock:
            if len(self._owners) >= self.capacity:
                raise QueueFull
            if self._per_owner[owner] >= self.per_key:
                raise KeyLimit
            self._owners[job_id] = owner
            self._per_owner[owner] += 1

    def release(self, job_id: str) -> None:
        """Give back a slot whose job was never queued (its submit failed after admission)."""
        with self._lock:
            self._forget(job_id)

    def put(self, job_id: str) -> None:
        self._fifo.put((job_id, self._owners[job_id]))

    def requeue(self, job_id: str, owner: str) -> None:
        """Queue a job accepted before a restart: it holds a slot even past the bound."""
        with self._lock:
            self._owners[job_id] = owner
            self._per_owner[owner] += 1
        self._fifo.put((job_id, owner))

    def _forget(self, job_id: str) -> None:
        owner = self._owners.pop(job_id, None)
        if owner is not None:
            self._per_owner[owner] -= 1
            if self._per_owner[owner] <= 0:
                del self._per_owner[owner]
        self._lock.notify_all()

    # ------------------------------------------------------------------ state

    @property
    def in_flight(self) -> int:
        with self._lock:
            return len(self._owners)

    def in_flight_of(self, owner: str) -> int:
        """One key's jobs in flight (what the per-key limit counts)."""
        with self._lock:
            return self._per_owner[owner]

    @property
    def running(self) -> int:
        with self._lock:
            return self._running

    @property
    def depth(self) -> int:
        """Jobs accepted and waiting for a worker."""
        with self._lock:
            return len(self._owners) - self._running

    def retry_after(self) -> int:
        """Seconds until a slot is likely free: one job's service time, at least 1."""
        per_job = self._service_ewma or 1.0
        return max(1, round(per_job * max(1, self.depth) / self.workers))

    # ------------------------------------------------------------------ workers

    def start(self) -> None:
        for i in range(self.workers):
            t = threading.Thread(target=self._loop, name=f"kontext-worker-{i}", daemon=True)
            t.start()
            self._threads.append(t)

    def _loop(self) -> None:
        while True:
            item = self._fifo.get()
            if item is None or self._closed:  # closed: queued jobs stay in the store for the next start
                return
            job_id, _ = item
            with self._lock:
                self._running += 1
            t0 = time.perf_counter()
            try:
                self._run(job_id)
            except Exception:  # run() ends every job itself; this is a bug, keep the worker alive
                log.exception("job %s: unhandled error in the worker", job_id)
            finally:
                took = time.perf_counter() - t0
                with self._lock:
                    self._running -= 1
                    e = self._service_ewma
                    self._service_ewma = took if e is None else 0.8 * e + 0.2 * took
                    self._forget(job_id)

    def drain(self, timeout: float) -> bool:
        """Wait until no job is in flight (True) or `timeout` seconds pass (False)."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while self._owners:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._lock.wait(left)
        return True

    def stop(self) -> None:
        """Stop the workers: a running job finishes, queued ones stay queued (call drain first)."""
        self._closed = True
        for _ in self._threads:
            self._fifo.put(None)
