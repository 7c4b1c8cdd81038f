"""Where the context images sit in position-id space: the input image and up to 3 references.

Kontext [dev] was trained with one context image at id index 1 and the target at index 0. Two ways to
add more, both from ComfyUI (comfy/ldm/flux/model.py, `ref_latents_method`):
- "offset" (default): every context image at index 1, tiled beside the previous ones as if stitched
  into one canvas, so the model sees the one-context layout it was trained on;
- "index": context image k (0-based) at index k + 1, each at row/col 0: for models trained that way.
With one context image both are today's ids exactly. docs/DESIGN-NOTES.md says why offset is default.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .buckets import MULTIPLE
from .errors import ConfigError

if TYPE_CHECKING:  # torch only where ids are made: EditRequest checks a placement without it
    import torch

PLACEMENTS: tuple[str, ...] = ("offset", "index")
DEFAULT_PLACEMENT = "offset"


@dataclass(frozen=True)
class Placement:
    """One context image's place: id index (axis 0) and the row/col offset of its top-left token."""

    index: int
    row: int
    col: int


def check_placement(method: str) -> str:
    if method not in PLACEMENTS:
        raise ConfigError(f"reference placement must be one of {', '.join(PLACEMENTS)}, got {method!r}")
    return method


def place(grids: Sequence[tuple[int, int]], method: str = DEFAULT_PLACEMENT) -> list[Placement]:
    """Places of context images whose token grids are `grids` (rows, cols), in order (input image first).

    offset: ComfyUI's rule. Keep the canvas (rows, cols) filled so far; put the next image to the right
    (col = cols) when stacking it below would make the canvas taller than putting it right would make
    it wide, else below (row = rows). Each image's rectangle lies outside the canvas before it, so no
    two tokens share a (row, col) at index 1.
    """
    check_placement(method)
    out: list[Placement] = []
    if method == "index":
        return [Placement(k + 1, 0, 0) for k in range(len(grids))]
    rows = cols = 0
    for h, w in grids:
        row = col = 0
        if h + rows > w + cols:
            col = cols
        else:
            row = rows
        rows, cols = max(rows, h + row), max(cols, w + col)
        out.append(Placement(1, row, col))
    return out


def context_ids(
    sizes: Sequence[tuple[int, int]], method: str = DEFAULT_PLACEMENT, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Position ids [M, 3] of context images of pixel sizes (w, h), concatenated in order.

    One image: sampling.image_ids(h, w, index=1), the single-context path of every Kontext pipeline.
    """
    import torch

    from . import sampling

    if len(sizes) == 1:
        w, h = sizes[0]
        return sampling.image_ids(h, w, index=1, device=device)
    grids = [(h // MULTIPLE, w // MULTIPLE) for w, h in sizes]
    parts = []
    for (w, h), p in zip(sizes, place(grids, method), strict=True):
        ids = sampling.image_ids(h, w, index=p.index, device=device)  # [h/16 * w/16, 3]
        ids[:, 1] += p.row
        ids[:, 2] += p.col
        parts.append(ids)
    return torch.cat(parts, dim=0)  # [M, 3]
