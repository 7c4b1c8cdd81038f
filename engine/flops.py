"""FLOPs of one forward of the Flux / Kontext transformer (diffusers FluxTransformer2DModel) at one shape.

Counts what the layers of diffusers' transformer_flux.py really do: every nn.Linear (2*m*k*n per matmul,
biases and elementwise work ignored) and the two attention matmuls (QK^T and PV). Benchmarks divide these
by measured time to report TFLOP/s; a test checks the linear count against a real model's layers.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .buckets import ShapeKey
from .config import TransformerConfig

TIMESTEP_CHANNELS = 256  # diffusers Timesteps(num_channels=256) feeding the time and guidance embedders
MLP_RATIO = 4  # FeedForward(mult=4) in double blocks, proj_mlp in single blocks


@dataclass(frozen=True)
class ForwardFlops:
    """Floating-point operations of one transformer forward (multiply and add counted separately)."""

    linear: int  # every nn.Linear: embedders, modulation, q/k/v/out, MLPs, output projection
    attention: int  # QK^T and softmax(QK^T)V of all blocks

    @property
    def total(self) -> int:
        return self.linear + self.attention


def _mm(rows: int, k: int, n: int) -> int:
    """FLOPs of [rows, k] @ [k, n]."""
    return 2 * rows * k * n


def conditioning_linear_flops(cfg: TransformerConfig, batch: int) -> int:
    """time_text_embed: timestep (and guidance) embedders 256 -> D -> D, pooled projection P -> D -> D."""
    d = cfg.hidden_size
    per_embedder = _mm(batch, TIMESTEP_CHANNELS, d) + _mm(batch, d, d)
    embedders = 2 if cfg.guidance_embeds else 1
    text = _mm(batch, cfg.pooled_projection_dim, d) + _mm(batch, d, d)
    return embedders * per_embedder + text


def double_block_linear_flops(cfg: TransformerConfig, shape: ShapeKey) -> int:
    """One FluxTransformerBlock: each stream has its own modulation, q/k/v/out and 4x MLP weights."""
    d, b = cfg.hidden_size, shape.batch
    modulation = 2 * _mm(b, d, 6 * d)  # norm1.linear and norm1_context.linear act on temb [B, D]
    per_token = 4 * d * d + 2 * MLP_RATIO * d * d  # q, k, v, out + MLP up and down, per stream
    img = 2 * b * shape.image_tokens * per_token  # to_q/k/v, to_out.0, ff
    txt = 2 * b * shape.text_tokens * per_token  # add_q/k/v_proj, to_add_out, ff_context
    return modulation + img + txt


def single_block_linear_flops(cfg: TransformerConfig, shape: ShapeKey) -> int:
    """One FluxSingleTransformerBlock on the joint sequence: q/k/v and proj_mlp in, proj_out from 5D."""
    d, b = cfg.hidden_size, shape.batch
    modulation = _mm(b, d, 3 * d)  # norm.linear on temb
    rows = b * shape.total_tokens
    qkv = 3 * _mm(rows, d, d)
    mlp_in = _mm(rows, d, MLP_RATIO * d)
    proj_out = _mm(rows, (1 + MLP_RATIO) * d, d)  # cat([attn, mlp]) -> D
    return modulation + qkv + mlp_in + proj_out


def linear_flops(cfg: TransformerConfig, shape: ShapeKey) -> int:
    """Every nn.Linear of one forward."""
    d, b = cfg.hidden_size, shape.batch
    out_channels = cfg.patch_size * cfg.patch_size * cfg.in_channels
    x_embedder = _mm(b * shape.image_tokens, cfg.in_channels, d)
    context_embedder = _mm(b * shape.text_tokens, cfg.joint_attention_dim, d)
    blocks = cfg.num_layers * double_block_linear_flops(cfg, shape)
    blocks += cfg.num_single_layers * single_block_linear_flops(cfg, shape)
    norm_out = _mm(b, d, 2 * d)  # AdaLayerNormContinuous.linear on temb
    proj_out = _mm(b * shape.image_tokens, d, out_channels)
    return conditioning_linear_flops(cfg, b) + x_embedder + context_embedder + blocks + norm_out + proj_out


def attention_flops(cfg: TransformerConfig, shape: ShapeKey) -> int:
    """Joint attention over S = image + text tokens in every block: 2*S^2*head_dim each for QK^T and PV."""
    s = shape.total_tokens
    per_block = 4 * shape.batch * cfg.num_attention_heads * s * s * cfg.attention_head_dim
    return (cfg.num_layers + cfg.num_single_layers) * per_block


def transformer_flops(cfg: TransformerConfig, shape: ShapeKey) -> ForwardFlops:
    """FLOPs of one FluxTransformer2DModel forward at `shape` (about 165 TFLOP for Kontext dev at 1024^2)."""
    return ForwardFlops(linear=linear_flops(cfg, shape), attention=attention_flops(cfg, shape))


def linear_rows(fqn: str, shape: ShapeKey) -> int:
    """The rows one Linear of the transformer multiplies, by its diffusers name: the batch for embedders
    of the timestep and modulations, image, text or joint tokens for the rest (as linear_flops counts)."""
    parts = fqn.split(".")
    b = shape.batch
    if parts[0] in ("time_text_embed", "norm_out") or any(p.startswith("norm") for p in parts[1:]):
        return b  # timestep/guidance/pooled embedders, AdaLN modulations: act on temb [B, D]
    if parts[0] in ("x_embedder", "proj_out"):
        return b * shape.image_tokens
    if parts[0] == "context_embedder":
        return b * shape.text_tokens
    if parts[0] == "single_transformer_blocks":
        return b * shape.total_tokens
    text = any(p in ("ff_context", "to_add_out") or p.startswith(("add_", "to_added")) for p in parts)
    return b * (shape.text_tokens if text else shape.image_tokens)


def linear_flops_by_name(transformer: nn.Module, shape: ShapeKey) -> dict[str, int]:
    """FLOPs of each nn.Linear of a (diffusers) Flux transformer at `shape`, by qualified name: their sum is
    linear_flops(cfg, shape); what a precision mix (FP8 on some Linears) divides the work by."""
    return {
        name: _mm(linear_rows(name, shape), m.in_features, m.out_features)
        for name, m in transformer.named_modules()
        if isinstance(m, nn.Linear)
    }


def mixed_peak_tflops(
    bf16: float | None, fp8: float | None, fp8_flops: int, total_flops: int
) -> float | None:
    """The peak of a forward whose `fp8_flops` of `total_flops` run at the FP8 peak and the rest at bf16's:
    total / (fp8_flops / fp8 + rest / bf16), the time-weighted (harmonic) mix; None when a peak is unknown."""
    if bf16 is None or total_flops <= 0:
        return None
    if fp8_flops <= 0:
        return bf16
    if fp8 is None:
        return None
    seconds = fp8_flops / fp8 + (total_flops - fp8_flops) / bf16
    return total_flops / seconds


# Dense (no sparsity) datasheet peaks, TFLOP/s: (device-name fragment, lower case; bf16; fp8 or None).
# The first fragment found in the device name wins, so longer names stand before their prefixes.
GPU_PEAK_TFLOPS: tuple[tuple[str, float, float | None], ...] = (
    ("h100 pcie", 756.0, 1513.0),
    ("h100 nvl", 835.0, 1671.0),
    ("h100", 989.0, 1979.0),  # SXM
    ("h200", 989.0, 1979.0),  # the H100 SXM chip with more memory; before "h20", its prefix
    ("h800", 989.0, 1979.0),
    ("h20", 148.0, 296.0),
    ("b200", 2250.0, 4500.0),
    ("l40s", 362.0, 733.0),  # before "l40" and "l4"
    ("l40", 181.0, 362.0),
    ("l4", 121.0, 242.0),
    ("a100", 312.0, None),
    ("a10g", 70.0, None),
    ("rtx 4090", 165.0, 330.0),
)


def gpu_peaks(name: str) -> tuple[float | None, float | None]:
    """(bf16, fp8) dense peak TFLOP/s of the GPU called `name`; None where the card is unknown."""
    lower = name.lower()
    for fragment, bf16, fp8 in GPU_PEAK_TFLOPS:
        if fragment in lower:
            return bf16, fp8
    return None, None
