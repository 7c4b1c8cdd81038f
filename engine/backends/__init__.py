"""The Denoiser contract every backend implements, and the registry that builds one by name.

A Denoiser is the transformer's forward and nothing else: the sampling loop, packing, ids
and schedule live once in sampling.py. Its argument names are the ONNX graph's input names.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from ..buckets import ShapeKey


@runtime_checkable
class Denoiser(Protocol):
    """Velocity of the rectified flow for the packed image tokens (target (+) context)."""

    name: str  # backend and precision, e.g. "torch-eager-fp32", "onnxruntime-int8"
    shape_keys: frozenset[ShapeKey] | None  # None: any shape

    def __call__(
        self,
        hidden_states: torch.Tensor,  # [B, N + M, 64]
        img_ids: torch.Tensor,  # [N + M, 3]
        encoder_hidden_states: torch.Tensor,  # [B, L, D_txt]
        txt_ids: torch.Tensor,  # [L, 3]
        pooled_projections: torch.Tensor,  # [B, D_pooled]
        timestep: torch.Tensor,  # [B], sigma in [0, 1]
        guidance: torch.Tensor,  # [B] float32
    ) -> torch.Tensor:  # [B, N + M, 64]
        ...


DENOISER_INPUTS: tuple[str, ...] = (
    "hidden_states",
    "img_ids",
    "encoder_hidden_states",
    "txt_ids",
    "pooled_projections",
    "timestep",
    "guidance",
)
DENOISER_OUTPUT = "velocity"
