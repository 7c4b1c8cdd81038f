"""The one thing the server asks of an engine: bytes in, encoded image bytes out. `LocalEditor` runs
a KontextEngine in this process; ray_app.RayEditor sends the same EditJob to a Ray replica. Both
raise engine.errors.ModeratedError (safety) and KontextError (bad input) as the engine does."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from ..images import image_format
from .params import JobParams

if TYPE_CHECKING:
    from ..runtime import KontextEngine


@dataclass(frozen=True)
class EditJob:
    """One edit, serializable (it crosses process boundaries under Ray)."""

    params: JobParams
    image: bytes  # the input file as the client sent it (PNG, JPEG or WebP)
    references: tuple[bytes, ...] = ()  # reference images beside the input (BFL's input_image_2..4)


@dataclass(frozen=True)
class EditOutput:
    images: tuple[bytes, ...]  # the encoded images, one per seed (params.num_images)
    media_type: str
    size: tuple[int, int]
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage (EditResult.timings)
    backend: str = ""


class Editor(Protocol):
    """Safe to call from several threads at once. `family`: the bucket family its outputs come in.
    `review`: the engine's safety policy asks a person to approve every output before it is shared.
    `default_steps`: the model's default (KontextEngine.default_steps): the steps of a request that
    leaves them out on a server started without --steps (Service.default_steps)."""

    family: str
    review: bool
    default_steps: int

    def edit(self, job: EditJob) -> EditOutput: ...

    def stats(self) -> dict[str, int]: ...  # dispatch hits, misses, fallbacks

    def close(self) -> None: ...


class LocalEditor:
    """A KontextEngine in this process. `owned`: close the engine with the editor."""

    def __init__(self, engine: KontextEngine, *, owned: bool = True) -> None:
        self.engine = engine
        self.owned = owned
        self.family = engine.family
        self.default_steps = engine.default_steps
        # The safety layer's policy (engine.safety.SafetyPolicy.review) holds every result for a person.
        self.review = bool(getattr(getattr(engine, "safety", None), "review", False))
        plan = getattr(engine, "memory_plan", None)  # planned once, at load (kontext serve --vram)
        self.memory_plan = plan.to_json() if plan is not None else None

    def edit(self, job: EditJob) -> EditOutput:
        # The input is decoded a second time here (the routes decoded it once to refuse a bad file
        # with a 4xx before admitting it): a job stores and carries the client's bytes, not pixels, so
        # it survives a crash and a restart, and crosses to a Ray replica, as the same file.
        p = job.params
        result = self.engine.edit(p.to_request(job.image, job.references))
        # The engine's output path: AI disclosure and model in the metadata (never the prompt: prompts
        # can be private), C2PA-signed with the input as parent when the engine has a signer. No
        # response reveals a local path: the metadata names the build folder, never its path.
        fmt = image_format(p.output_format)
        images = tuple(
            self.engine.outputs.encode(result, fmt.name, index=i, source=job.image)
            for i in range(len(result.images))
        )
        return EditOutput(images, fmt.mime, result.size, dict(result.timings), result.backend)

    def stats(self) -> dict[str, int]:
        s = self.engine.stats()
        return {"hits": s.hits, "misses": s.misses, "fallbacks": s.fallbacks}

    def warmup(self) -> None:
        self.engine.warmup()

    def close(self) -> None:
        if self.owned:
            self.engine.close()
