"""Every refusal of every route, in one place: `Refused` (status, reason, message, Retry-After), the
overload refusal (`check_accepting`, `admit`: 503 while not accepting, 429 with Retry-After past the
global or per-key bound), and the exception handlers that render a refusal as its API spells errors:
BFL's `{"detail": ...}`, or OpenAI's `{"error": {"message", "type", "param", "code"}}` on /v1/images/.
Each refusal counts once in kontext_rejections_total{reason}."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from .admission import KeyLimit, QueueFull
from .params import JobParams
from .service import NotAccepting, Service

log = logging.getLogger(__name__)

OPENAI_PREFIX = "/v1/images/"  # routes whose errors take OpenAI's shape
OPENAI_TYPES = {
    401: "invalid_request_error",
    403: "invalid_request_error",
    404: "invalid_request_error",
    413: "invalid_request_error",
    429: "requests",
}
OPENAI_CODES = {
    401: "invalid_api_key",
    413: "request_too_large",
    429: "rate_limit_exceeded",
    503: "service_unavailable",
    504: "timeout",
}


class Refused(Exception):
    """A request the server will not run. `param`, `code`: OpenAI's fields (BFL's shape leaves them out)."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        retry_after: int | None = None,
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.retry_after = retry_after
        self.param = param
        self.code = code


def refuse(service: Service, reason: str, status: int, message: str, **kw: Any) -> Refused:
    """A Refused, counted under `reason` (raise it)."""
    service.metrics.rejected.labels(reason).inc()
    return Refused(status, message, **kw)


def check_accepting(service: Service, owner: str | None = None) -> None:
    """Refuse early, before any image is decoded: 503 while warming up or draining, 429 when full or
    when `owner` (the key) has its per-key limit in flight. `admit` checks both again, atomically."""
    why = service.accepting()
    if why is not None:
        raise refuse(service, "draining" if service.draining else "not_ready", 503, why, retry_after=5)
    if service.queue.in_flight >= service.settings.queue:
        raise _queue_full(service)
    if owner is not None and service.queue.in_flight_of(owner) >= service.settings.key_limit:
        raise _key_limit(service)


def admit(
    service: Service,
    owner: str,
    params: JobParams,
    image: bytes,
    *,
    references: tuple[bytes, ...] = (),
    wait: bool = False,
) -> str:
    """service.submit, its overload exceptions turned into refusals. Returns the job id."""
    try:
        return service.submit(owner, params, image, references=references, wait=wait)
    except QueueFull:
        raise _queue_full(service) from None
    except KeyLimit:
        raise _key_limit(service) from None
    except NotAccepting as e:
        reason = "draining" if service.draining else "not_ready"
        raise refuse(service, reason, 503, str(e), retry_after=5) from None


def _key_limit(service: Service) -> Refused:
    return refuse(
        service,
        "key_limit",
        429,
        f"this key has {service.settings.key_limit} tasks in flight (the per-key limit); retry later",
        retry_after=service.queue.retry_after(),
    )


def _queue_full(service: Service) -> Refused:
    return refuse(
        service,
        "queue_full",
        429,
        f"{service.settings.queue} tasks in flight; retry later",
        retry_after=service.queue.retry_after(),
    )


# ---------------------------------------------------------------------------- rendering


def is_openai(path: str) -> bool:
    return path.startswith(OPENAI_PREFIX)


def openai_error(
    status: int, message: str, *, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """OpenAI's error body."""
    kind = OPENAI_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {
        "error": {"message": message, "type": kind, "param": param, "code": code or OPENAI_CODES.get(status)}
    }


def error_response(
    path: str,
    status: int,
    message: Any,
    *,
    retry_after: int | None = None,
    param: str | None = None,
    code: str | None = None,
) -> JSONResponse:
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    if is_openai(path):
        text = message if isinstance(message, str) else "; ".join(_validation_text(e) for e in message)
        return JSONResponse(openai_error(status, text, param=param, code=code), status, headers=headers)
    return JSONResponse({"detail": message}, status, headers=headers)


def _validation_text(e: dict[str, Any]) -> str:
    return f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', '')}"


def install_handlers(app: FastAPI, service: Service) -> None:
    """Refusals, HTTP errors, invalid input and unexpected exceptions, each in its API's error shape."""

    @app.exception_handler(Refused)
    async def refused(request: Request, exc: Refused) -> JSONResponse:
        return error_response(
            request.url.path,
            exc.status,
            exc.message,
            retry_after=exc.retry_after,
            param=exc.param,
            code=exc.code,
        )

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        response = error_response(request.url.path, exc.status_code, exc.detail)
        response.headers.update(exc.headers or {})
        return response

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        # Never echo the input back (it may be a 40 MB base64 image): location, message, type only.
        errors = [
            {"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
            for e in exc.errors()
        ]
        service.metrics.rejected.labels("invalid").inc()
        status = 400 if is_openai(request.url.path) else 422
        param = str(errors[0]["loc"][-1]) if errors and errors[0]["loc"] else None
        return error_response(request.url.path, status, errors, param=param)

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(request.url.path, 500, "internal server error")
