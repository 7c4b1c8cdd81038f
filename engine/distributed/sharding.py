"""Context parallelism, the per-rank half: how one call's tokens are split, and the attention that
sees every rank's keys.

The joint sequence of a Flux forward is [text ; image] (image = target (+) context (+) references).
Each of the N ranks holds a contiguous slice of the text tokens and a contiguous slice of the image
tokens, with the RoPE ids of exactly those tokens, so FluxTransformer2DModel.forward computes on a
rank the rotary embedding of [local text ; local image] and every per-token layer (embedders,
modulation, MLPs, norms, the output head) runs on the local tokens only. Attention is the one layer
that mixes tokens: `ContextParallelAttnProcessor` keeps the local queries and all-gathers the keys
and values of every rank (after RoPE), then attends. Flux attention has no mask, so the order of the
gathered keys does not matter: a softmax over the same set of keys gives the single-process result
to rounding (docs/context-parallel.md).

Uneven splits: ranks hold counts that differ by at most one token per stream (`split_sizes`). A
collective needs equal shapes on every rank, so each rank pads its slice to the longest, and the
padding is cut off again after the gather, before attention: no attention mask, no padded keys.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import ConfigError


def split_sizes(total: int, parts: int) -> tuple[int, ...]:
    """`total` tokens over `parts` ranks, contiguous, the first `total % parts` ranks one more."""
    base, extra = divmod(total, parts)
    return tuple(base + (1 if r < extra else 0) for r in range(parts))


@dataclass(frozen=True)
class Layout:
    """Which tokens each rank holds in one call: counts per rank, in rank order."""

    text: tuple[int, ...]  # text tokens of each rank, summing to L
    image: tuple[int, ...]  # image tokens of each rank, summing to N + M

    @classmethod
    def of(cls, text_tokens: int, image_tokens: int, world_size: int) -> Layout:
        if image_tokens < world_size:
            raise ConfigError(
                f"context parallelism over {world_size} ranks needs at least {world_size} image tokens, "
                f"got {image_tokens}; use fewer ranks for images this small"
            )
        return cls(split_sizes(text_tokens, world_size), split_sizes(image_tokens, world_size))

    @property
    def joint(self) -> tuple[int, ...]:
        """Tokens of each rank's joint [text ; image] sequence (what its attention holds)."""
        return tuple(t + i for t, i in zip(self.text, self.image, strict=True))

    def text_slice(self, rank: int) -> slice:
        start = sum(self.text[:rank])
        return slice(start, start + self.text[rank])

    def image_slice(self, rank: int) -> slice:
        start = sum(self.image[:rank])
        return slice(start, start + self.image[rank])


def shard_inputs(inputs: Mapping[str, torch.Tensor], layout: Layout, rank: int) -> dict[str, torch.Tensor]:
    """The Denoiser's full inputs -> rank `rank`'s: its image tokens with their ids, its text tokens with
    theirs; pooled projections, timestep and guidance whole."""
    img, txt = layout.image_slice(rank), layout.text_slice(rank)
    local = dict(inputs)
    local["hidden_states"] = inputs["hidden_states"][:, img]  # [B, I_r, 64]
    local["img_ids"] = inputs["img_ids"][img]  # [I_r, 3]
    local["encoder_hidden_states"] = inputs["encoder_hidden_states"][:, txt]  # [B, L_r, D_txt]
    local["txt_ids"] = inputs["txt_ids"][txt]  # [L_r, 3]
    return local


class Group:
    """One rank's end of a process group (a c10d backend: ProcessGroupGloo or ProcessGroupNCCL, used
    directly, so no global default group is created), plus the layout of the call in flight."""

    def __init__(self, backend: Any, rank: int, size: int) -> None:
        self.backend = backend  # torch.distributed Backend object
        self.rank = rank
        self.size = size
        self.joint: tuple[int, ...] = ()  # Layout.joint of the call in flight, set before each forward

    def broadcast(self, tensor: torch.Tensor) -> None:
        """Rank 0's `tensor` into every rank's `tensor` (in place; same shape and dtype everywhere)."""
        self.backend.broadcast(tensor, 0).wait()

    def gather(self, x: torch.Tensor, lengths: Sequence[int], dim: int = 1) -> torch.Tensor:
        """Every rank's `x` concatenated on `dim` in rank order, rank r holding lengths[r] rows there.

        Padded to the longest (gloo's allgather refuses unequal shapes) and cut back after.
        """
        longest = max(lengths)
        pad = longest - x.shape[dim]
        if pad:
            shape = list(x.shape)
            shape[dim] = pad
            x = torch.cat([x, x.new_zeros(shape)], dim=dim)
        x = x.contiguous()
        outs = [torch.empty_like(x) for _ in range(self.size)]
        self.backend.allgather([outs], [x]).wait()
        return torch.cat([o.narrow(dim, 0, n) for o, n in zip(outs, lengths, strict=True)], dim=dim)


class ContextParallelAttnProcessor:
    """diffusers' FluxAttnProcessor with the keys and values of every rank: local queries [B, S_r, H, D]
    attend over the gathered keys [B, S, H, D]. Serves the double-stream blocks (text and image
    projections) and the single-stream ones alike; any projection layout diffusers supports (fused)."""

    def __init__(self, group: Group) -> None:
        self.group = group

    def __call__(
        self,
        attn: Any,  # diffusers FluxAttention
        hidden_states: torch.Tensor,  # [B, I_r, C] (double blocks) or [B, L_r + I_r, C] (single)
        encoder_hidden_states: torch.Tensor | None = None,  # [B, L_r, C] (double blocks)
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        from diffusers.models.embeddings import apply_rotary_emb
        from diffusers.models.transformers.transformer_flux import _get_qkv_projections

        if attention_mask is not None:
            raise ConfigError("context-parallel attention takes no attention mask (Flux passes none)")
        query, key, value, enc_query, enc_key, enc_value = _get_qkv_projections(
            attn, hidden_states, encoder_hidden_states
        )
        query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))  # [B, S, H, D]
        key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
        value = value.unflatten(-1, (-1, attn.head_dim))
        if attn.added_kv_proj_dim is not None:
            enc_query = attn.norm_added_q(enc_query.unflatten(-1, (-1, attn.head_dim)))
            enc_key = attn.norm_added_k(enc_key.unflatten(-1, (-1, attn.head_dim)))
            enc_value = enc_value.unflatten(-1, (-1, attn.head_dim))
            query = torch.cat([enc_query, query], dim=1)  # [B, L_r + I_r, H, D]
            key = torch.cat([enc_key, key], dim=1)
            value = torch.cat([enc_value, value], dim=1)
        if image_rotary_emb is not None:  # the local tokens' rotary embedding
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)  # type: ignore[arg-type]
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)  # type: ignore[arg-type]
        kv = self.group.gather(torch.stack([key, value], dim=2), self.group.joint)  # [B, S, 2, H, D]
        key, value = kv.unbind(dim=2)
        out = F.scaled_dot_product_attention(
            query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
        ).transpose(1, 2)  # [B, L_r + I_r, H, D]
        out = out.flatten(2, 3).to(query.dtype)
        if encoder_hidden_states is None:
            return out
        enc_out, out = out.split_with_sizes([encoder_hidden_states.shape[1], hidden_states.shape[1]], dim=1)
        out = attn.to_out[1](attn.to_out[0](out.contiguous()))
        return out, attn.to_add_out(enc_out.contiguous())


def install_processors(transformer: torch.nn.Module, group: Group) -> torch.nn.Module:
    """Every attention of `transformer` gets one ContextParallelAttnProcessor over `group` (in place)."""
    set_processor = getattr(transformer, "set_attn_processor", None)
    if set_processor is None:
        raise ConfigError(
            f"{type(transformer).__name__} has no set_attn_processor: not a diffusers transformer"
        )
    set_processor(ContextParallelAttnProcessor(group))
    return transformer
