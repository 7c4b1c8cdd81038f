"""The job lifecycle, without HTTP: accept (admission, store, queue), run (editor, result file, final
state), answer (a job as its owner sees it), review, expire, recover after a crash, drain on SIGTERM.
The routers (api_*.py) map this onto HTTP; ray_app.py reuses it with a Ray editor. No message this
service hands out carries a local path (`public`)."""

from __future__ import annotations

import logging
import re
import secrets
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import replace
from typing import Any, Protocol

from ..errors import KontextError, ModeratedError
from . import jobs as J
from .admission import WorkQueue
from .editor import EditJob, Editor
from .metrics import Live, ServeMetrics
from .params import JobParams
from .settings import ServeSettings

log = logging.getLogger(__name__)

INTERNAL_ERROR = "internal error"  # how a job's error starts when the server, not the request, failed

# An absolute or relative path of two or more parts, not inside a URL (after ':', '/' or a word).
_PATH = re.compile(r"(?<![\w:/.~])(?:~|\.{1,2})?/(?:[^\s/'\"]+/)+([^\s/'\",;)]+)")


def public(message: str) -> str:
    """`message` with each local path cut to its last part: errors reach clients, paths must not."""
    return _PATH.sub(lambda m: f".../{m.group(1)}", message)


class NotAccepting(Exception):
    """Warming up, draining after SIGTERM, or the engine failed to load."""


class EndListener(Protocol):
    """Told of each ended job (webhooks.Webhooks); close() waits for what it still has in flight."""

    def __call__(self, job: J.Job) -> None: ...

    def close(self) -> None: ...


class Service:
    def __init__(self, settings: ServeSettings, editor_factory: Callable[[], Editor]) -> None:
        self.settings = settings
        self._factory = editor_factory
        self.store = J.JobStore(settings.data)
        self.metrics = ServeMetrics(self._live)
        self.queue = WorkQueue(
            self._run, workers=settings.workers, capacity=settings.queue, per_key=settings.key_limit
        )
        self.editor: Editor | None = None
        self.ready = threading.Event()
        self.draining = False
        self.load_error: str | None = None
        self._stop = threading.Event()
        self._waiters: dict[str, threading.Event] = {}
        self._waiters_lock = threading.Lock()
        self.on_end: EndListener | None = None  # told of each ended job (webhooks); closed by close()
        self._started = self._closed = False

    # ------------------------------------------------------------------ lifetime

    def start(self) -> None:
        """Queue the jobs a previous run accepted and did not finish, then load the engine in the
        background (readiness follows it) and start the reaper. Idempotent."""
        if self._started:
            return
        self._started = True
        self.store.reap()  # what a killed run left behind (JobStore.reap says what it deletes)
        for job in self.store.unfinished():
            self.store.requeue(job.id)
            self.queue.requeue(job.id, job.owner)
        recovered = self.queue.in_flight
        if recovered:
            log.info("recovered %d unfinished job(s) from %s", recovered, self.settings.data)
        threading.Thread(target=self._load, name="kontext-load", daemon=True).start()
        threading.Thread(target=self._reap_loop, name="kontext-reaper", daemon=True).start()

    def _load(self) -> None:
        try:
            t0 = time.perf_counter()
            self.editor = self._factory()
            log.info("engine ready in %.1fs", time.perf_counter() - t0)
        except Exception as e:
            self.load_error = public(f"{type(e).__name__}: {e}")
            log.exception("the engine failed to load")
            return
        self.queue.start()
        self.ready.set()

    def _reap_loop(self) -> None:
        period = min(30.0, max(0.5, self.settings.result_ttl / 4))
        while not self._stop.wait(period):
            try:
                self.store.reap()
            except Exception:
                log.exception("reaper failed; retrying in %.0fs", period)

    def begin_drain(self) -> None:
        """Stop accepting (submits get 503); queued and running jobs go on."""
        if not self.draining:
            log.info("draining: %d job(s) in flight", self.queue.in_flight)
        self.draining = True

    def drain(self, timeout: float) -> bool:
        self.begin_drain()
        done = self.queue.drain(timeout) if self.ready.is_set() else self.queue.in_flight == 0
        if not done:
            log.warning("drain timeout: %d job(s) left for the next start", self.queue.in_flight)
        return done

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        self.queue.stop()
        if self.on_end is not None:
            self.on_end.close()  # e.g. the drained jobs' webhooks, posted before the process exits
        if self.queue.running:  # a drain timed out: the job stays `running` and runs again at restart
            log.warning("exiting with %d job(s) running; they will run again", self.queue.running)
            return
        if self.editor is not None:
            self.editor.close()
        self.store.close()

    # ------------------------------------------------------------------ accept

    @property
    def default_steps(self) -> int | None:
        """Steps of a request that leaves them out: --steps, else the loaded model's default (None
        until the engine is loaded). The one place a job's steps are filled in (submit)."""
        if self.settings.default_steps is not None:
            return self.settings.default_steps
        return self.editor.default_steps if self.editor is not None else None

    @property
    def review_on(self) -> bool:
        """Every result waits for a reviewer (--review, or the engine's safety policy)."""
        return self.settings.review or (self.editor is not None and self.editor.review)

    def memory_plan(self) -> dict[str, Any] | None:
        """The loaded engine's memory plan as JSON (kontext serve --vram), else None."""
        return getattr(self.editor, "memory_plan", None)

    def accepting(self) -> str | None:
        """None when submits are accepted, else why not."""
        if self.load_error is not None:
            return f"the engine failed to load: {self.load_error}"
        if self.draining:
            return "the server is shutting down; retry on another instance"
        if not self.ready.is_set():
            return "the engine is warming up; retry shortly"
        return None

    def submit(
        self,
        owner: str,
        params: JobParams,
        image: bytes,
        *,
        references: tuple[bytes, ...] = (),
        wait: bool = False,
    ) -> str:
        """Accept a job (raises NotAccepting, admission.QueueFull, admission.KeyLimit); params.steps None:
        the server's default_steps, recorded in the job. `wait`: `wait_for` may be called on it."""
        why = self.accepting()
        if why is not None:
            raise NotAccepting(why)
        if params.steps is None:
            params = replace(params, steps=self.default_steps)  # accepting: the editor is loaded
        job_id = str(uuid.uuid4())
        self.queue.admit(job_id, owner)
        try:
            if wait:
                with self._waiters_lock:
                    self._waiters[job_id] = threading.Event()
            self.store.create(job_id, owner, params, image, references)
        except BaseException:
            self.queue.release(job_id)
            with self._waiters_lock:
                self._waiters.pop(job_id, None)
            raise
        self.queue.put(job_id)
        self.metrics.submitted.inc()
        return job_id

    def wait_for(self, job_id: str, timeout: float) -> J.Job | None:
        with self._waiters_lock:
            event = self._waiters.get(job_id)
        if event is not None:
            event.wait(timeout)
            with self._waiters_lock:
                self._waiters.pop(job_id, None)
        return self.store.get(job_id)

    # ------------------------------------------------------------------ run

    def _run(self, job_id: str) -> None:
        job = self.store.get(job_id)
        if job is None or job.state not in J.UNFINISHED:
            return
        self.store.start(job_id)
        started = time.time()
        self.metrics.queue_wait.observe(max(0.0, started - job.created))
        try:
            image = self.store.input_path(job_id).read_bytes()
            refs = tuple(path.read_bytes() for path in self.store.reference_paths(job_id))
            edit = EditJob(job.params, image, refs)
            assert self.editor is not None  # workers start after the editor loads
            out = self.editor.edit(edit)
        except ModeratedError as e:
            state = J.REQUEST_MODERATED if e.stage == "request" else J.CONTENT_MODERATED
            self._end(job, state, details=_verdict(e))
            return
        except KontextError as e:
            self._end(job, J.ERROR, details={"error": public(str(e))})
            return
        except Exception as e:
            log.exception("job %s failed", job_id)
            self._end(job, J.ERROR, details={"error": f"{INTERNAL_ERROR}: {type(e).__name__}"})
            return
        timings = dict(out.timings)
        timings["queue_wait"] = max(0.0, started - job.created)
        timings["service"] = time.time() - started
        self.metrics.observe_timings(timings)
        held = self.review_on
        self._end(
            job,
            J.HELD if held else J.READY,
            results=out.images,
            media_type=out.media_type,
            details={"review": "awaiting review"} if held else None,
            timings=timings,
        )

    def _end(self, job: J.Job, state: str, **kw: Any) -> None:
        token = secrets.token_urlsafe(24) if kw.get("results") else None
        self.store.finish(job.id, state, ttl=self.settings.result_ttl, sample_token=token, **kw)
        self.metrics.job_ended(state)
        with self._waiters_lock:
            event = self._waiters.get(job.id)
        if event is not None:
            event.set()
        if self.on_end is not None:
            ended = self.store.get(job.id)
            if ended is not None:
                self.on_end(ended)

    # ------------------------------------------------------------------ answer

    def job(self, job_id: str, owner: str) -> J.Job | None:
        """The job as `owner` sees it: None when it does not exist or belongs to someone else."""
        job = self.store.get(job_id)
        return job if job is not None and job.owner == owner else None

    def sample(self, token: str, index: int = 0) -> tuple[J.Job, bytes] | None:
        """Image `index` of a Ready, unexpired job's result, by its sample token."""
        job = self.store.by_sample_token(token)
        data = self.images(job)
        if job is None or data is None or not 0 <= index < len(data):
            return None
        return job, data[index]

    def images(self, job: J.Job | None) -> list[bytes] | None:
        """Every image of a Ready, unexpired job's result (None otherwise)."""
        if job is None or job.state != J.READY or (job.expires or 0) < time.time():
            return None
        try:
            return [path.read_bytes() for path in self.store.result_paths(job.id)]
        except OSError:
            return None

    def result_of(self, job_id: str, owner: str) -> bytes | None:
        """The (first) image of `owner`'s Ready, unexpired job (for `input_image: result:ID`), else None."""
        data = self.images(self.job(job_id, owner))
        return None if data is None else data[0]

    def review(self, job_id: str, approve: bool) -> bool:
        ok = self.store.review(job_id, approve, ttl=self.settings.result_ttl)
        if ok:
            self.metrics.job_ended(J.READY if approve else J.CONTENT_MODERATED)
        return ok

    def _live(self) -> Live:
        return Live(
            depth=self.queue.depth,
            running=self.queue.running,
            ready=self.ready.is_set(),
            draining=self.draining,
            states=self.store.counts(),
            dispatch=self.editor.stats() if self.editor is not None else {},
        )


def failed_inside(job: J.Job) -> bool:
    """The job ended in an error of the server's own (a 500), not of its request (a 4xx)."""
    return job.state == J.ERROR and str((job.details or {}).get("error", "")).startswith(INTERNAL_ERROR)


def _verdict(e: ModeratedError) -> dict[str, Any]:
    v = e.verdict
    return {
        "stage": e.stage,
        "checker": str(getattr(v, "checker", "")),
        "reason": str(getattr(v, "reason", "") or v),
    }
