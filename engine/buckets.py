"""The Kontext resolutions, their area families, bucket choice, and shape keys.

This module is the single source of truth for which shapes exist: a bucket (w, h) is a
pixel size; its shape key is what the transformer sees (token counts), and engines are
built and dispatched by shape key. (w, h) and (h, w) share a key: positions travel in img_ids.
Reference images (up to MAX_REFERENCES beside the input image) add their tokens to the
context; `reference_bucket` is the rule that bounds them.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache

from .errors import BucketError

# (width, height), all near 1 MP; identical in diffusers, BFL flux and the TensorRT demo.
KONTEXT_RESOLUTIONS: tuple[tuple[int, int], ...] = (
    (672, 1568),
    (688, 1504),
    (720, 1456),
    (752, 1392),
    (800, 1328),
    (832, 1248),
    (880, 1184),
    (944, 1104),
    (1024, 1024),
    (1104, 944),
    (1184, 880),
    (1248, 832),
    (1328, 800),
    (1392, 752),
    (1456, 720),
    (1504, 688),
    (1568, 672),
)

MAX_REFERENCES = 3  # beside the input image: BFL's API takes input_image_2..4
MULTIPLE = 16  # VAE downsamples 8x, then 2x2 packing: every side a multiple of 16
PIXELS_PER_TOKEN = MULTIPLE * MULTIPLE

# Family name -> linear scale applied to the 1 MP resolutions.
FAMILIES: dict[str, float] = {
    "1mp": 1.0,
    "0.5mp": math.sqrt(0.5),
    "0.25mp": 0.5,
    "small": 0.25,  # ~0.06 MP: the `small` preset on a CPU
    "tiny": 0.125,  # ~0.016 MP: the `tiny` preset in tests
}


@dataclass(frozen=True, order=True)
class ShapeKey:
    """What one transformer call sees: batch and token counts. Engines are keyed by this."""

    batch: int
    target_tokens: int  # tokens of the image being generated
    context_tokens: int  # tokens of the packed context: the input image plus every reference
    text_tokens: int  # T5 tokens

    @property
    def image_tokens(self) -> int:
        """Length of the img stream: target and context concatenated."""
        return self.target_tokens + self.context_tokens

    @property
    def total_tokens(self) -> int:
        return self.image_tokens + self.text_tokens

    def __str__(self) -> str:
        return f"b{self.batch}_t{self.target_tokens}_c{self.context_tokens}_x{self.text_tokens}"


def _round16(x: float) -> int:
    return max(MULTIPLE, round(x / MULTIPLE) * MULTIPLE)


def _floor16(x: float) -> int:
    return max(MULTIPLE, math.floor(x / MULTIPLE) * MULTIPLE)


def family_scale(family: str) -> float:
    try:
        return FAMILIES[family]
    except KeyError:
        known = ", ".join(FAMILIES)
        raise BucketError(f"unknown bucket family {family!r}; known families: {known}") from None


@cache
def buckets(family: str = "1mp") -> tuple[tuple[int, int], ...]:
    """The family's resolutions (w, h), in the order of KONTEXT_RESOLUTIONS, duplicates removed."""
    scale = family_scale(family)
    out: list[tuple[int, int]] = []
    for w, h in KONTEXT_RESOLUTIONS:
        b = (_round16(w * scale), _round16(h * scale))
        if b not in out:
            out.append(b)
    return tuple(out)


def tokens(width: int, height: int) -> int:
    """Packed latent tokens of an image of this pixel size."""
    if width % MULTIPLE or height % MULTIPLE or width <= 0 or height <= 0:
        raise BucketError(f"{width}x{height} is not a positive multiple of {MULTIPLE} on both sides")
    return (width // MULTIPLE) * (height // MULTIPLE)


def nearest_bucket(width: int, height: int, family: str = "1mp") -> tuple[int, int]:
    """The family's bucket with the aspect ratio nearest to width/height: min |w/h - ar|.

    Ties go to the first bucket in KONTEXT_RESOLUTIONS order (as in diffusers and BFL).
    """
    if width <= 0 or height <= 0:
        raise BucketError(f"image size must be positive, got {width}x{height}")
    ar = width / height
    return min(buckets(family), key=lambda b: abs(b[0] / b[1] - ar))


def shape_key(
    target: tuple[int, int],
    context: tuple[int, int],
    text_tokens: int,
    batch: int = 1,
    references: Sequence[tuple[int, int]] = (),
) -> ShapeKey:
    """The shape key of an edit producing `target` (w, h) from a context image of size `context` and
    reference images at the bucket sizes `references` (w, h): their tokens add to the context's."""
    context_tokens = tokens(*context) + sum(tokens(*r) for r in references)
    return ShapeKey(batch, tokens(*target), context_tokens, text_tokens)


def edit_key(
    image_size: tuple[int, int],
    size: tuple[int, int] | None,
    family: str,
    text_tokens: int,
    references: Sequence[tuple[int, int]] = (),
    batch: int = 1,
) -> ShapeKey:
    """The shape key of an edit, the one rule the pipeline (PreparedEdit.shape_key) and the dispatcher
    share: the context is the input (w, h) at its nearest bucket plus each reference (w, h) at its
    reference bucket; the target is `size` (None: the input's bucket); `batch` images."""
    bucket = nearest_bucket(*image_size, family)
    refs = [reference_bucket(w, h, family, len(references)) for w, h in references]
    return shape_key(size or bucket, bucket, text_tokens, batch, refs)


# ------------------------------------------------------------------ reference images


@cache
def reference_buckets(family: str, refs: int) -> tuple[tuple[int, int], ...]:
    """The buckets a reference image may get when an edit carries `refs` references (1..3).

    The rule: the references share the token budget of one image of the family. Each one goes to
    the bucket of its aspect ratio among the 17 Kontext resolutions scaled by family_scale / sqrt(refs),
    each side rounded DOWN to a multiple of 16. Rounding down makes the bound exact: a reference holds
    at most 1/refs of the largest 1 MP bucket's pixels at the family's scale, so the references together
    hold at most `reference_budget(family)` tokens and the whole context at most the input image's
    bucket plus that. With one reference at 1 MP, these are exactly the 17 Kontext resolutions.
    """
    if not 1 <= refs <= MAX_REFERENCES:
        raise BucketError(f"an edit takes 1 to {MAX_REFERENCES} reference images here, got {refs}")
    scale = family_scale(family) / math.sqrt(refs)
    out: list[tuple[int, int]] = []
    for w, h in KONTEXT_RESOLUTIONS:
        b = (_floor16(w * scale), _floor16(h * scale))
        if b not in out:
            out.append(b)
    return tuple(out)


def reference_bucket(width: int, height: int, family: str, refs: int) -> tuple[int, int]:
    """The bucket of one of `refs` reference images of size width x height: nearest aspect ratio among
    `reference_buckets(family, refs)`, ties to the first (the same choice as nearest_bucket)."""
    if width <= 0 or height <= 0:
        raise BucketError(f"reference image size must be positive, got {width}x{height}")
    ar = width / height
    return min(reference_buckets(family, refs), key=lambda b: abs(b[0] / b[1] - ar))


def reference_budget(family: str) -> int:
    """The most tokens the references of one edit hold together, whatever their number: the largest
    1 MP bucket's pixels at the family's scale, in tokens (floor)."""
    largest = max(w * h for w, h in KONTEXT_RESOLUTIONS)
    return math.floor(largest * family_scale(family) ** 2 / PIXELS_PER_TOKEN)


def reference_token_sums(family: str, refs: int) -> tuple[int, ...]:
    """Every total token count `refs` references can add to the context, ascending (0 for refs=0)."""
    if refs == 0:
        return (0,)
    counts = sorted({tokens(*b) for b in reference_buckets(family, refs)})
    return tuple(sorted({sum(c) for c in itertools.combinations_with_replacement(counts, refs)}))


def family_shape_keys(family: str, text_tokens: int, batch: int = 1, refs: int = 0) -> frozenset[ShapeKey]:
    """Every shape key of a family's edits with `refs` reference images: the target in each bucket, the
    input image in the same bucket, and every total the references can add (see reference_bucket)."""
    return frozenset(
        ShapeKey(batch, tokens(*b), tokens(*b) + extra, text_tokens)
        for b in buckets(family)
        for extra in reference_token_sums(family, refs)
    )
