"""The quantization pre-pass as Triton kernels: Q, K, V to int8 / float8 e4m3 in one read and one write per
tensor, with block amax scales computed in registers. Same contract and results as quant.quantize_qkv (the
torch version, which stays the reference); attention() uses this one."""

import torch
import triton
import triton.language as tl

from .kernel import round_to_grid
from .quant import TINY_SCALE, QuantizedQKV
from .variants import FP8_MAX, INT8_MAX, AttentionVariant

MODE_BLOCK, MODE_AMAX, MODE_CHANNEL = 0, 1, 2
TILE = 128  # tokens per program when the tile is not a scale block


@triton.jit
def quantize_tiles(
    X,
    Y,
    SCALE,
    MEAN,
    stride_xb,
    stride_xh,
    stride_xs,
    stride_xd,
    stride_yb,
    stride_yh,
    stride_ys,
    stride_yd,
    H,
    S,
    N_SCALES,
    qmax,
    HEAD_DIM: tl.constexpr,
    BLOCK: tl.constexpr,
    MODE: tl.constexpr,
    SUBTRACT_MEAN: tl.constexpr,
    TO_INT8: tl.constexpr,
    INTERPRETER: tl.constexpr,
):
    """One program: BLOCK tokens of one (batch, head). Grid (cdiv(S, BLOCK), B*H).

    MODE 0 (block): scale = amax(tile) / qmax, written to SCALE[bh, tile]; the tile quantized into Y.
    MODE 1 (amax): only amax(tile) written to SCALE[bh, tile] (the first pass of per-head scales).
    MODE 2 (channel): SCALE[bh, :HEAD_DIM] given (per channel, or a per-head scale repeated); Y written.
    MEAN [bh, HEAD_DIM] is subtracted first when SUBTRACT_MEAN (K smoothing)."""
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    off_b = (bh // H).to(tl.int64)
    off_h = (bh % H).to(tl.int64)
    rows = pid * BLOCK + tl.arange(0, BLOCK)
    cols = tl.arange(0, HEAD_DIM)
    ok = rows[:, None] < S
    x_ptrs = X + off_b * stride_xb + off_h * stride_xh + rows[:, None] * stride_xs + cols[None, :] * stride_xd
    x = tl.load(x_ptrs, mask=ok, other=0.0).to(tl.float32)  # [BLOCK, D]
    if SUBTRACT_MEAN:
        x = tl.where(ok, x - tl.load(MEAN + bh.to(tl.int64) * HEAD_DIM + cols)[None, :], 0.0)
    if MODE == 1:
        tl.store(SCALE + bh.to(tl.int64) * N_SCALES + pid, tl.max(tl.max(tl.abs(x), 1), 0))
    else:
        if MODE == 2:
            y = x / tl.load(SCALE + bh.to(tl.int64) * HEAD_DIM + cols)[None, :]
        else:
            scale = tl.maximum(tl.max(tl.max(tl.abs(x), 1), 0) / qmax, 1e-12)  # floor: quant.TINY_SCALE
            tl.store(SCALE + bh.to(tl.int64) * N_SCALES + pid, scale)
            y = x / scale
        y = tl.minimum(tl.maximum(y, -qmax), qmax)
        y_ptrs = (
            Y + off_b * stride_yb + off_h * stride_yh + rows[:, None] * stride_ys + cols[None, :] * stride_yd
        )
        if TO_INT8:  # (y + 1.5 * 2^23) - 1.5 * 2^23 rounds |y| < 2^22 to an integer, ties to even (as torch)
            tl.store(y_ptrs, ((y + 12582912.0) - 12582912.0).to(tl.int8), mask=ok)
        elif INTERPRETER:
            r = round_to_grid(tl.abs(y), 3, -6)  # the interpreter's own fp8 cast drops mantissa carries
            tl.store(y_ptrs, tl.where(y < 0, -r, r).to(tl.float8e4nv), mask=ok)
        else:
            tl.store(y_ptrs, y.to(tl.float8e4nv), mask=ok)  # RTNE, as torch's cast


def _launch(
    x: torch.Tensor,
    y: torch.Tensor | None,
    scale: torch.Tensor,
    mean: torch.Tensor | None,
    mode: int,
    block: int,
    qmax: float,
) -> None:
    b, h, s, d = x.shape
    out = y if y is not None else x  # MODE_AMAX stores nothing into Y
    quantize_tiles[(triton.cdiv(s, block), b * h)](
        x,
        out,
        scale,
        mean if mean is not None else scale,
        *x.stride(),
        *out.stride(),
        h,
        s,
        scale.shape[-1],
        qmax,
        HEAD_DIM=d,
        BLOCK=block,
        MODE=mode,
        SUBTRACT_MEAN=mean is not None,
        TO_INT8=out.dtype == torch.int8,
        INTERPRETER=x.device.type == "cpu",
        num_warps=8 if block * d >= 128 * 128 else 4,
    )


def _quantize(
    x: torch.Tensor, dtype: torch.dtype, qmax: float, block: int | None, mean: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, H, S, D] -> (quantized [B, H, S, D], scale [B, H, nb]); block None: one scale per (batch, head)."""
    b, h, s, d = x.shape
    y = torch.empty(b, h, s, d, dtype=dtype, device=x.device)
    if block is not None:
        scale = torch.empty(b, h, triton.cdiv(s, block), dtype=torch.float32, device=x.device)
        _launch(x, y, scale, mean, MODE_BLOCK, block, qmax)
        return y, scale
    amax = torch.empty(b, h, triton.cdiv(s, TILE), dtype=torch.float32, device=x.device)
    _launch(x, None, amax, mean, MODE_AMAX, TILE, qmax)
    head_scale = (amax.amax(dim=-1, keepdim=True) / qmax).clamp_min_(TINY_SCALE)  # [B, H, 1]
    _launch(x, y, head_scale.expand(b, h, d).contiguous(), mean, MODE_CHANNEL, TILE, qmax)
    return y, head_scale


def quantize_qkv_fused(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, variant: AttentionVariant
) -> QuantizedQKV:
    """quant.quantize_qkv with Triton kernels: the same scales and layout, the same values (up to exact
    rounding ties on the interpreter). Reads each of Q/K/V once or twice (K's mean, V's channel amax,
    per-head amax) and writes the quantized tensors once."""
    b, h, s, d = q.shape
    qk_dtype = torch.int8 if variant.precision == "int8-fp8" else torch.float8_e4m3fn
    qk_max = INT8_MAX if qk_dtype == torch.int8 else FP8_MAX
    block = variant.block if variant.granularity == "block" else None
    mean = k.mean(dim=2, dtype=torch.float32).contiguous() if variant.smooth_k else None  # [B, H, D]
    q_q, q_scale = _quantize(q, qk_dtype, qk_max, block, None)
    k_q, k_scale = _quantize(k, qk_dtype, qk_max, block, mean)

    if variant.granularity == "block":
        v_scale = torch.linalg.vector_norm(v, ord=float("inf"), dim=2, dtype=torch.float32) / FP8_MAX
    else:
        v_scale = (torch.linalg.vector_norm(v, ord=float("inf"), dim=(2, 3), dtype=torch.float32) / FP8_MAX)[
            ..., None
        ].expand(b, h, d)
    v_scale = v_scale.clamp_min(TINY_SCALE).contiguous()  # [B, H, D]
    v_q = torch.empty(b, h, d, s, dtype=torch.float8_e4m3fn, device=v.device).transpose(
        2, 3
    )  # tokens innermost
    _launch(v, v_q, v_scale, None, MODE_CHANNEL, TILE, FP8_MAX)
    return QuantizedQKV(q_q, k_q, v_q, q_scale, k_scale, v_scale, block or s)
