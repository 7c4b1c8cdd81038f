"""The HTTP routes: BFL's submit/poll/sample API, the multipart route for curl, review, health,
readiness and metrics, over a Service. Every refusal is a 4xx (or a 503 while not accepting) with a
JSON `detail`; request bodies are capped before they are read whole.

No `from __future__ import annotations` here: FastAPI reads the route signatures' annotations at
definition time, and the dependency aliases (User, Admin) are local to create_app.
"""

import logging
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, FastAPI, File, Form, HTTPException, Query, Request, UploadFile
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import APIKeyHeader
from starlette.concurrency import run_in_threadpool

from ..errors import ImageError
from ..images import load_image
from ..version import __version__
from . import jobs as J
from .inputs import InputError, image_bytes, output_size
from .keys import KeyRing
from .metrics import CONTENT_TYPE
from .schemas import (
    AsyncResponse,
    ErrorResponse,
    HealthResponse,
    KontextRequest,
    OutputFormat,
    ResultResponse,
    ReviewItem,
)
from .service import NotAccepting, Service
from .settings import DEFAULT_GUIDANCE, GUIDANCE_RANGE, MAX_PROMPT_CHARS, STEPS_RANGE
from .views import not_found, polling_url, result_response
from .webhooks import notify
from .worker import KeyLimit, QueueFull

log = logging.getLogger(__name__)

RESULT_PREFIX = "result:"  # input_image: "result:<id>" edits a previous result of the same key
SYNC_WAIT_S = 600.0  # POST /v1/edit waits this long, then answers 202 with a polling URL
MAX_SEED = 2**63 - 1

ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in {
        401: "missing or unknown X-Key",
        413: "request body over the limit",
        422: "invalid input",
        429: "too many tasks in flight (Retry-After says when to retry)",
        503: "warming up or shutting down",
    }.items()
}

_key_header = APIKeyHeader(name="X-Key", auto_error=False, description="An API key from `kontext keys new`.")


@dataclass(frozen=True)
class Principal:
    owner: str
    admin: bool


def create_app(service: Service, keys: KeyRing | None = None) -> FastAPI:
    """The ASGI app over `service`. keys None: no auth (the settings allow that on loopback only)."""
    settings = service.settings
    if settings.allow_webhooks:
        service.on_end = notify

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        service.start()
        yield
        service.close()

    app = FastAPI(
        title="Kontext engine: BFL-compatible API",
        version=__version__,
        description="FLUX.1 Kontext [dev] behind BFL's task API: submit, poll get_result, fetch the sample.",
        lifespan=lifespan,
        responses=ERRORS,
    )
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)

    # ------------------------------------------------------------------ errors

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        # Never echo the input back (it may be a 40 MB base64 image): location, message, type only.
        errors = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
                  for e in exc.errors()]  # fmt: skip
        service.metrics.rejected.labels("invalid").inc()
        return JSONResponse({"detail": errors}, status_code=422)

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse({"detail": "internal server error"}, status_code=500)

    # ------------------------------------------------------------------ auth

    def principal(key: Annotated[str | None, Depends(_key_header)]) -> Principal:
        if keys is None:
            return Principal("anonymous", admin=True)
        entry = keys.find(key)
        if entry is None:
            service.metrics.rejected.labels("unauthorized").inc()
            raise HTTPException(401, "missing or unknown X-Key header; create a key with `kontext keys new`")
        return Principal(entry.owner, entry.admin)

    def admin(p: Annotated[Principal, Depends(principal)]) -> Principal:
        if not p.admin:
            raise HTTPException(403, "this route needs an admin key (`kontext keys new --admin`)")
        return p

    User = Annotated[Principal, Depends(principal)]
    Admin = Annotated[Principal, Depends(admin)]

    def base_url(request: Request) -> str:
        return settings.public_url or str(request.base_url)

    def refuse(reason: str, status: int, detail: str, retry_after: int | None = None) -> HTTPException:
        service.metrics.rejected.labels(reason).inc()
        headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
        return HTTPException(status, detail, headers=headers)

    def check_accepting() -> None:
        why = service.accepting()
        if why is not None:
            reason = "draining" if service.draining else "not_ready"
            raise refuse(reason, 503, why, retry_after=5)
        if service.queue.in_flight >= settings.queue:  # cheap early 429, before decoding any image
            raise refuse(
                "queue_full",
                429,
                f"{settings.queue} tasks in flight; retry later",
                service.queue.retry_after(),
            )

    def accept(
        owner: str,
        params: dict[str, Any],
        image: bytes,
        *,
        references: tuple[bytes, ...] = (),
        wait: bool = False,
    ) -> str:
        try:
            return service.submit(owner, params, image, references=references, wait=wait)
        except QueueFull:
            raise refuse(
                "queue_full",
                429,
                f"{settings.queue} tasks in flight; retry later",
                service.queue.retry_after(),
            ) from None
        except KeyLimit:
            raise refuse(
                "key_limit",
                429,
                f"this key has {settings.key_limit} tasks in flight (the per-key limit); retry later",
                service.queue.retry_after(),
            ) from None
        except NotAccepting as e:
            raise refuse("draining" if service.draining else "not_ready", 503, str(e), 5) from None

    def family() -> str:
        assert service.editor is not None  # check_accepting() passed: the editor is loaded
        return service.editor.family

    # ------------------------------------------------------------------ BFL's API

    def input_file(value: str, field: str, owner: str) -> bytes:
        """An image field: base64, a data: URL, an http(s) URL (--allow-urls), or `result:ID`, a Ready
        result of the same key (successive edits without re-uploading)."""
        if value.startswith(RESULT_PREFIX):
            data = service.result_of(value[len(RESULT_PREFIX) :].strip(), owner)
            if data is None:
                raise InputError(f"{field}: {value[:80]!r} names no Ready result of this key (expired?)")
            return data
        return image_bytes(value, field, allow_urls=settings.allow_urls)

    def submit(body: KontextRequest, request: Request, user: Principal) -> AsyncResponse:
        check_accepting()
        try:
            if body.prompt_upsampling:
                raise InputError(
                    "prompt_upsampling: true is not available: it rewrites the prompt with a language model "
                    "this server does not run; send false or leave it out"
                )
            extra = {"input_image_2": body.input_image_2, "input_image_3": body.input_image_3,
                     "input_image_4": body.input_image_4}  # fmt: skip
            if body.input_image is None:
                raise InputError(
                    "input_image is required: FLUX.1 Kontext [dev] edits an image "
                    "(text-to-image is not served)"
                )
            if body.webhook_url is not None:
                if not settings.allow_webhooks:
                    raise InputError(
                        "webhook_url: webhooks are off on this server (start it with --allow-webhooks)"
                    )
                if not body.webhook_url.lower().startswith(("http://", "https://")):
                    raise InputError("webhook_url must be an http(s) URL")
            image = input_file(body.input_image, "input_image", user.owner)
            references = tuple(  # reference images (character, style, object) beside the input
                input_file(value, name, user.owner) for name, value in extra.items() if value is not None
            )
            size = output_size(body.aspect_ratio, family())
        except InputError as e:
            raise refuse("invalid", 422, str(e)) from None
        base = base_url(request)
        params = {
            "prompt": body.prompt,
            "seed": body.seed if body.seed is not None else secrets.randbelow(2**31),
            "steps": body.steps if body.steps is not None else settings.default_steps,
            "guidance": body.guidance if body.guidance is not None else DEFAULT_GUIDANCE,
            "size": list(size) if size else None,
            "aspect_ratio": body.aspect_ratio,
            "output_format": (body.output_format or OutputFormat.png).value,
            "safety_tolerance": body.safety_tolerance if body.safety_tolerance is not None else 2,
            "webhook_url": body.webhook_url,
            "webhook_secret": body.webhook_secret,
            "base": base,
        }
        job_id = accept(user.owner, params, image, references=references)
        return AsyncResponse(id=job_id, polling_url=polling_url(base, job_id))

    @app.post("/v1/flux-kontext-dev", response_model=AsyncResponse, tags=["Models"])
    def flux_kontext_dev(body: KontextRequest, request: Request, user: User) -> AsyncResponse:
        """Submit an edit with FLUX.1 Kontext [dev]. Poll `polling_url` until the status is final."""
        return submit(body, request, user)

    @app.post("/v1/flux-kontext-pro", response_model=AsyncResponse, tags=["Models"])
    def flux_kontext_pro(body: KontextRequest, request: Request, user: User) -> AsyncResponse:
        """Alias of /v1/flux-kontext-dev, so clients written for BFL's hosted API work by changing their
        base URL. Served by the [dev] model."""
        return submit(body, request, user)

    @app.get("/v1/get_result", response_model=ResultResponse, tags=["Utility"])
    def get_result(request: Request, user: User, id: Annotated[str, Query(max_length=64)]) -> ResultResponse:
        """A task's status (BFL's strings) and, when Ready, its result. Another key's task, an unknown id
        and an expired task are all `Task not found`."""
        job = service.job(id, user.owner)
        return not_found(id) if job is None else result_response(job, base_url(request))

    @app.get(
        "/v1/samples/{token}.{ext}",
        tags=["Utility"],
        response_class=Response,
        responses={200: {"content": {"image/png": {}, "image/jpeg": {}}}, 404: {"model": ErrorResponse}},
    )
    def sample(token: Annotated[str, PathParam(max_length=64)], ext: str) -> Response:
        """The result image of a Ready task. The URL is the credential; it expires with the result."""
        found = service.sample(token)
        if found is None:
            raise HTTPException(404, "unknown or expired sample")
        job, data = found
        return Response(data, media_type=job.media_type or "image/png", headers={"Cache-Control": "private"})

    @app.post(
        "/v1/edit",
        tags=["Models"],
        response_class=Response,
        responses={200: {"content": {"image/png": {}}}, 202: {"model": AsyncResponse}},
    )
    async def edit_sync(
        request: Request,
        user: User,
        image: Annotated[UploadFile, File(description="PNG, JPEG or WebP")],
        prompt: Annotated[str, Form(min_length=1, max_length=MAX_PROMPT_CHARS)],
        seed: Annotated[int | None, Form(ge=0, le=MAX_SEED)] = None,
        steps: Annotated[int | None, Form(ge=STEPS_RANGE[0], le=STEPS_RANGE[1])] = None,
        guidance: Annotated[float | None, Form(ge=GUIDANCE_RANGE[0], le=GUIDANCE_RANGE[1])] = None,
    ) -> Response:
        """Multipart edit that answers with the PNG itself (for curl). It goes through the same queue;
        if the edit takes longer than 10 minutes the answer is 202 with a polling URL."""
        check_accepting()
        data = await image.read()
        try:
            await run_in_threadpool(load_image, data)
        except ImageError as e:
            raise refuse("invalid", 422, f"image: {e}") from None
        base = base_url(request)
        params = {
            "prompt": prompt,
            "seed": seed if seed is not None else secrets.randbelow(2**31),
            "steps": steps if steps is not None else settings.default_steps,
            "guidance": guidance if guidance is not None else DEFAULT_GUIDANCE,
            "size": None,
            "output_format": "png",
            "base": base,
        }
        job_id = await run_in_threadpool(lambda: accept(user.owner, params, data, wait=True))
        job = await run_in_threadpool(service.wait_for, job_id, SYNC_WAIT_S)
        if job is not None and job.state == J.READY:
            found = service.sample(job.sample_token or "")
            if found is not None:
                return Response(found[1], media_type="image/png", headers={"X-Task-Id": job_id})
        if job is None or job.state in (*J.UNFINISHED, J.HELD):
            body = AsyncResponse(id=job_id, polling_url=polling_url(base, job_id)).model_dump()
            return JSONResponse(body, status_code=202)
        view = result_response(job, base)
        status = 500 if "internal error" in str((job.details or {}).get("error", "")) else 422
        return JSONResponse({"detail": f"{view.status.value}: {job.details}"}, status_code=status)

    # ------------------------------------------------------------------ review

    @app.get("/v1/review", response_model=list[ReviewItem], tags=["Review"])
    def review_list(_: Admin) -> list[ReviewItem]:
        """Results held for review (server started with review on), oldest first."""
        return [
            ReviewItem(id=j.id, prompt=j.params["prompt"], created=j.created) for j in service.store.held()
        ]

    @app.get("/v1/review/{job_id}/image", tags=["Review"], response_class=Response)
    def review_image(job_id: Annotated[str, PathParam(max_length=64)], _: Admin) -> Response:
        job = service.store.get(job_id)
        if job is None or job.state != J.HELD:
            raise HTTPException(404, "no result held for review under this id")
        return Response(
            service.store.result_path(job.id).read_bytes(), media_type=job.media_type or "image/png"
        )

    @app.post("/v1/review/{job_id}/{decision}", response_model=ResultResponse, tags=["Review"])
    def review(
        request: Request, job_id: Annotated[str, PathParam(max_length=64)], decision: str, _: Admin
    ) -> ResultResponse:
        """approve: the result is served (its TTL starts now); reject: Content Moderated, file deleted."""
        if decision not in ("approve", "reject"):
            raise HTTPException(404, "decision must be approve or reject")
        if not service.review(job_id, decision == "approve"):
            raise HTTPException(404, "no result held for review under this id")
        job = service.store.get(job_id)
        return not_found(job_id) if job is None else result_response(job, base_url(request))

    # ------------------------------------------------------------------ operations

    @app.get("/healthz", response_model=HealthResponse, tags=["Operations"])
    def healthz() -> HealthResponse:
        """200 while the process lives."""
        return HealthResponse(status="ok")

    @app.get(
        "/readyz",
        response_model=HealthResponse,
        tags=["Operations"],
        responses={503: {"model": HealthResponse}},
    )
    def readyz() -> Response:
        """200 once the engine is loaded and warm; 503 before, while draining, or if loading failed."""
        why = service.accepting()
        if why is None:
            return JSONResponse(HealthResponse(status="ready").model_dump())
        return JSONResponse(HealthResponse(status="not ready", detail=why).model_dump(), status_code=503)

    @app.get("/metrics", tags=["Operations"], response_class=Response)
    def metrics() -> Response:
        """Prometheus text format."""
        return Response(service.metrics.render(), media_type=CONTENT_TYPE)

    return app


Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class BodyLimit:
    """Refuse bodies over `limit` bytes with 413: from Content-Length before reading, and while
    reading for chunked bodies (the route's body read raises the 413)."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]], limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            body = b'{"detail":"request body over the limit of %d bytes"}' % self.limit
            headers = [(b"content-type", b"application/json"), (b"connection", b"close")]
            await send({"type": "http.response.start", "status": 413, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise HTTPException(413, f"request body over the limit of {self.limit} bytes")
            return message

        await self.app(scope, limited, send)
