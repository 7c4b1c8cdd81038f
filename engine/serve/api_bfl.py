"""BFL's API: submit (/v1/flux-kontext-dev and its -pro alias), poll (/v1/get_result), fetch the
sample, and the multipart /v1/edit for curl that answers with the image itself. Every refusal is a
4xx (or a 503 while not accepting) with a JSON `detail` (refusals.py).

No `from __future__ import annotations`: FastAPI reads the route signatures' annotations at import time.
"""

from typing import Annotated

from fastapi import APIRouter, File, Form, HTTPException, Query, Request, UploadFile
from fastapi import Path as PathParam
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from ..errors import ConfigError, ImageError
from ..images import load_image
from ..prompts import check_prompt
from . import jobs as J
from .deps import ServiceDep, User, base_url
from .inputs import InputError, image_bytes, output_size
from .params import MAX_SEED, job_params
from .refusals import admit, check_accepting, refuse
from .schemas import AsyncResponse, ErrorResponse, KontextRequest, OutputFormat, ResultResponse
from .service import Service
from .settings import GUIDANCE_RANGE, MAX_PROMPT_CHARS, STEPS_RANGE
from .sync import run_sync
from .views import not_found, polling_url, result_response

RESULT_PREFIX = "result:"  # input_image: "result:<id>" edits a previous result of the same key

router = APIRouter()


def input_file(service: Service, value: str, field: str, owner: str) -> bytes:
    """An image field: base64, a data: URL, an http(s) URL (--allow-urls), or `result:ID`, a Ready
    result of the same key (successive edits without re-uploading)."""
    if value.startswith(RESULT_PREFIX):
        data = service.result_of(value[len(RESULT_PREFIX) :].strip(), owner)
        if data is None:
            raise InputError(f"{field}: {value[:80]!r} names no Ready result of this key (expired?)")
        return data
    return image_bytes(value, field, allow_urls=service.settings.allow_urls)


def submit(service: Service, body: KontextRequest, request: Request, owner: str) -> AsyncResponse:
    check_accepting(service, owner)
    settings = service.settings
    _check_prompt(service, body.prompt)
    try:
        if body.prompt_upsampling:
            raise InputError(
                "prompt_upsampling: true is not available: it rewrites the prompt with a language model "
                "this server does not run; send false or leave it out"
            )
        if body.input_image is None:
            raise InputError(
                "input_image is required: FLUX.1 Kontext [dev] edits an image (text-to-image is not served)"
            )
        if body.webhook_url is not None:
            if not settings.allow_webhooks:
                raise InputError(
                    "webhook_url: webhooks are off on this server (start it with --allow-webhooks)"
                )
            if not body.webhook_url.lower().startswith(("http://", "https://")):
                raise InputError("webhook_url must be an http(s) URL")
        image = input_file(service, body.input_image, "input_image", owner)
        extra = {
            "input_image_2": body.input_image_2,
            "input_image_3": body.input_image_3,
            "input_image_4": body.input_image_4,
        }
        references = tuple(  # reference images (character, style, object) beside the input
            input_file(service, value, name, owner) for name, value in extra.items() if value is not None
        )
        assert service.editor is not None  # check_accepting() passed
        size = output_size(body.aspect_ratio, service.editor.family)
    except InputError as e:
        raise refuse(service, "invalid", 422, str(e)) from None
    base = base_url(request)
    params = job_params(
        body.prompt,
        seed=body.seed,
        steps=body.steps,
        guidance=body.guidance,
        size=size,
        output_format=(body.output_format or OutputFormat.png).value,
        aspect_ratio=body.aspect_ratio,
        safety_tolerance=body.safety_tolerance if body.safety_tolerance is not None else 2,
        webhook_url=body.webhook_url,
        webhook_secret=body.webhook_secret,
        base=base,
    )
    job_id = admit(service, owner, params, image, references=references)
    return AsyncResponse(id=job_id, polling_url=polling_url(base, job_id))


def _check_prompt(service: Service, prompt: str) -> None:
    """The rules of every API (prompts.py), refused as this API's 422."""
    try:
        check_prompt(prompt)
    except ConfigError as e:
        raise refuse(service, "invalid", 422, str(e)) from None


@router.post("/v1/flux-kontext-dev", response_model=AsyncResponse, tags=["Models"])
def flux_kontext_dev(
    body: KontextRequest, request: Request, user: User, service: ServiceDep
) -> AsyncResponse:
    """Submit an edit with FLUX.1 Kontext [dev]. Poll `polling_url` until the status is final."""
    return submit(service, body, request, user.owner)


@router.post("/v1/flux-kontext-pro", response_model=AsyncResponse, tags=["Models"])
def flux_kontext_pro(
    body: KontextRequest, request: Request, user: User, service: ServiceDep
) -> AsyncResponse:
    """Alias of /v1/flux-kontext-dev, so clients written for BFL's hosted API work by changing their
    base URL. Served by the [dev] model."""
    return submit(service, body, request, user.owner)


@router.get("/v1/get_result", response_model=ResultResponse, tags=["Utility"])
def get_result(
    request: Request, user: User, service: ServiceDep, id: Annotated[str, Query(max_length=64)]
) -> ResultResponse:
    """A task's status (BFL's strings) and, when Ready, its result. Another key's task, an unknown id
    and an expired task are all `Task not found`."""
    job = service.job(id, user.owner)
    return not_found(id) if job is None else result_response(job, base_url(request))


@router.get(
    "/v1/samples/{token}.{ext}",
    tags=["Utility"],
    response_class=Response,
    responses={200: {"content": {"image/png": {}, "image/jpeg": {}}}, 404: {"model": ErrorResponse}},
)
def sample(token: Annotated[str, PathParam(max_length=72)], ext: str, service: ServiceDep) -> Response:
    """An image of a Ready task's result (`TOKEN.N.ext`: image N of several). The URL is the
    credential; it expires with the result."""
    name, _, index = token.partition(".")
    found = service.sample(name, int(index or 0)) if index.isdigit() or not index else None
    if found is None:
        raise HTTPException(404, "unknown or expired sample")
    job, data = found
    return Response(data, media_type=job.media_type or "image/png", headers={"Cache-Control": "private"})


@router.post(
    "/v1/edit",
    tags=["Models"],
    response_class=Response,
    responses={200: {"content": {"image/png": {}}}, 202: {"model": AsyncResponse}},
)
async def edit_sync(
    request: Request,
    user: User,
    service: ServiceDep,
    image: Annotated[UploadFile, File(description="PNG, JPEG or WebP")],
    prompt: Annotated[str, Form(description=f"the edit instruction, 1 to {MAX_PROMPT_CHARS} characters")],
    seed: Annotated[int | None, Form(ge=0, le=MAX_SEED)] = None,
    steps: Annotated[int | None, Form(ge=STEPS_RANGE[0], le=STEPS_RANGE[1])] = None,
    guidance: Annotated[float | None, Form(ge=GUIDANCE_RANGE[0], le=GUIDANCE_RANGE[1])] = None,
) -> Response:
    """Multipart edit that answers with the PNG itself (for curl). It goes through the same queue; if
    the edit takes longer than the server's sync timeout the answer is 202 with a polling URL."""
    check_accepting(service, user.owner)
    _check_prompt(service, prompt)
    data = await image.read()
    try:
        await run_in_threadpool(load_image, data)
    except ImageError as e:
        raise refuse(service, "invalid", 422, f"image: {e}") from None
    base = base_url(request)
    params = job_params(prompt, seed=seed, steps=steps, guidance=guidance, base=base)
    out = await run_sync(service, user.owner, params, data)
    if out.images is not None:
        return Response(out.images[0], media_type="image/png", headers={"X-Task-Id": out.job_id})
    if out.job is None or out.pending or out.job.state == J.HELD:
        body = AsyncResponse(id=out.job_id, polling_url=polling_url(base, out.job_id)).model_dump()
        return JSONResponse(body, status_code=202)
    view = result_response(out.job, base)
    status = 500 if out.internal else 422
    return JSONResponse({"detail": f"{view.status.value}: {out.job.details}"}, status_code=status)
