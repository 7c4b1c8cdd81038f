"""JobParams: what a job asks of the engine, typed and frozen, made in one place (`job_params`) from
any API's request (BFL's JSON, the multipart /v1/edit, OpenAI's images/edits) and stored in the job's
SQLite row as JSON. Defaults are filled in here, once: a random seed and config.DEFAULT_GUIDANCE; the
steps in Service.submit (the server's --steps, else the loaded model's default). `to_request()` is the
one mapping to the engine's EditRequest: a field both have is carried by its name."""

from __future__ import annotations

import json
import secrets
from dataclasses import asdict, dataclass, fields
from typing import Any

from ..config import DEFAULT_GUIDANCE
from ..request import MAX_SEED as MAX_SEED  # re-exported: the APIs' bound is the engine's
from ..request import EditRequest

RANDOM_SEEDS = 2**31  # a seed left out is drawn below this


@dataclass(frozen=True)
class JobParams:
    """The edit fields share EditRequest's names (prompt, seed, steps, guidance, size, num_images): a
    new edit option is one field here with its EditRequest name. The rest are the APIs' own."""

    prompt: str
    seed: int
    steps: int | None  # None until Service.submit fills in the server's default
    guidance: float
    size: tuple[int, int] | None = None  # output (w, h); None: the input's bucket
    output_format: str = "png"  # png | jpeg
    num_images: int = 1  # seeds seed .. seed + num_images - 1, one batch where the engine serves it
    aspect_ratio: str | None = None  # BFL's field as sent (recorded)
    safety_tolerance: int | None = None  # BFL's field (accepted and recorded)
    webhook_url: str | None = None
    webhook_secret: str | None = None
    base: str = ""  # the server's public base URL when accepted (URLs in webhook payloads)

    def to_request(self, image: bytes, references: tuple[bytes, ...] = ()) -> EditRequest:
        """The engine's request: the input file and references decoded (images.load_image's limits)
        and every field this class shares with EditRequest, by name."""
        return EditRequest.of(
            image, self.prompt, references=references, **{n: getattr(self, n) for n in EDIT_FIELDS}
        )

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> JobParams:
        """A stored row's params; keys this version does not know are ignored, missing ones defaulted."""
        raw: dict[str, Any] = json.loads(text)
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in raw.items() if k in known}
        if values.get("size") is not None:
            values["size"] = (int(values["size"][0]), int(values["size"][1]))
        return cls(**values)


# The fields JobParams hands EditRequest.of by name (prompt, the input and references are positional).
EDIT_FIELDS = tuple(
    f.name
    for f in fields(JobParams)
    if f.name in {g.name for g in fields(EditRequest)} and f.name not in ("prompt", "image", "references")
)


def job_params(
    prompt: str, *, seed: int | None = None, guidance: float | None = None, **given: Any
) -> JobParams:
    """A job's parameters from a request's fields: seed and guidance None (not given) get their
    defaults here, steps None waits for Service.submit (the server's), and every other JobParams field
    is passed by its own name (an unknown name is a TypeError, as JobParams itself would raise): a new
    field is one line of JobParams, not a second list here."""
    return JobParams(
        prompt=prompt,
        seed=seed if seed is not None else secrets.randbelow(RANDOM_SEEDS),
        guidance=guidance if guidance is not None else DEFAULT_GUIDANCE,
        **{"steps": None, **given},
    )
