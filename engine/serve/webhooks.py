"""Webhooks (--allow-webhooks only): POST the task's ResultResponse to its webhook_url when it ends,
from a short-lived thread, once, with X-Webhook-Secret when the client gave one. Best effort: a
failing receiver is logged, never retried, and never changes the task. A server that drains (SIGTERM)
waits for the posts in flight, up to TIMEOUT_S, before it exits: the last jobs' webhooks are sent."""

from __future__ import annotations

import logging
import threading
import time

from . import jobs as J
from .views import result_response

log = logging.getLogger(__name__)
TIMEOUT_S = 10.0


class Webhooks:
    """Service.on_end (a service.EndListener) for a server with webhooks: each ended job's post in its
    own thread; close() waits for the posts still in flight."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sending: set[threading.Thread] = set()

    def __call__(self, job: J.Job) -> None:
        url = job.params.webhook_url
        if not url:
            return
        body = result_response(job, job.params.base).model_dump_json()
        headers = {"Content-Type": "application/json"}
        if job.params.webhook_secret:
            headers["X-Webhook-Secret"] = job.params.webhook_secret
        thread = threading.Thread(
            target=self._send,
            args=(url, body, headers, job.id),
            name=f"kontext-webhook-{job.id}",
            daemon=True,
        )
        with self._lock:
            self._sending.add(thread)
        thread.start()

    def _send(self, url: str, body: str, headers: dict[str, str], job_id: str) -> None:
        try:
            _post(url, body, headers, job_id)
        finally:
            with self._lock:
                self._sending.discard(threading.current_thread())

    def close(self, timeout: float = TIMEOUT_S) -> None:
        """Wait up to `timeout` seconds in all for the posts in flight (Service.close calls it); those
        still unsent after it are logged."""
        deadline = time.monotonic() + timeout
        with self._lock:
            sending = list(self._sending)
        for thread in sending:
            thread.join(max(0.0, deadline - time.monotonic()))
        left = sum(t.is_alive() for t in sending)
        if left:
            log.warning("exiting with %d webhook(s) unsent after %.0fs", left, timeout)


def _post(url: str, body: str, headers: dict[str, str], job_id: str) -> None:
    import httpx

    try:
        r = httpx.post(url, content=body, headers=headers, timeout=TIMEOUT_S, follow_redirects=False)
        log.info("job %s: webhook %s answered %d", job_id, url, r.status_code)
    except httpx.HTTPError as e:
        log.warning("job %s: webhook %s failed: %s", job_id, url, e)
