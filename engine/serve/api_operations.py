"""Operations: liveness (/healthz), readiness (/readyz) and Prometheus metrics (/metrics), unauthenticated.

No `from __future__ import annotations`: FastAPI reads the route signatures' annotations at import time.
"""

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from .deps import ServiceDep
from .metrics import CONTENT_TYPE
from .schemas import HealthResponse

router = APIRouter(tags=["Operations"])


@router.get("/healthz", response_model=HealthResponse)
def healthz() -> HealthResponse:
    """200 while the process lives."""
    return HealthResponse(status="ok")


@router.get("/readyz", response_model=HealthResponse, responses={503: {"model": HealthResponse}})
def readyz(service: ServiceDep) -> Response:
    """200 once the engine is loaded and warm (with its memory plan under --vram); 503 before, while
    draining, or if loading failed."""
    why = service.accepting()
    if why is None:
        return JSONResponse(HealthResponse(status="ready", memory=service.memory_plan()).model_dump())
    return JSONResponse(HealthResponse(status="not ready", detail=why).model_dump(), status_code=503)


@router.get("/metrics", response_class=Response)
def metrics(service: ServiceDep) -> Response:
    """Prometheus text format."""
    return Response(service.metrics.render(), media_type=CONTENT_TYPE)
