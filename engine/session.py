"""Successive edits of one image: each turn's output is the next turn's input.

reencode=True (default) feeds the output image back, exactly as a user re-uploading the saved PNG
would: turn k equals a fresh edit of turn k-1's file. reencode=False feeds the previous turn's final
latents as the next context instead: the denoiser writes latents in the same packed, shifted and
scaled space the VAE encoder's context is in, so no decode, no 8-bit rounding, no encode.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Protocol

from PIL import Image

from .errors import ConfigError
from .pipeline import EditResult
from .request import EditRequest, EncodedImage


class Editing(Protocol):
    """What a session needs of its engine (runtime.KontextEngine is one)."""

    def edit(self, request: EditRequest, /, *, progress: bool = False) -> EditResult: ...


class Session:
    """A chain of edits through one loaded engine. Not thread-safe: one caller per session (the engine
    under it is; open a session per user)."""

    def __init__(self, engine: Editing, image: Image.Image, *, reencode: bool = True) -> None:
        self.engine = engine
        self.reencode = reencode
        self.image = image  # the next turn's input image (after a turn: its output)
        self.turns: list[EditResult] = []
        self._encoded: EncodedImage | None = None  # reencode=False: the previous turn's latents

    @property
    def context(self) -> Image.Image | EncodedImage:
        """What the next turn edits: the current image, or (reencode=False, after turn 1) its latents."""
        return self._encoded if self._encoded is not None else self.image

    def edit(self, prompt: str | EditRequest, *, progress: bool = False, **knobs: Any) -> EditResult:
        """One turn: edit the previous turn's output (the session's image on turn 1) as `prompt` says,
        with `knobs` as in EditRequest.of (seed, steps, guidance, size, references, placement). Or pass
        an EditRequest: the session puts its own input in place of the request's image. One image per
        turn. With reencode=False, keep size None (the output stays at its input's bucket) so the
        latents can be the next context."""
        if isinstance(prompt, EditRequest):
            if knobs:
                raise ConfigError("pass an EditRequest alone, or a prompt and keywords; not both")
            request = replace(prompt, image=self.context)
        else:
            request = EditRequest.of(self.context, prompt, **knobs)
        if request.num_images != 1:
            raise ConfigError("a session edits one image per turn: num_images must be 1")
        result = self.engine.edit(request, progress=progress)
        self.turns.append(result)
        self.image = result.image
        if not self.reencode:
            self._encoded = result.encoded()
        return result
