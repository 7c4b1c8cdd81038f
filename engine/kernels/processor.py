"""Our attention kernel inside diffusers' Flux transformer: an attention processor for FluxAttention (double
blocks' joint text + image attention and single blocks alike), installed with set_attn_processor and removed
by putting the previous processors back. No diffusers code is patched."""

from __future__ import annotations

import logging
from typing import Any

import torch
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor, _get_qkv_projections

from ..errors import ConfigError
from .attention import LaunchConfig, attention
from .variants import AttentionVariant, resolve_variant

logger = logging.getLogger(__name__)


class KernelAttnProcessor(FluxAttnProcessor):
    """diffusers 0.42's FluxAttnProcessor with `dispatch_attention_fn` replaced by engine.kernels.attention.

    The projections, the q/k RMSNorms, the text-first concatenation and RoPE are diffusers' own code paths
    (fused QKV projections included); only the attention call differs. The kernel reads the [B, S, H, D]
    projections through [B, H, S, D] strided views, and writes its output in the same layout, so no copy is
    made around it. tests/test_kernels.py checks the transformer's output against the stock processor.
    """

    def __init__(self, variant: str | AttentionVariant = "bf16", config: LaunchConfig | None = None) -> None:
        super().__init__()
        self.variant = resolve_variant(variant)
        self.config = config

    def __call__(  # type: ignore[override]  # diffusers annotates Tensor; double blocks return a pair
        self,
        attn: Any,  # diffusers' FluxAttention
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: Any = None,  # (cos, sin), as diffusers passes it
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if attention_mask is not None:
            raise ConfigError(
                "the kernel attention processor has no mask; restore the stock processors to use one"
            )
        query, key, value, encoder_query, encoder_key, encoder_value = _get_qkv_projections(
            attn, hidden_states, encoder_hidden_states
        )
        query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))  # [B, S_img, H, D]
        key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
        value = value.unflatten(-1, (-1, attn.head_dim))
        if attn.added_kv_proj_dim is not None:  # double block: text tokens first
            encoder_query = attn.norm_added_q(encoder_query.unflatten(-1, (-1, attn.head_dim)))
            encoder_key = attn.norm_added_k(encoder_key.unflatten(-1, (-1, attn.head_dim)))
            encoder_value = encoder_value.unflatten(-1, (-1, attn.head_dim))
            query = torch.cat([encoder_query, query], dim=1)  # [B, S, H, D]
            key = torch.cat([encoder_key, key], dim=1)
            value = torch.cat([encoder_value, value], dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        out = attention(
            query.transpose(1, 2),
            key.transpose(1, 2),
            value.transpose(1, 2),
            self.variant,
            config=self.config,
        )  # [B, H, S, D] view of [B, S, H, D] memory
        hidden_states = out.transpose(1, 2).flatten(2, 3).to(query.dtype)  # [B, S, H * D]

        if encoder_hidden_states is None:
            return hidden_states
        encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
            [encoder_hidden_states.shape[1], hidden_states.shape[1] - encoder_hidden_states.shape[1]], dim=1
        )
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states.contiguous()))
        encoder_hidden_states = attn.to_add_out(encoder_hidden_states.contiguous())
        return hidden_states, encoder_hidden_states


def use_kernel_attention(
    transformer: Any, variant: str | AttentionVariant = "bf16", config: LaunchConfig | None = None
) -> dict[str, Any]:
    """Route every attention of a diffusers FluxTransformer2DModel through our kernel. Returns the processors
    it replaced; `restore_attention(transformer, returned)` puts them back."""
    previous = dict(transformer.attn_processors)
    transformer.set_attn_processor(KernelAttnProcessor(variant, config))  # stateless: one shared instance
    logger.info("attention of %d layers -> Triton kernel (%s)", len(previous), resolve_variant(variant).name)
    return previous


def restore_attention(transformer: Any, previous: dict[str, Any]) -> None:
    """Undo use_kernel_attention: put back the processors it returned."""
    transformer.set_attn_processor(dict(previous))  # diffusers pops the entries of the dict it is given
