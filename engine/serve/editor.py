"""The one thing the server asks of an engine: bytes in, encoded image bytes out. `LocalEditor` runs
a KontextEngine in this process; ray_app.RayEditor sends the same EditJob to a Ray replica. Both
raise engine.errors.ModeratedError (safety) and KontextError (bad input) as the engine does."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from ..runtime import KontextEngine

MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg"}


@dataclass(frozen=True)
class EditJob:
    """One edit, serializable (it crosses process boundaries under Ray)."""

    image: bytes  # the input file as the client sent it (PNG, JPEG or WebP)
    prompt: str
    seed: int
    steps: int
    guidance: float
    size: tuple[int, int] | None  # output (w, h); None: the input's bucket
    output_format: str = "png"
    references: tuple[bytes, ...] = ()  # input_image_2..4: KontextEngine.edit's references


@dataclass(frozen=True)
class EditOutput:
    data: bytes  # the encoded image
    media_type: str
    size: tuple[int, int]
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage (EditResult.timings)
    backend: str = ""


class Editor(Protocol):
    """Safe to call from several threads at once. `family`: the bucket family its outputs come in.
    `review`: the engine's safety policy asks a person to approve every output before it is shared."""

    family: str
    review: bool

    def edit(self, job: EditJob) -> EditOutput: ...

    def stats(self) -> dict[str, int]: ...  # dispatch hits, misses, fallbacks

    def close(self) -> None: ...


class LocalEditor:
    """A KontextEngine in this process. `owned`: close the engine with the editor."""

    def __init__(self, engine: KontextEngine, *, owned: bool = True) -> None:
        self.engine = engine
        self.owned = owned
        self.family = engine.family
        # The safety layer's policy (engine.safety.SafetyPolicy.review) holds every result for a person.
        self.review = bool(getattr(getattr(engine, "safety", None), "review", False))

    def edit(self, job: EditJob) -> EditOutput:
        from ..images import load_image

        image = load_image(job.image)
        extra: dict[str, Any] = {}
        if job.references:  # input_image_2..4
            extra["references"] = [load_image(r) for r in job.references]
        result = self.engine.edit(
            image, job.prompt, seed=job.seed, steps=job.steps, guidance=job.guidance, size=job.size, **extra
        )
        # The engine's output path: AI disclosure and model in the metadata (never the prompt: prompts
        # can be private), C2PA-signed with the input as parent when the engine has a signer.
        data = self.engine.outputs.encode(result, "JPEG" if job.output_format == "jpeg" else "PNG",
                                          source=job.image)  # fmt: skip
        return EditOutput(
            data, MEDIA_TYPES[job.output_format], result.size, dict(result.timings), result.backend
        )

    def stats(self) -> dict[str, int]:
        s = self.engine.stats()
        return {"hits": s.hits, "misses": s.misses, "fallbacks": s.fallbacks}

    def warmup(self) -> None:
        self.engine.warmup()

    def close(self) -> None:
        if self.owned:
            self.engine.close()
