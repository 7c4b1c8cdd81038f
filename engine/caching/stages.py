"""The split forward a residual cache needs: embed -> first block -> the other blocks -> head.

A backend that can run its transformer in these four parts (the torch backend: backends/stages.py)
exposes them as `denoiser.stages`; one that cannot (a built ONNX Runtime or TensorRT engine is one
graph, a CUDA-graph replay is one capture, a context-parallel call is one collective round) has none,
and gets the cache forms that need only the model's output (policies.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch


@dataclass(frozen=True)
class Embedded:
    """The transformer's state between its parts (diffusers FluxTransformer2DModel.forward's locals)."""

    hidden: torch.Tensor  # [B, N + M, D] image stream
    encoder: torch.Tensor  # [B, L, D] text stream
    temb: torch.Tensor  # [B, D] time + guidance + pooled text embedding
    rotary: Any  # the rotary embedding of the joint ids (a tuple of [L + N + M, d] tensors)


@runtime_checkable
class ForwardStages(Protocol):
    """The transformer's forward in four parts; head(rest(first_block(embed(x)))) == the whole forward."""

    def embed(self, inputs: dict[str, torch.Tensor]) -> Embedded: ...

    def first_block(self, x: Embedded) -> Embedded: ...

    def rest(self, x: Embedded) -> Embedded: ...

    def head(self, x: Embedded) -> torch.Tensor: ...  # [B, N + M, 64]


def stages_of(denoiser: object) -> ForwardStages | None:
    """The denoiser's split forward, or None when it runs as one piece."""
    stages = getattr(denoiser, "stages", None)
    return stages if isinstance(stages, ForwardStages) else None
