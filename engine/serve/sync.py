"""The synchronous routes' one wait (BFL's multipart /v1/edit, OpenAI's /v1/images/edits): admit a job
through the same queue and limits as every other, wait up to the server's sync timeout, and say how it
ended. Each route turns the outcome into its own API's answer.

No `from __future__ import annotations`: kept like the routers that import it.
"""

from dataclasses import dataclass

from starlette.concurrency import run_in_threadpool

from . import jobs as J
from .params import JobParams
from .refusals import admit
from .service import Service, failed_inside


@dataclass(frozen=True)
class SyncOutcome:
    job_id: str
    job: J.Job | None  # None: gone from the store (expired while waiting)
    images: list[bytes] | None  # every image of a Ready result, else None

    @property
    def pending(self) -> bool:
        """Still queued or running when the sync timeout ran out (the task goes on)."""
        return self.job is None or self.job.state in J.UNFINISHED

    @property
    def internal(self) -> bool:
        """It failed inside the server (a 500), not because of the request."""
        return self.job is not None and failed_inside(self.job)


async def run_sync(
    service: Service, owner: str, params: JobParams, image: bytes, references: tuple[bytes, ...] = ()
) -> SyncOutcome:
    """Admit the job (refusals as refusals.admit raises them) and wait for its end, in worker threads."""
    job_id = await run_in_threadpool(
        lambda: admit(service, owner, params, image, references=references, wait=True)
    )
    job = await run_in_threadpool(service.wait_for, job_id, service.settings.sync_timeout)
    return SyncOutcome(job_id, job, service.images(job))
