"""OpenAI's Images API, the edits route: `POST /v1/images/edits`, so the official `openai` SDK (and any
client of it) edits with this server by changing its base URL. See docs/openai.md.

Multipart fields: `image` (one file) or `image[]` (several: the first is the input, the rest are
reference images), `prompt`, `n` (1-10, one batch), `size` ("WxH": the bucket of the nearest aspect
ratio; "auto": the input's), `response_format` (b64_json, the default, or url), `output_format` (png or
jpeg), `model` (accepted, ignored: the server runs its one model), and this model's own `seed`, `steps`,
`guidance`. Other fields are ignored, as OpenAI ignores them; `mask` is refused (Kontext edits by
instruction, not by mask). The key is `Authorization: Bearer <key>` (or X-Key).

Synchronous, as OpenAI's: the answer waits for the edit, through the same queue, limits, moderation,
C2PA signing and AI disclosure as BFL's routes, up to the server's sync timeout. Every error is
OpenAI's `{"error": {"message", "type", "param", "code"}}` (refusals.py); a moderated prompt or
output is a 400 with code `moderation_blocked`.

No `from __future__ import annotations`: FastAPI reads the route signatures' annotations at import time.
"""

import base64
import io
import re
import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from PIL import Image
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData, UploadFile

from ..buckets import MAX_REFERENCES, nearest_bucket
from ..errors import ConfigError, ImageError
from ..images import FORMATS, load_image
from ..prompts import check_prompt
from . import jobs as J
from .deps import ServiceDep, User, base_url
from .params import MAX_SEED, job_params
from .refusals import Refused, check_accepting, refuse
from .service import Service
from .settings import GUIDANCE_RANGE, MAX_PROMPT_CHARS, STEPS_RANGE
from .sync import SyncOutcome, run_sync
from .views import sample_url

MAX_N = 10  # OpenAI's bound on n
SIZE = re.compile(r"^\s*(\d{1,5})\s*x\s*(\d{1,5})\s*$")
RESPONSE_FORMATS = ("b64_json", "url")
OUTPUT_FORMATS = tuple(f.api_name for f in FORMATS if f.output)  # in OpenAI's spelling: "png", "jpeg"
MODERATED = (J.REQUEST_MODERATED, J.CONTENT_MODERATED)

router = APIRouter(tags=["OpenAI"])


class ImageData(BaseModel):
    b64_json: str | None = None
    url: str | None = None


class OpenAIErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class OpenAIError(BaseModel):
    """OpenAI's error shape, of every error on this route."""

    error: OpenAIErrorBody


ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": OpenAIError, "description": text}
    for code, text in {
        400: "invalid field (param), or moderated (code moderation_blocked)",
        401: "missing or unknown key (code invalid_api_key)",
        403: "results on this server wait for review",
        413: "request body over the limit",
        422: "not used: invalid fields are 400",
        429: "too many tasks in flight (Retry-After says when to retry)",
        503: "warming up or shutting down",
        504: "the edit outlasted the sync timeout (the task goes on)",
    }.items()
}


class ImagesResponse(BaseModel):
    """OpenAI's ImagesResponse (`created`: Unix seconds)."""

    created: int
    data: list[ImageData]
    output_format: str
    size: str
    steps_computed: int | None = None  # ours: full transformer passes per image (a step cache skips some)


_FORM_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["image", "prompt"],
    "properties": {
        "image": {
            "type": "string",
            "format": "binary",
            "description": "The image to edit (PNG, JPEG, WebP).",
        },
        "image[]": {
            "type": "array",
            "items": {"type": "string", "format": "binary"},
            "description": f"Several images: the first is edited, the next (up to {MAX_REFERENCES}) are "
            "references (character, style, object).",
        },
        "prompt": {"type": "string", "maxLength": MAX_PROMPT_CHARS},
        "n": {"type": "integer", "minimum": 1, "maximum": MAX_N, "default": 1},
        "size": {"type": "string", "description": "WxH (the bucket of the nearest aspect ratio) or auto"},
        "response_format": {"type": "string", "enum": list(RESPONSE_FORMATS), "default": "b64_json"},
        "output_format": {"type": "string", "enum": list(OUTPUT_FORMATS), "default": "png"},
        "model": {"type": "string", "description": "Accepted and ignored."},
        "seed": {"type": "integer", "minimum": 0, "maximum": MAX_SEED},
        "steps": {"type": "integer", "minimum": STEPS_RANGE[0], "maximum": STEPS_RANGE[1]},
        "guidance": {"type": "number", "minimum": GUIDANCE_RANGE[0], "maximum": GUIDANCE_RANGE[1]},
    },
}


def _invalid(service: Service, param: str, message: str, code: str | None = None) -> Refused:
    return refuse(service, "invalid", 400, message, param=param, code=code)


def _text(service: Service, form: FormData, name: str, default: str | None = None) -> str | None:
    value = form.get(name)
    if value is None:
        return default
    if not isinstance(value, str):
        raise _invalid(service, name, f"{name} must be a text field, not a file")
    return value.strip()


def _number(service: Service, form: FormData, name: str, kind: type, low: float, high: float) -> Any:
    text = _text(service, form, name)
    if text is None or text == "":
        return None
    try:
        value = kind(text)
    except ValueError:
        raise _invalid(service, name, f"{name} must be a number, got {text[:40]!r}") from None
    if not low <= value <= high:
        raise _invalid(service, name, f"{name} must be between {low} and {high}, got {value}")
    return value


def _size(service: Service, text: str | None, family: str) -> tuple[int, int] | None:
    if text is None or text == "auto":
        return None
    m = SIZE.match(text)
    if m is None or int(m.group(1)) == 0 or int(m.group(2)) == 0:
        raise _invalid(service, "size", f"size must be 'WxH' (e.g. 1024x1024) or 'auto', got {text[:40]!r}")
    return nearest_bucket(int(m.group(1)), int(m.group(2)), family)


async def _images(service: Service, form: FormData) -> list[bytes]:
    files = [*form.getlist("image"), *form.getlist("image[]")]
    if not files:
        raise _invalid(service, "image", "image is required: the image to edit (multipart file field)")
    if len(files) > 1 + MAX_REFERENCES:
        raise _invalid(
            service,
            "image",
            f"at most {1 + MAX_REFERENCES} images: the input and "
            f"{MAX_REFERENCES} references, got {len(files)}",
        )
    out = []
    for k, f in enumerate(files):
        if not isinstance(f, UploadFile):
            raise _invalid(service, "image", "image must be a file upload, not a text field")
        data = await f.read()
        try:
            await run_in_threadpool(load_image, data)
        except ImageError as e:
            raise _invalid(service, "image", f"image {k + 1}: {e}", code="invalid_image") from None
        out.append(data)
    return out


@router.post(
    "/v1/images/edits",
    response_model=ImagesResponse,
    responses=ERRORS,
    openapi_extra={
        "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": _FORM_SCHEMA}}}
    },
)
async def images_edits(request: Request, user: User, service: ServiceDep) -> JSONResponse:
    """Edit an image as `prompt` says; the answer carries `n` images (OpenAI's images.edit)."""
    check_accepting(service, user.owner)
    assert service.editor is not None  # check_accepting() passed: the editor is loaded
    if service.review_on:
        raise refuse(
            service,
            "review",
            403,
            "results on this server wait for a reviewer, which a "
            "synchronous answer cannot give; use BFL's API (POST /v1/flux-kontext-dev, then poll "
            "/v1/get_result)",
        )
    async with request.form(max_files=2 * (1 + MAX_REFERENCES), max_fields=64) as form:
        if form.get("mask") is not None:
            raise _invalid(
                service,
                "mask",
                "mask is not supported: FLUX.1 Kontext edits by instruction; "
                "say in the prompt what to change",
            )
        try:  # the rules of every API (prompts.py)
            prompt = check_prompt(_text(service, form, "prompt"))
        except ConfigError as e:
            raise _invalid(service, "prompt", str(e)) from None
        n = _number(service, form, "n", int, 1, MAX_N) or 1
        response_format = _text(service, form, "response_format", "b64_json")
        if response_format not in RESPONSE_FORMATS:
            raise _invalid(
                service,
                "response_format",
                f"response_format must be b64_json or url, got {response_format!r}",
            )
        output_format = _text(service, form, "output_format", "png")
        output_format = "jpeg" if output_format == "jpg" else output_format
        if output_format not in OUTPUT_FORMATS:
            allowed = " or ".join(OUTPUT_FORMATS)
            raise _invalid(
                service, "output_format", f"output_format must be {allowed}, got {output_format!r}"
            )
        size = _size(service, _text(service, form, "size"), service.editor.family)
        seed = _number(service, form, "seed", int, 0, MAX_SEED)
        steps = _number(service, form, "steps", int, *STEPS_RANGE)
        guidance = _number(service, form, "guidance", float, *GUIDANCE_RANGE)
        images = await _images(service, form)
    base = base_url(request)
    params = job_params(
        prompt,
        seed=seed,
        steps=steps,
        guidance=guidance,
        size=size,
        output_format=output_format,
        num_images=n,
        base=base,
    )
    out = await run_sync(service, user.owner, params, images[0], tuple(images[1:]))
    job, data = out.job, out.images
    if job is None or data is None:
        raise _failed(service, out)
    w, h = Image.open(io.BytesIO(data[0])).size
    items = [
        ImageData(b64_json=base64.b64encode(d).decode())
        if response_format == "b64_json"
        else ImageData(url=sample_url(base, job, i))
        for i, d in enumerate(data)
    ]
    computed = (job.timings or {}).get("steps_computed")
    body = ImagesResponse(
        created=int(job.finished or time.time()),
        data=items,
        output_format=output_format,
        size=f"{w}x{h}",
        steps_computed=None if computed is None else int(computed),
    )
    return JSONResponse(body.model_dump(exclude_none=True), headers={"X-Task-Id": out.job_id})


def _failed(service: Service, out: SyncOutcome) -> Refused:
    """The refusal for a job that did not end Ready."""
    job, job_id = out.job, out.job_id
    details = (job.details if job is not None else None) or {}
    if job is None or out.pending:
        return Refused(
            504,
            f"the edit did not finish within {service.settings.sync_timeout:.0f}s; it goes on "
            f"as task {job_id} (poll /v1/get_result?id={job_id} with the same key)",
        )
    if job.state in MODERATED:
        reason = details.get("reason") or "flagged"
        what = "request" if job.state == J.REQUEST_MODERATED else "output"
        return Refused(
            400,
            f"Your request was rejected by the safety system ({what}: {reason})",
            code="moderation_blocked",
        )
    if job.state == J.HELD:
        return Refused(403, f"the result is held for review; poll /v1/get_result?id={job_id}")
    error = str(details.get("error", "the edit failed"))
    return Refused(500 if out.internal else 400, error)
