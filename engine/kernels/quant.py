"""The quantization pre-pass: Q, K, V to float8 e4m3 or int8 with fp32 amax scales per (batch, head) or per
block of tokens, in the layout the kernel reads. Plain torch ops: a few memory-bound passes over Q/K/V."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .variants import FP8_MAX, INT8_MAX, AttentionVariant

TINY_SCALE = 1e-12  # floor of a scale, so that an all-zero block quantizes to zeros instead of NaN


@dataclass(frozen=True)
class QuantizedQKV:
    """Q, K, V as the kernel reads them: x ~= x_q * scale, each scale broadcast over its tokens/channels."""

    q: torch.Tensor  # [B, H, S, D] int8 or float8_e4m3fn
    k: torch.Tensor  # [B, H, S, D] int8 or float8_e4m3fn (smoothed: K minus its mean over tokens)
    v: torch.Tensor  # [B, H, S, D] float8_e4m3fn, a view of [B, H, D, S] memory (tokens innermost)
    q_scale: torch.Tensor  # [B, H, nb] fp32, one per `block` tokens (nb = 1 for per-head)
    k_scale: torch.Tensor  # [B, H, nb] fp32
    v_scale: torch.Tensor  # [B, H, D] fp32, per channel (all equal for per-head)
    block: int  # tokens per Q/K scale; S for per-head


def _block_amax(x: torch.Tensor, block: int) -> torch.Tensor:
    """max |x| over each run of `block` tokens and all channels: [B, H, S, D] -> [B, H, ceil(S / block)]."""
    b, h, s, d = x.shape
    nb = -(-s // block)
    padded = torch.nn.functional.pad(x.abs(), (0, 0, 0, nb * block - s))  # zeros do not change a max
    return padded.view(b, h, nb, block * d).amax(dim=-1).float()


def _per_token(scale: torch.Tensor, block: int, s: int) -> torch.Tensor:
    """[B, H, nb] -> [B, H, S, 1]: each token's scale."""
    return scale.repeat_interleave(block, dim=-1)[..., :s, None]


def _cast(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """fp32 values already within the target's range -> int8 (round to nearest) or float8 e4m3 (RTNE)."""
    if dtype == torch.int8:
        return x.round().clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return x.clamp_(-FP8_MAX, FP8_MAX).to(dtype)  # the clamp guards fp32 rounding just above 448


def quantize_qkv(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, variant: AttentionVariant
) -> QuantizedQKV:
    """Quantize [B, H, S, D] Q, K, V for a quantized variant (see AttentionVariant for the choices)."""
    s = q.shape[2]
    qk_dtype = torch.int8 if variant.precision == "int8-fp8" else torch.float8_e4m3fn
    qk_max = INT8_MAX if qk_dtype == torch.int8 else FP8_MAX
    block = variant.block if variant.granularity == "block" else s

    kf = k.float()
    if variant.smooth_k:
        kf = kf - kf.mean(dim=2, keepdim=True)  # exact for softmax (see AttentionVariant.smooth_k)
    q_scale = (_block_amax(q, block) / qk_max).clamp_min_(TINY_SCALE)  # [B, H, nb]
    k_scale = (_block_amax(kf, block) / qk_max).clamp_min_(TINY_SCALE)
    q_q = _cast(q.float() / _per_token(q_scale, block, s), qk_dtype)
    k_q = _cast(kf / _per_token(k_scale, block, s), qk_dtype)

    vf = v.float()
    if variant.granularity == "block":
        v_scale = vf.abs().amax(dim=2) / FP8_MAX  # [B, H, D]: per channel
    else:
        v_scale = (vf.abs().amax(dim=(2, 3)) / FP8_MAX)[..., None].expand(-1, -1, v.shape[3])
    v_scale = v_scale.clamp_min(TINY_SCALE).contiguous()
    v_q = _cast(vf / v_scale[:, :, None, :], torch.float8_e4m3fn)
    # Hopper's FP8 MMA reads both operands K-major; for P @ V the reduction runs over tokens, so V is stored
    # [B, H, D, S] (tokens innermost) and handed to the kernel as a [B, H, S, D] view with strides to match.
    v_q = v_q.transpose(2, 3).contiguous().transpose(2, 3)
    return QuantizedQKV(q_q, k_q, v_q, q_scale.contiguous(), k_scale.contiguous(), v_scale, block)


def dequantize_qkv(x: QuantizedQKV) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fp32 values the kernel computes with: x_q * scale. K stays smoothed (softmax does not see it)."""
    s = x.q.shape[2]
    q = x.q.float() * _per_token(x.q_scale, x.block, s)
    k = x.k.float() * _per_token(x.k_scale, x.block, s)
    v = x.v.float() * x.v_scale[:, :, None, :]
    return q, k, v
