"""The review API (admin keys): list the results held for a person, see one, approve or reject it.

No `from __future__ import annotations`: FastAPI reads the route signatures' annotations at import time.
"""

from typing import Annotated

from fastapi import APIRouter, HTTPException, Request
from fastapi import Path as PathParam
from fastapi.responses import Response

from . import jobs as J
from .deps import Admin, ServiceDep, base_url
from .schemas import ResultResponse, ReviewItem
from .views import not_found, result_response

router = APIRouter(tags=["Review"])


@router.get("/v1/review", response_model=list[ReviewItem])
def review_list(_: Admin, service: ServiceDep) -> list[ReviewItem]:
    """Results held for review (server started with review on), oldest first."""
    return [ReviewItem(id=j.id, prompt=j.params.prompt, created=j.created) for j in service.store.held()]


@router.get("/v1/review/{job_id}/image", response_class=Response)
def review_image(job_id: Annotated[str, PathParam(max_length=64)], _: Admin, service: ServiceDep) -> Response:
    """The (first) image of a held result."""
    job = service.store.get(job_id)
    if job is None or job.state != J.HELD:
        raise HTTPException(404, "no result held for review under this id")
    return Response(service.store.result_path(job.id).read_bytes(), media_type=job.media_type or "image/png")


@router.post("/v1/review/{job_id}/{decision}", response_model=ResultResponse)
def review(
    request: Request,
    job_id: Annotated[str, PathParam(max_length=64)],
    decision: str,
    _: Admin,
    service: ServiceDep,
) -> ResultResponse:
    """approve: the result is served (its TTL starts now); reject: Content Moderated, files deleted."""
    if decision not in ("approve", "reject"):
        raise HTTPException(404, "decision must be approve or reject")
    if not service.review(job_id, decision == "approve"):
        raise HTTPException(404, "no result held for review under this id")
    job = service.store.get(job_id)
    return not_found(job_id) if job is None else result_response(job, base_url(request))
