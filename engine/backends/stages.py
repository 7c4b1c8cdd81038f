"""The torch transformer's forward in four parts (embed, first block, the rest, head) for step caches.

Each part is diffusers FluxTransformer2DModel.forward's own code, in its order, on the same modules
(compiled blocks, FP8 Linears and kernel attention included, since it calls the module it is given):
head(rest(first_block(embed(x)))) is the whole forward bit for bit (tests/test_caching.py). LoRA
scaling at 1.0 and controlnet samples, which our pipeline never passes, are left out.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from ..caching.stages import Embedded


class TorchStages:
    """ForwardStages over a diffusers Flux transformer (or a compile_blocks view of one). Stateless:
    threads may share it."""

    def __init__(self, transformer: torch.nn.Module) -> None:
        self.transformer: Any = transformer  # FluxTransformer2DModel, or a view of one

    # Mirrors diffusers models/transformers/transformer_flux.py::FluxTransformer2DModel.forward (v0.42)
    # (from x_embedder to pos_embed)
    @torch.inference_mode()
    def embed(self, inputs: dict[str, torch.Tensor]) -> Embedded:
        t = self.transformer
        hidden = t.x_embedder(inputs["hidden_states"])  # [B, N + M, D]
        timestep = inputs["timestep"].to(hidden.dtype) * 1000
        guidance = inputs.get("guidance")
        if guidance is not None:
            guidance = guidance.to(hidden.dtype) * 1000
        pooled = inputs["pooled_projections"]
        if guidance is None:
            temb = t.time_text_embed(timestep, pooled)  # [B, D]
        else:
            temb = t.time_text_embed(timestep, guidance, pooled)  # [B, D]
        encoder = t.context_embedder(inputs["encoder_hidden_states"])  # [B, L, D]
        txt_ids, img_ids = inputs["txt_ids"], inputs["img_ids"]
        txt_ids = txt_ids[0] if txt_ids.ndim == 3 else txt_ids
        img_ids = img_ids[0] if img_ids.ndim == 3 else img_ids
        rotary = t.pos_embed(torch.cat((txt_ids, img_ids), dim=0))
        return Embedded(hidden=hidden, encoder=encoder, temb=temb, rotary=rotary)

    @torch.inference_mode()
    def first_block(self, x: Embedded) -> Embedded:
        return self._run([self.transformer.transformer_blocks[0]], x)

    @torch.inference_mode()
    def rest(self, x: Embedded) -> Embedded:
        t = self.transformer
        return self._run([*list(t.transformer_blocks)[1:], *t.single_transformer_blocks], x)

    # Mirrors diffusers models/transformers/transformer_flux.py::FluxTransformer2DModel.forward (v0.42)
    # (norm_out, proj_out)
    @torch.inference_mode()
    def head(self, x: Embedded) -> torch.Tensor:  # [B, N + M, 64]
        return self.transformer.proj_out(self.transformer.norm_out(x.hidden, x.temb))

    @staticmethod
    def _run(blocks: list[torch.nn.Module], x: Embedded) -> Embedded:
        """Blocks called as diffusers' forward calls them: (text, image) = block(image, text, ...)."""
        encoder, hidden = x.encoder, x.hidden
        for block in blocks:
            encoder, hidden = block(
                hidden_states=hidden,
                encoder_hidden_states=encoder,
                temb=x.temb,
                image_rotary_emb=x.rotary,
                joint_attention_kwargs=None,
            )
        return replace(x, hidden=hidden, encoder=encoder)
