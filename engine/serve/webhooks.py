"""Webhooks (--allow-webhooks only): POST the task's ResultResponse to its webhook_url when it ends,
from a short-lived thread, once, with X-Webhook-Secret when the client gave one. Best effort: a
failing receiver is logged, never retried, and never changes the task."""

from __future__ import annotations

import logging
import threading

from . import jobs as J
from .views import result_response

log = logging.getLogger(__name__)
TIMEOUT_S = 10.0


def notify(job: J.Job) -> None:
    url = job.params.webhook_url
    if not url:
        return
    body = result_response(job, job.params.base).model_dump_json()
    headers = {"Content-Type": "application/json"}
    if job.params.webhook_secret:
        headers["X-Webhook-Secret"] = job.params.webhook_secret
    threading.Thread(target=_post, args=(url, body, headers, job.id), daemon=True).start()


def _post(url: str, body: str, headers: dict[str, str], job_id: str) -> None:
    import httpx

    try:
        r = httpx.post(url, content=body, headers=headers, timeout=TIMEOUT_S, follow_redirects=False)
        log.info("job %s: webhook %s answered %d", job_id, url, r.status_code)
    except httpx.HTTPError as e:
        log.warning("job %s: webhook %s failed: %s", job_id, url, e)
