"""PyTorch backend: the diffusers transformer called directly (eager)."""

from __future__ import annotations

import torch

from ..buckets import ShapeKey


class TorchDenoiser:
    """Eager diffusers FluxTransformer2DModel behind the Denoiser contract. Serves any shape."""

    shape_keys: frozenset[ShapeKey] | None = None

    def __init__(self, transformer: torch.nn.Module, name: str = "torch-eager") -> None:
        self.transformer = transformer
        self.name = name

    @torch.inference_mode()
    def __call__(
        self,
        hidden_states: torch.Tensor,
        img_ids: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        txt_ids: torch.Tensor,
        pooled_projections: torch.Tensor,
        timestep: torch.Tensor,
        guidance: torch.Tensor,
    ) -> torch.Tensor:
        return self.transformer(
            hidden_states=hidden_states,
            img_ids=img_ids,
            encoder_hidden_states=encoder_hidden_states,
            txt_ids=txt_ids,
            pooled_projections=pooled_projections,
            timestep=timestep,
            guidance=guidance,
            return_dict=False,
        )[0]
