"""The wire format: BFL's request and response models (field names, status strings), as pydantic
models that FastAPI turns into /openapi.json. Fields sent as null mean "not given"."""

from __future__ import annotations

from enum import Enum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from ..config import DEFAULT_GUIDANCE
from . import jobs as J
from .params import MAX_SEED
from .settings import GUIDANCE_RANGE, MAX_PROMPT_CHARS, STEPS_RANGE

STEPS_DEFAULT = "Default: the model's default steps."  # create_app's OpenAPI names the loaded model's number


class Status(str, Enum):
    """BFL's task statuses, exactly as its API spells them."""

    pending = "Pending"
    ready = "Ready"
    error = "Error"
    request_moderated = "Request Moderated"
    content_moderated = "Content Moderated"
    not_found = "Task not found"


# A stored job's state (jobs.py) as BFL's status: held for review is still Pending to its owner.
STATUS: dict[str, Status] = {
    J.QUEUED: Status.pending,
    J.RUNNING: Status.pending,
    J.HELD: Status.pending,
    J.READY: Status.ready,
    J.ERROR: Status.error,
    J.REQUEST_MODERATED: Status.request_moderated,
    J.CONTENT_MODERATED: Status.content_moderated,
}


class OutputFormat(str, Enum):
    png = "png"
    jpeg = "jpeg"


class KontextRequest(BaseModel):
    """POST /v1/flux-kontext-dev (and the /v1/flux-kontext-pro alias): BFL's Kontext inputs, plus
    `steps` and `guidance`, which the open [dev] model exposes."""

    model_config = ConfigDict(extra="ignore")

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS, description="The edit instruction.")
    input_image: str | None = Field(
        default=None,
        description="The image to edit: base64, or a data: URL (http(s) URLs only with --allow-urls). "
        "Required: this server edits images.",
    )
    input_image_2: str | None = Field(
        default=None,
        description="A reference image (character, style, object) beside the input; as input_image.",
    )
    input_image_3: str | None = Field(
        default=None,
        description="A reference image (character, style, object) beside the input; as input_image.",
    )
    input_image_4: str | None = Field(
        default=None,
        description="A reference image (character, style, object) beside the input; as input_image.",
    )
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED, description="Default: a random seed.")
    aspect_ratio: str | None = Field(
        default=None,
        max_length=16,
        description="'W:H' between 21:9 and 9:21 picks the output bucket; default: the input's.",
    )
    steps: int | None = Field(default=None, ge=STEPS_RANGE[0], le=STEPS_RANGE[1], description=STEPS_DEFAULT)
    guidance: float | None = Field(
        default=None, ge=GUIDANCE_RANGE[0], le=GUIDANCE_RANGE[1], description=f"Default {DEFAULT_GUIDANCE}."
    )
    output_format: OutputFormat | None = Field(default=None, description="png (default) or jpeg.")
    safety_tolerance: int | None = Field(default=None, ge=0, le=6, description="Accepted and recorded.")
    prompt_upsampling: bool | None = Field(default=None, description="true is refused: not available.")
    webhook_url: str | None = Field(
        default=None, max_length=2048, description="Called when the task ends (only with --allow-webhooks)."
    )
    webhook_secret: str | None = Field(default=None, max_length=256, description="Sent as X-Webhook-Secret.")


class AsyncResponse(BaseModel):
    id: str
    polling_url: str


class ResultResponse(BaseModel):
    """GET /v1/get_result. When Ready, `result` holds `sample` (a URL that expires), `prompt`, `seed`,
    `start_time`, `end_time`, `duration` and the server's `timings` (seconds per stage)."""

    id: str
    status: Status
    result: dict[str, Any] | None = None
    progress: float | None = None
    details: dict[str, Any] | None = None


class ErrorResponse(BaseModel):
    detail: Any


class ReviewItem(BaseModel):
    id: str
    prompt: str
    created: float


class HealthResponse(BaseModel):
    status: str
    detail: str | None = None
    # /readyz once loaded with --vram: the memory plan (MemoryPlan.to_json(): fits, peak_bytes, components)
    memory: dict[str, Any] | None = None
