"""A stored job as BFL's ResultResponse, with the URLs of this server (polling and sample)."""

from __future__ import annotations

from ..images import image_format
from . import jobs as J
from .schemas import STATUS, ResultResponse, Status


def polling_url(base: str, job_id: str) -> str:
    return f"{base.rstrip('/')}/v1/get_result?id={job_id}"


def sample_url(base: str, job: J.Job, index: int = 0) -> str:
    """The URL of image `index` of a Ready job's result (TOKEN.ext, then TOKEN.1.ext, ...)."""
    name = job.sample_token if index == 0 else f"{job.sample_token}.{index}"
    return f"{base.rstrip('/')}/v1/samples/{name}.{image_format(job.media_type or 'image/png').api_name}"


def not_found(job_id: str) -> ResultResponse:
    return ResultResponse(id=job_id, status=Status.not_found)


def result_response(job: J.Job, base: str) -> ResultResponse:
    status = STATUS[job.state]
    if job.state == J.READY:
        start = job.started or job.created
        end = job.finished or start
        result = {
            "sample": sample_url(base, job),
            "prompt": job.params.prompt,
            "seed": job.params.seed,
            "start_time": start,
            "end_time": end,
            "duration": end - start,
            "expires_at": job.expires,
            "timings": job.timings or {},
        }
        if job.timings and "steps_computed" in job.timings:  # full transformer passes (a step cache skips)
            result["steps_computed"] = int(job.timings["steps_computed"])
        return ResultResponse(id=job.id, status=status, result=result, progress=1.0, details=job.details)
    if job.state in J.UNFINISHED or job.state == J.HELD:
        progress = 0.0 if job.state == J.QUEUED else None
        return ResultResponse(id=job.id, status=status, progress=progress, details=job.details)
    return ResultResponse(id=job.id, status=status, details=job.details)
