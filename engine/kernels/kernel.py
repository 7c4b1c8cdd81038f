"""The Triton attention kernel (forward only, no mask, non-causal): FlashAttention-2's online softmax with
fp32 statistics and accumulators, over bf16/fp16, float8 e4m3 or int8 Q/K/V. Kernel source only: launching,
shapes and variants are in attention.py."""

import triton
import triton.language as tl

# QUANT: what Q/K/V hold. 0: bf16/fp16 as given; 1: float8 e4m3 Q/K/V; 2: int8 Q/K with float8 e4m3 V.
# P_SCALE: P = exp(s - max) lies in [0, 1]; it is multiplied by 448 before its cast to e4m3 so that it uses
# the whole e4m3 range (SageAttention2), and the accumulator is divided by 448 once in the epilogue.


@triton.jit
def round_to_grid(x, MANTISSA: tl.constexpr, EMIN: tl.constexpr):
    """x >= 0 rounded to the nearest value (ties to even, as the hardware's casts) of a float format with
    MANTISSA bits and smallest normal exponent EMIN, computed in fp32. Used on the interpreter only (see
    INTERPRETER in attention_fwd). Ties are common: bf16 inputs over a power-of-two-ish scale often land on
    them."""
    exponent = tl.floor(tl.log2(tl.maximum(x, tl.exp2(EMIN * 1.0))))
    exponent = tl.where(tl.exp2(exponent) > x, exponent - 1.0, exponent)  # fp32 log2 rounds up just below 2^n
    exponent = tl.maximum(exponent, EMIN * 1.0)
    ulp = tl.exp2(exponent - MANTISSA)
    steps = x / ulp  # exact (ulp is a power of two), < 2^(MANTISSA + 1)
    return ((steps + 12582912.0) - 12582912.0) * ulp  # + - 1.5 * 2^23: fp32 rounds to an integer, ties even


@triton.jit
def _attend_tiles(
    acc,
    l_i,
    m_i,
    q,
    row_scale,
    K,
    V,
    SK,
    stride_ks,
    stride_kd,
    stride_vs,
    stride_vd,
    S,
    lo,
    hi,
    offs_n,
    offs_d,
    BLOCK_N: tl.constexpr,
    K_BLOCK: tl.constexpr,
    QUANT: tl.constexpr,
    P_SCALE: tl.constexpr,
    INTERPRETER: tl.constexpr,
    P_MANTISSA: tl.constexpr,
    P_EMIN: tl.constexpr,
    MASK_TAIL: tl.constexpr,
):
    """Folds key/value tiles [lo, hi) into the running (acc, l_i, m_i). Scores are in log2 units:
    s = (q . k) * row_scale * k_scale, where row_scale holds 1/sqrt(D) * log2(e) and Q's scale."""
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        cols = start_n + offs_n  # [BLOCK_N]
        k_ptrs = K + cols[None, :] * stride_ks + offs_d[:, None] * stride_kd  # [D, BLOCK_N]: K^T
        v_ptrs = V + cols[:, None] * stride_vs + offs_d[None, :] * stride_vd  # [BLOCK_N, D]
        if MASK_TAIL:
            k = tl.load(k_ptrs, mask=cols[None, :] < S, other=0.0)
            v = tl.load(v_ptrs, mask=cols[:, None] < S, other=0.0)
        else:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)

        if QUANT == 2:
            qk = tl.dot(q, k, out_dtype=tl.int32).to(tl.float32)  # exact integer QK^T
        elif QUANT == 0 and INTERPRETER:  # bf16 widened exactly to fp32 (see attention_fwd)
            qk = tl.dot(q.to(tl.float32), k.to(tl.float32), input_precision="ieee")
        else:
            qk = tl.dot(q, k)  # [BLOCK_M, BLOCK_N] fp32
        if QUANT != 0 and K_BLOCK != 0:
            if K_BLOCK % BLOCK_N == 0:  # one K scale for the whole tile: fold it into the row factor
                scale = row_scale * tl.load(SK + start_n // K_BLOCK)
            else:  # several K scales per tile: one per column
                k_scale = tl.load(SK + cols // K_BLOCK, mask=cols < S, other=1.0)
                qk = qk * k_scale[None, :]
                scale = row_scale
        else:  # per-head K scale (if any) is already in row_scale
            scale = row_scale
        if MASK_TAIL:
            qk = tl.where(cols[None, :] < S, qk, float("-inf"))

        m_ij = tl.maximum(m_i, tl.max(qk, 1) * scale)  # [BLOCK_M], scale > 0
        p = tl.math.exp2(qk * scale[:, None] - m_ij[:, None])  # fp32 in [0, 1]
        alpha = tl.math.exp2(m_i - m_ij)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if QUANT == 0 and INTERPRETER:
            if P_MANTISSA != 0:
                p = round_to_grid(p, P_MANTISSA, P_EMIN)  # = p.to(v.dtype), held in fp32
            acc = tl.dot(p, v.to(tl.float32), acc, input_precision="ieee")
        elif QUANT == 0:
            acc = tl.dot(p.to(v.dtype), v, acc)
        else:
            p = p * P_SCALE
            if INTERPRETER:
                p = round_to_grid(p, 3, -6)  # e4m3: 3 mantissa bits, emin -6; the cast below is then exact
            acc = tl.dot(p.to(tl.float8e4nv), v, acc)
        m_i = m_ij
    return acc, l_i, m_i


@triton.jit
def attention_fwd(
    Q,
    K,
    V,
    Out,
    SQ,
    SK,
    SV,
    stride_qb,
    stride_qh,
    stride_qs,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_ks,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vs,
    stride_vd,
    stride_ob,
    stride_oh,
    stride_os,
    stride_od,
    H,
    S,
    N_SCALES,
    Q_BLOCK,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    K_BLOCK: tl.constexpr,
    QUANT: tl.constexpr,
    P_SCALE: tl.constexpr,
    INTERPRETER: tl.constexpr,
    P_MANTISSA: tl.constexpr,
    P_EMIN: tl.constexpr,
    EVEN_M: tl.constexpr,
    EVEN_N: tl.constexpr,
):
    """One program: BLOCK_M query rows of one (batch, head) against all S keys. Grid (cdiv(S, BLOCK_M), B*H).

    INTERPRETER works around two defects of Triton's CPU interpreter (3.9), keeping the arithmetic of the
    compiled kernel: it multiplies bf16 operands of tl.dot as raw integer bits, so bf16 Q/K/V are widened to
    fp32 (exact) and P is rounded to the dtype's grid (P_MANTISSA bits, min exponent P_EMIN; 0: fp32, none)
    before fp32 dots; and its fp32 -> fp8 cast drops the carry of a mantissa round-up, so P is rounded to the
    e4m3 grid first and the cast is exact. Both give the values the GPU's bf16/fp8 MMA sees.
    EVEN_M / EVEN_N: S is a multiple of BLOCK_M / BLOCK_N, so no bounds checks are compiled in.
    Scales (quantized variants): SQ, SK [B*H, N_SCALES] fp32, one per Q_BLOCK / K_BLOCK tokens (K_BLOCK 0:
    one per head); SV [B*H, HEAD_DIM] fp32, per channel. qk_scale = 1/sqrt(D) * log2(e)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    Q += off_b * stride_qb + off_h * stride_qh
    K += off_b * stride_kb + off_h * stride_kh
    V += off_b * stride_vb + off_h * stride_vh
    Out += off_b * stride_ob + off_h * stride_oh

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < S
    q_ptrs = Q + offs_m[:, None] * stride_qs + offs_d[None, :] * stride_qd
    if EVEN_M:  # noqa: SIM108 - a compile-time branch of the kernel, clearer as a statement
        q = tl.load(q_ptrs)  # [BLOCK_M, D], stays in registers
    else:
        q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)

    row_scale = tl.zeros([BLOCK_M], dtype=tl.float32) + qk_scale
    if QUANT != 0:
        SQ += pid_bh.to(tl.int64) * N_SCALES
        SK += pid_bh.to(tl.int64) * N_SCALES
        row_scale *= tl.load(SQ + offs_m // Q_BLOCK, mask=row_ok, other=1.0)
        if K_BLOCK == 0:
            row_scale *= tl.load(SK)

    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    # Full tiles without bounds checks, then (when S % BLOCK_N != 0) the last tile with them.
    full = S if EVEN_N else (S // BLOCK_N) * BLOCK_N
    acc, l_i, m_i = _attend_tiles(
        acc, l_i, m_i, q, row_scale, K, V, SK, stride_ks, stride_kd, stride_vs, stride_vd, S, 0, full,
        offs_n, offs_d, BLOCK_N, K_BLOCK, QUANT, P_SCALE, INTERPRETER, P_MANTISSA, P_EMIN, False,
    )  # fmt: skip
    if not EVEN_N:
        acc, l_i, m_i = _attend_tiles(
            acc, l_i, m_i, q, row_scale, K, V, SK, stride_ks, stride_kd, stride_vs, stride_vd, S, full,
            full + BLOCK_N, offs_n, offs_d, BLOCK_N, K_BLOCK, QUANT, P_SCALE, INTERPRETER, P_MANTISSA,
            P_EMIN, True,
        )  # fmt: skip

    if QUANT == 0:
        out = acc / l_i[:, None]
    else:
        v_scale = tl.load(SV + pid_bh.to(tl.int64) * HEAD_DIM + offs_d)  # [D]
        out = acc * (v_scale / P_SCALE)[None, :] / l_i[:, None]
    o_ptrs = Out + offs_m[:, None] * stride_os + offs_d[None, :] * stride_od
    if EVEN_M:
        tl.store(o_ptrs, out.to(Out.dtype.element_ty))
    else:
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None])


# Launch configurations for H100 (sm_90), D = 64 / 128. The default is a fixed table (no autotuning: each
# config costs a compile at cold start); attention(..., autotune=True) times this short list once per
# (S, D, variant) key instead. ptxas (sm_90a, D 128) spills none of them; 128 x 64 with 4 warps spilled 76 B
# in bf16 and is left out.
TUNE_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=4),
]
