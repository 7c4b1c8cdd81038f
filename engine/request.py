"""EditRequest: one typed edit, validated once where it is made.

`KontextEngine.edit(request)`, `Session.edit(request)` and `KontextPipeline.edit(request)` take it; the
server builds one per job, the CLI one from argv. `engine.edit(image, prompt, seed=..., ...)` is the same
call spelled with keywords: it builds `EditRequest.of(image, prompt, ...)`. A new edit option is one
field here, not a keyword threaded through five signatures. Images are already decoded (PIL) or already
encoded (`EncodedImage`): decoding and its limits belong to images.load_image, which `EditRequest.of`
calls for paths and bytes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image

from .buckets import MAX_REFERENCES, MULTIPLE, ShapeKey, edit_key
from .caching import CacheSpec, parse_cache_spec
from .config import DEFAULT_GUIDANCE
from .errors import ConfigError
from .images import load_image
from .prompts import check_prompt
from .references import DEFAULT_PLACEMENT, check_placement

if TYPE_CHECKING:  # EditRequest is checked without torch: the CLI makes one before loading anything
    import torch

MAX_STEPS = 1000
MAX_GUIDANCE = 100.0
MAX_IMAGES = 64  # one batch through the denoiser
MAX_SEED = 2**63 - 1 - MAX_IMAGES  # the largest seed: seeds seed .. seed + num_images - 1 fit in int64

ImageInput = Image.Image | str | Path | bytes  # a PIL image, or a file (path or bytes) for images.load_image


@dataclass(frozen=True)
class EncodedImage:
    """An input image already in the context's space: packed VAE latents, shifted and scaled, at a
    bucket of the pipeline's family. A previous edit's `EditResult.encoded()` is one; feeding it back
    skips the VAE decode, the 8-bit rounding and the VAE encode of a re-encoded output."""

    tokens: torch.Tensor  # [1, N, 64]
    size: tuple[int, int]  # (w, h) in pixels

    @property
    def width(self) -> int:
        return self.size[0]

    @property
    def height(self) -> int:
        return self.size[1]


@dataclass(frozen=True)
class EditRequest:
    """Edit `image` as `prompt` says.

    steps None: the model's default (`ModelPreset.default_steps`; `resolved()` fills it in).
    size None: the output takes the input's bucket. references: up to 3 more images placed beside the
    input as `placement` says (references.py). num_images: seeds seed .. seed + num_images - 1, one batch.
    cache: this edit's step cache (engine/caching; a spec text is parsed); None: the engine's default,
    an "off" spec: no cache for this edit whatever the default.
    """

    image: Image.Image | EncodedImage
    prompt: str
    steps: int | None = None
    guidance: float = DEFAULT_GUIDANCE
    seed: int = 0
    size: tuple[int, int] | None = None  # output (width, height)
    references: tuple[Image.Image, ...] = ()
    placement: str = DEFAULT_PLACEMENT
    num_images: int = 1
    cache: CacheSpec | None = None

    def __post_init__(self) -> None:
        if isinstance(self.cache, str):
            object.__setattr__(self, "cache", parse_cache_spec(self.cache))
        if self.cache is not None and not isinstance(self.cache, CacheSpec):
            raise ConfigError(f"cache must be a spec text or a CacheSpec, got {type(self.cache).__name__}")
        if not isinstance(self.image, Image.Image | EncodedImage):
            raise ConfigError(
                f"image must be a PIL image or an EncodedImage, got {type(self.image).__name__} "
                "(EditRequest.of decodes paths and bytes)"
            )
        check_prompt(self.prompt)  # the rules of every API (prompts.py)
        if self.steps is not None and not 1 <= self.steps <= MAX_STEPS:
            raise ConfigError(f"steps must be between 1 and {MAX_STEPS}, got {self.steps}")
        if not (math.isfinite(self.guidance) and 0.0 <= self.guidance <= MAX_GUIDANCE):
            raise ConfigError(f"guidance must be between 0 and {MAX_GUIDANCE:g}, got {self.guidance}")
        if not 0 <= self.seed <= MAX_SEED:
            raise ConfigError(f"seed must be between 0 and {MAX_SEED}, got {self.seed}")
        if self.size is not None:
            w, h = self.size
            if w <= 0 or h <= 0 or w % MULTIPLE or h % MULTIPLE:
                raise ConfigError(f"size must be positive multiples of {MULTIPLE}, got {w}x{h}")
        if len(self.references) > MAX_REFERENCES:
            raise ConfigError(
                f"an edit takes at most {MAX_REFERENCES} reference images beside the input, "
                f"got {len(self.references)}"
            )
        if not all(isinstance(r, Image.Image) for r in self.references):
            raise ConfigError("references must be PIL images (EditRequest.of decodes paths and bytes)")
        check_placement(self.placement)
        if not 1 <= self.num_images <= MAX_IMAGES:
            raise ConfigError(f"num_images must be between 1 and {MAX_IMAGES}, got {self.num_images}")

    @classmethod
    def of(
        cls,
        image: ImageInput | EncodedImage,
        prompt: str,
        *,
        references: Sequence[ImageInput] = (),
        steps: int | None = None,
        guidance: float = DEFAULT_GUIDANCE,
        seed: int = 0,
        size: tuple[int, int] | None = None,
        placement: str = DEFAULT_PLACEMENT,
        num_images: int = 1,
        cache: str | CacheSpec | None = None,
    ) -> EditRequest:
        """A request from files, bytes or images: paths and bytes are decoded and checked by
        images.load_image (format, size limits, EXIF orientation, RGB)."""

        def decoded(x: ImageInput) -> Image.Image:
            return x if isinstance(x, Image.Image) else load_image(x)

        return cls(
            image=image if isinstance(image, EncodedImage) else decoded(image),
            prompt=prompt,
            steps=steps,
            guidance=guidance,
            seed=seed,
            size=None if size is None else (int(size[0]), int(size[1])),
            references=tuple(decoded(r) for r in references),
            placement=placement,
            num_images=num_images,
            cache=None if cache is None else parse_cache_spec(cache),
        )

    def resolved(self, default_steps: int) -> EditRequest:
        """This request with `steps` filled in from the model's default when it was left None."""
        return self if self.steps is not None else replace(self, steps=default_steps)

    def shape_key(self, family: str, text_tokens: int) -> ShapeKey:
        """The shape key this edit runs at in bucket `family` (buckets.edit_key: the one rule)."""
        refs = [r.size for r in self.references]
        return edit_key(self.image.size, self.size, family, text_tokens, refs, self.num_images)

    @property
    def seeds(self) -> tuple[int, ...]:
        """The seed of each image: seed, seed + 1, ..."""
        return tuple(self.seed + i for i in range(self.num_images))

    @property
    def input_images(self) -> list[Image.Image]:
        """The pixel images a safety check must see: the input (unless already encoded) and references."""
        head = [self.image] if isinstance(self.image, Image.Image) else []
        return [*head, *self.references]
