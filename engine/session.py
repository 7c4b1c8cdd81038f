"""Successive edits of one image: each turn's output is the next turn's input.

reencode=True (default) feeds the output image back, exactly as a user re-uploading the saved PNG
would: turn k equals a fresh edit of turn k-1's file. reencode=False feeds the previous turn's final
latents as the next context instead: the denoiser writes latents in the same packed, shifted and
scaled space the VAE encoder's context is in, so no decode, no 8-bit rounding, no encode.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from PIL import Image

from .pipeline import EditResult, EncodedImage
from .references import DEFAULT_PLACEMENT

if TYPE_CHECKING:
    from .runtime import ImageInput, KontextEngine


class Session:
    """A chain of edits through one loaded engine. Not thread-safe: one caller per session (the engine
    under it is; open a session per user)."""

    def __init__(self, engine: KontextEngine, image: Image.Image, *, reencode: bool = True) -> None:
        self.engine = engine
        self.reencode = reencode
        self.image = image  # the next turn's input image (after a turn: its output)
        self.turns: list[EditResult] = []
        self._encoded: EncodedImage | None = None  # reencode=False: the previous turn's latents

    @property
    def context(self) -> Image.Image | EncodedImage:
        """What the next turn edits: the current image, or (reencode=False, after turn 1) its latents."""
        return self._encoded if self._encoded is not None else self.image

    def edit(
        self,
        prompt: str,
        *,
        seed: int = 0,
        steps: int | None = None,
        guidance: float = 2.5,
        size: tuple[int, int] | None = None,
        references: Sequence[ImageInput] = (),
        placement: str = DEFAULT_PLACEMENT,
        progress: bool = False,
    ) -> EditResult:
        """One turn: edit the previous turn's output (the session's image on turn 1) as `prompt` says.
        With reencode=False, keep size None (the output stays at its input's bucket) so the latents can
        be the next context."""
        result = self.engine.edit(
            self.context, prompt, seed=seed, steps=steps, guidance=guidance, size=size,
            references=references, placement=placement, progress=progress,
        )  # fmt: skip
        self.turns.append(result)
        self.image = result.image
        if not self.reencode:
            self._encoded = result.encoded()
        return result
