"""The activation terms of a memory plan: what an edit allocates beyond its weights, per phase, for the
largest bucket of a family. Estimates from the tensors each phase keeps alive, written term by term so a
measured peak (benchmarks/memory_phase.py) can say which term was wrong. All in bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..buckets import buckets, tokens

ACT_BYTES = 2  # bf16 activations (the GPU path's dtype)
# Live [B, S, D] tensors at a single-stream block's peak: the residual input 1, its norm 1, the MLP branch
# after GELU 4 (computed before attention in diffusers' FluxSingleTransformerBlock), q, k, v 3, q and k
# after RoPE 2, the attention output 1. The double block holds fewer per token (its MLPs run after
# attention, one stream at a time).
LIVE_TOKEN_TENSORS = 12
# Live full-resolution maps of the VAE: the input of a conv, its output, the norm (+ SiLU) output and the
# residual. Decoding: the last upsampler brings block_out_channels[1] (256) channels to full resolution;
# encoding: conv_in's block_out_channels[0] (128) channels at full resolution.
LIVE_VAE_MAPS = 4
VAE_TILE = 512  # pixels per tile side when tiled (vae_tiling.py); tiles overlap by VAE_OVERLAP
VAE_OVERLAP = 0.25


@dataclass(frozen=True)
class Shape:
    """The largest edit of a family: tokens of the target and context images, text tokens, pixels."""

    image_tokens: int  # N + M (target + context)
    text_tokens: int  # L
    width: int
    height: int
    batch: int = 1

    @property
    def sequence(self) -> int:  # S = N + M + L
        return self.image_tokens + self.text_tokens


def largest_shape(family: str, text_tokens: int, batch: int = 1) -> Shape:
    """The family's largest edit: the most tokens (4150 in 1mp, 800x1328), edited from a same-size
    context, and the most pixels for the VAE (1328x800 in 1mp too: 1.06 MP, 1.3% above 1024^2)."""
    most_tokens = max(tokens(w, h) for w, h in buckets(family))
    w, h = max(buckets(family), key=lambda b: (b[0] * b[1], b))
    return Shape(2 * most_tokens, text_tokens, w, h, batch)


def transformer_activation(hidden: int, heads: int, head_dim: int, s: Shape) -> int:
    """Denoise phase: LIVE_TOKEN_TENSORS x B x S x D (bf16), flash/efficient SDPA's logsumexp
    (B x H x S fp32; the math kernel's B x H x S^2 scores are not planned for), RoPE's cos and sin
    (2 x S x head_dim fp32), and the packed latents, velocity and the step's update (4 x B x (N+M) x 64
    fp32)."""
    tokens_term = LIVE_TOKEN_TENSORS * s.batch * s.sequence * hidden * ACT_BYTES
    attention = s.batch * heads * s.sequence * 4
    rope = 2 * s.sequence * head_dim * 4
    latents = 4 * s.batch * s.image_tokens * 64 * 4
    return tokens_term + attention + rope + latents


def text_activation(d_model: int, d_ff: int, heads: int, length: int) -> int:
    """Text phase (T5-XXL over L tokens): the gated FFN's three [L, d_ff] tensors, four [L, d_model]
    states, and the [H, L, L] scores with the position bias in fp32."""
    return 3 * length * d_ff * ACT_BYTES + 4 * length * d_model * ACT_BYTES + 2 * heads * length * length * 4


def vae_activation(channels: tuple[int, ...], s: Shape, tiled: bool) -> int:
    """VAE phase: max(decode, encode) full-resolution maps (LIVE_VAE_MAPS of block_out_channels[1] or
    [0] channels over W x H, bf16) plus the image in and out (3 x W x H fp32, twice). Tiled: the maps of
    one VAE_TILE^2 tile, plus the decoded tiles kept for blending ((1 / (1 - overlap))^2 images)."""
    area = VAE_TILE * VAE_TILE if tiled else s.width * s.height
    maps = LIVE_VAE_MAPS * max(channels[1] if len(channels) > 1 else channels[0], channels[0]) * area
    images = 2 * 3 * s.width * s.height * 4
    if tiled:
        images += int(3 * s.width * s.height * 4 / (1 - VAE_OVERLAP) ** 2)
    return s.batch * (maps * ACT_BYTES + images)
