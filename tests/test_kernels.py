"""engine.kernels: the Triton attention kernel against torch SDPA, its quantized variants against their
stated bounds, the Flux processor against stock diffusers, and the GPU micro-benchmark's dry run.

Where the kernel runs. `@triton.jit` decides at decoration time, for our kernel and for triton.language's
own helpers, whether a function is compiled or interpreted, from TRITON_INTERPRET as it is when triton is
first imported. In a full test run other modules import triton long before this one (diffusers' Flux
transformer does), so setting the variable here would come too late. The CPU tests therefore run in a child
pytest process started with TRITON_INTERPRET=1 (`test_interpreter_suite`); in the parent they skip with that
reason. `TRITON_INTERPRET=1 pytest tests/test_kernels.py` runs them directly. GPU tests run in-process.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from engine.errors import BackendUnavailableError, ConfigError
from engine.kernels import (
    VARIANTS,
    AttentionVariant,
    LaunchConfig,
    attention,
    exact_attention,
    reference_attention,
)
from engine.kernels.attention import interpreted
from engine.metrics import rel_l2

ROOT = Path(__file__).resolve().parents[1]
CUDA = torch.cuda.is_available()
in_interpreter = pytest.mark.skipif(
    not interpreted(), reason="runs in the TRITON_INTERPRET=1 child process of test_interpreter_suite"
)


def qkv(
    b: int, h: int, s: int, d: int, dtype: torch.dtype = torch.bfloat16, device: str = "cpu", seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random [B, H, S, D] Q/K/V; K carries a per-channel offset shared by all tokens, as real keys do."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, s, d, generator=g)
    k = torch.randn(b, h, s, d, generator=g) + 2.0 * torch.randn(1, h, 1, d, generator=g)
    v = torch.randn(b, h, s, d, generator=g)
    return tuple(t.to(device, dtype) for t in (q, k, v))  # type: ignore[return-value]


def max_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return (out.float() - ref.float()).abs().max().item()


# ------------------------------------------------------------------ parent: the interpreter child, refusals


@pytest.mark.slow  # the Triton interpreter in a child process: over a minute on two cores
def test_interpreter_suite() -> None:
    """Runs this module's CPU tests in a fresh process whose triton is imported under TRITON_INTERPRET=1."""
    if interpreted():
        pytest.skip("this process is the interpreter already: its tests run directly")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not gpu", __file__]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    tail = proc.stdout[-4000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, tail
    passed = re.search(r"(\d+) passed", proc.stdout)
    assert passed and int(passed.group(1)) >= 15, tail  # all interpreter tests ran, none skipped
    assert "failed" not in proc.stdout.splitlines()[-1], tail


@pytest.mark.parametrize(
    ("shapes", "dtype", "match"),
    [
        (((1, 2, 8, 64),) * 2 + ((1, 2, 9, 64),), torch.bfloat16, "one shape"),
        (((1, 2, 8, 48),) * 3, torch.bfloat16, "head dim"),
        (((1, 2, 8, 64),) * 3, torch.int8, "share one of"),
    ],
)
def test_refuses_bad_inputs(shapes: tuple, dtype: torch.dtype, match: str) -> None:
    q, k, v = (torch.zeros(s).to(dtype) for s in shapes)
    with pytest.raises(ConfigError, match=match):
        attention(q, k, v)


def test_refuses_unknown_variant_and_bad_blocks() -> None:
    q = torch.zeros(1, 1, 8, 64, dtype=torch.bfloat16)
    with pytest.raises(ConfigError, match="unknown attention variant"):
        attention(q, q, q, "fp4")
    with pytest.raises(ConfigError, match="power of two"):
        AttentionVariant("fp8", "block", block=96)
    with pytest.raises(ConfigError, match="power of two"):
        LaunchConfig(block_m=100)


def test_cpu_tensors_need_the_interpreter() -> None:
    if interpreted():
        pytest.skip("this process runs the interpreter")
    q = torch.zeros(1, 1, 8, 64, dtype=torch.bfloat16)
    with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET=1"):
        attention(q, q, q)


@pytest.mark.slow  # a child interpreter
def test_benchmark_imports_neither_diffusers_nor_the_rest_of_engine() -> None:
    """benchmarks/attention_bench.py runs on a GPU machine where our package is not installed."""
    if interpreted():
        pytest.skip("checked once, in the parent process")
    code = (
        "import sys, benchmarks.attention_bench, engine.kernels; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('diffusers', 'transformers', 'engine')))"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    loaded = eval(proc.stdout.strip().splitlines()[-1])
    assert not [
        m
        for m in loaded
        # the package root imports version.py and noise.py (logging filters; the standard library only)
        if not m.startswith(("engine.kernels", "engine.errors", "engine.version", "engine.noise"))
        and m != "engine"
    ]
    assert "engine.kernels.processor" not in loaded


@pytest.mark.slow  # dynamo traces the launch
@pytest.mark.parametrize(("variant", "autotune"), [("bf16", False), ("bf16", True)])
def test_dynamo_traces_the_launch_without_graph_breaks(
    monkeypatch: pytest.MonkeyPatch, variant: str, autotune: bool
) -> None:
    """Under torch.compile, one attention call must become one graph holding the kernel.

    Traced on fake CUDA tensors, no GPU: dynamo is told that Triton can run here (it asks for a device), and
    Heuristics.run is made opaque to it, as torch 2.11's dynamo (the GPU image's) treats a
    `triton.heuristics` launch: it recognizes only JITFunction and Autotuner launches. S = 250 is a multiple
    of no tile, so the EVEN_M / EVEN_N path is the one a heuristic would have computed."""
    if interpreted():
        pytest.skip("dynamo traces compiled Triton kernels (checked in the parent process)")
    import torch._dynamo
    import torch.utils._triton
    from torch._subclasses.fake_tensor import FakeTensorMode
    from triton.runtime.autotuner import Heuristics

    monkeypatch.setattr(torch.utils._triton, "has_triton", lambda: True)
    monkeypatch.setattr(Heuristics, "run", torch._dynamo.disable(Heuristics.run, recursive=True))

    def call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return attention(q, k, v, variant, autotune=autotune)

    torch._dynamo.reset()
    with FakeTensorMode(allow_non_fake_inputs=True):
        q = torch.empty(1, 2, 250, 64, dtype=torch.bfloat16, device="cuda")  # [B, H, S, D]
        explained = torch._dynamo.explain(call)(q, torch.empty_like(q), torch.empty_like(q))
    torch._dynamo.reset()
    assert explained.graph_break_count == 0, [str(b.reason)[:300] for b in explained.break_reasons]
    assert explained.graph_count == 1
    targets = [str(n.target) for n in explained.graphs[0].graph.nodes]
    assert sum("triton_kernel_wrapper" in t for t in targets) == 1, targets


SM90_SHARED_BYTES = 232448  # H100: 227 KB of shared memory per block


def compile_for_hopper(variant: str, config: LaunchConfig) -> Any:
    """Compiles the kernel ahead of time for sm_90 (Triton's bundled ptxas runs without a GPU), specialised
    as a launch on contiguous [B, H, S, D] tensors would be: unit strides as constants, the rest and the
    pointers divisible by 16, S not a multiple of the tiles (the masked tail is compiled in)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from engine.kernels import kernel

    spec = VARIANTS[variant]
    quant = {"bf16": 0, "fp8": 1, "int8-fp8": 2}[spec.precision]
    v_unit = "stride_vs" if spec.quantized else "stride_vd"  # quantized V is stored tokens-innermost
    const: dict[str, Any] = dict(
        HEAD_DIM=128,
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        QUANT=quant,
        P_SCALE=448.0,
        K_BLOCK=spec.block if spec.quantized and spec.granularity == "block" else 0,
        INTERPRETER=False,
        P_MANTISSA=7,
        P_EMIN=-126,
        EVEN_M=False,
        EVEN_N=False,
        **{name: 1 for name in ("stride_qd", "stride_kd", "stride_od", v_unit)},
    )
    qk_type = {0: "*bf16", 1: "*fp8e4nv", 2: "*i8"}[quant]
    pointers = {"Q": qk_type, "K": qk_type, "V": "*fp8e4nv" if quant else "*bf16", "Out": "*bf16"}
    pointers |= {"SQ": "*fp32", "SK": "*fp32", "SV": "*fp32"}
    fn = kernel.attention_fwd
    signature: dict[str, str] = {}
    attrs: dict[tuple[int, ...], list[list[Any]]] = {}
    for i, name in enumerate(fn.arg_names):
        signature[name] = (
            "constexpr" if name in const else pointers.get(name, "fp32" if name == "qk_scale" else "i32")
        )
        if name in pointers or (name.startswith("stride_") and name not in const):
            attrs[(i,)] = [["tt.divisibility", 16]]
    options = dict(num_warps=config.num_warps, num_stages=config.num_stages)
    return triton.compile(
        ASTSource(fn, signature, const, attrs), target=GPUTarget("cuda", 90, 128), options=options
    )


@pytest.mark.slow
@pytest.mark.parametrize(("variant", "mma"), [("bf16", ".bf16.bf16"), ("int8-fp8", ".s8.s8")])
def test_compiles_to_hopper_tensor_core_code(variant: str, mma: str) -> None:
    """The compiled path, which the interpreter never runs: the default launch config of each kernel family
    compiles for sm_90, uses wgmma (bf16; or s8 QK^T with e4m3 PV), fits in shared memory and spills no
    registers."""
    if interpreted():
        pytest.skip("compiles in the parent process (this one interprets)")
    from engine.kernels.attention import CUDA_DEFAULT, CUDA_DEFAULT_QUANT

    compiled = compile_for_hopper(
        variant, CUDA_DEFAULT_QUANT if VARIANTS[variant].quantized else CUDA_DEFAULT
    )
    ptx = compiled.asm["ptx"]
    assert compiled.asm["cubin"]
    assert re.search(r"wgmma\.mma_async\.sync\.aligned\.m64n\d+k\d+\.(f32|s32)" + re.escape(mma), ptx)
    if VARIANTS[variant].quantized:
        assert re.search(r"wgmma\.mma_async\S+\.f32\.e4m3\.e4m3", ptx)  # P @ V in FP8
    assert 0 < compiled.metadata.shared <= SM90_SHARED_BYTES
    registers, spilled = ptxas_usage(ptx)
    assert spilled == 0 and registers <= 255, (registers, spilled)  # measured 180 (bf16), 231 (int8-fp8)


def ptxas_usage(ptx: str) -> tuple[int, int]:
    """(registers per thread, bytes of spill stores) that Triton's ptxas reports for sm_90a."""
    import tempfile

    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.ptx"
        path.write_text(ptx)
        cmd = [get_ptxas(90).path, "-arch=sm_90a", "-v", str(path), "-o", os.devnull]
        log = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=300).stderr
    registers, spills = re.search(r"Used (\d+) registers", log), re.search(r"(\d+) bytes spill stores", log)
    assert registers and spills, log
    return int(registers.group(1)), int(spills.group(1))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("out_type", "rounding"), [("*fp8e4nv", r"cvt\.rn\.satfinite\.e4m3x2\.f32"), ("*i8", r"0f4B400000")]
)
def test_prepass_compiles_to_hopper_code(out_type: str, rounding: str) -> None:
    """The fused pre-pass compiles for sm_90 too, with the rounding the torch reference uses: the hardware's
    round-to-nearest-even saturating e4m3 cast, or for int8 the fp32 add of 1.5 * 2^23 (0x4B400000) that
    rounds to an integer (not folded away by the compiler)."""
    if interpreted():
        pytest.skip("compiles in the parent process (this one interprets)")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from engine.kernels.quant_kernel import MODE_BLOCK, quantize_tiles

    const: dict[str, Any] = dict(
        HEAD_DIM=128,
        BLOCK=128,
        MODE=MODE_BLOCK,
        SUBTRACT_MEAN=True,
        TO_INT8=out_type == "*i8",
        INTERPRETER=False,
        stride_xd=1,
        stride_yd=1,
    )
    pointers = {"X": "*bf16", "Y": out_type, "SCALE": "*fp32", "MEAN": "*fp32"}
    fn = quantize_tiles
    signature = {
        n: "constexpr" if n in const else pointers.get(n, "fp32" if n == "qmax" else "i32")
        for n in fn.arg_names
    }
    compiled = triton.compile(ASTSource(fn, signature, const), target=GPUTarget("cuda", 90, 128))
    assert compiled.asm["cubin"]
    assert re.search(rounding, compiled.asm["ptx"])


# ------------------------------------------------------------------ interpreter: the kernel's numbers

# Tile configs chosen so that S is not a multiple of the tiles (77, 130, 257) and BLOCK_M != BLOCK_N.
BF16_CASES = [
    ((1, 2, 77, 64), LaunchConfig(64, 32, num_warps=4, num_stages=1)),
    ((2, 2, 130, 128), LaunchConfig(32, 64, num_warps=4, num_stages=1)),
    ((1, 2, 257, 64), LaunchConfig(128, 64, num_warps=4, num_stages=1)),
]


@in_interpreter
@pytest.mark.parametrize(("shape", "config"), BF16_CASES)
def test_bf16_matches_sdpa(shape: tuple[int, int, int, int], config: LaunchConfig) -> None:
    """bf16 in, fp32 softmax and accumulation, bf16 out: within 1 % of the output's scale of fp32 SDPA on the
    same bf16 inputs (measured 0.24-0.44 %: the bf16 rounding of P and of the output)."""
    q, k, v = qkv(*shape)
    out = attention(q, k, v, "bf16", config=config)
    ref = exact_attention(q, k, v)
    assert out.dtype == torch.bfloat16 and out.shape == q.shape
    assert max_err(out, ref) < 1e-2 * ref.abs().max().item()


@in_interpreter
def test_fp32_inputs_give_exact_attention() -> None:
    """With fp32 Q/K/V nothing is rounded on the interpreter, so only the order of the sums differs: this
    isolates the online softmax, the tail masks and the rescaling."""
    q, k, v = qkv(2, 2, 130, 64, torch.float32)
    out = attention(q, k, v, "bf16", config=LaunchConfig(64, 32))
    assert max_err(out, exact_attention(q, k, v)) < 1e-5


QUANT_CASES = [
    ((2, 2, 130, 128), "fp8-head"),
    ((2, 2, 130, 128), "fp8-block"),
    ((2, 2, 130, 128), "int8-fp8"),
    ((1, 2, 77, 64), AttentionVariant("fp8", "block", block=32)),  # 2 K scales per 64-column tile
]


@in_interpreter
@pytest.mark.parametrize(("shape", "variant"), QUANT_CASES)
def test_quantized_within_bound(shape: tuple[int, int, int, int], variant: str | AttentionVariant) -> None:
    """Two bounds, with the error split into quantization (reference: quantize -> dequantize -> fp32 SDPA)
    and the kernel's own error (P held in e4m3, bf16 output):

    - kernel vs reference, max abs <= max|V| / 16 + max|out| / 256. Worst case, not a fit: e4m3 rounds P
      (scaled into [0, 448]) by at most 2^-4 relative, so sum_j dp_j v_j / l <= 2^-4 max|V|; the bf16 output
      adds 2^-8 relative. Measured 0.010-0.019 against bounds of 0.25-0.29.
    - relative L2 vs exact attention <= 1.5x the reference's: the kernel adds at most half again the
      quantization error. Measured 1.04-1.27x.
    """
    q, k, v = qkv(*shape)
    exact = exact_attention(q, k, v)
    ref = reference_attention(q, k, v, variant)
    out = attention(q, k, v, variant, config=LaunchConfig(64, 64))
    assert out.dtype == torch.bfloat16
    assert max_err(out, ref) <= v.float().abs().max().item() / 16 + exact.abs().max().item() / 256
    ref_err, out_err = rel_l2(ref, exact), rel_l2(out, exact)
    assert 0 < ref_err < 0.1  # the quantization is real, and sane
    assert out_err <= 1.5 * ref_err


@in_interpreter
@pytest.mark.parametrize("variant", ["fp8-head", "fp8-block", "int8-fp8"])
def test_fused_prepass_equals_torch_prepass(variant: str) -> None:
    """The Triton pre-pass that attention() runs gives the torch reference pre-pass's bytes: same scales,
    same quantized values (ties to even, which bf16 inputs hit often), same tokens-innermost V layout."""
    from engine.kernels.quant import quantize_qkv
    from engine.kernels.quant_kernel import quantize_qkv_fused

    q, k, v = qkv(2, 2, 130, 64)
    ours, ref = quantize_qkv_fused(q, k, v, VARIANTS[variant]), quantize_qkv(q, k, v, VARIANTS[variant])
    assert ours.block == ref.block
    for field in ("q", "k", "v", "q_scale", "k_scale", "v_scale"):
        a, b = getattr(ours, field), getattr(ref, field)
        assert a.dtype == b.dtype and a.stride() == b.stride(), field
        assert torch.equal(
            a.view(torch.uint8) if a.element_size() == 1 else a,
            b.view(torch.uint8) if b.element_size() == 1 else b,
        ), field


@in_interpreter
def test_strided_views_and_output_layout() -> None:
    """The processor's case: [B, S, H, D] memory seen as [B, H, S, D]. Same values as contiguous inputs, and
    the output comes back in the input's layout."""
    q, k, v = qkv(1, 2, 77, 64)
    views = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v)]
    out = attention(*views, "fp8-block")
    assert out.stride() == views[0].stride()
    assert torch.equal(out, attention(q, k, v, "fp8-block"))


@in_interpreter
def test_smoothing_k_removes_the_offset_error() -> None:
    """Adding one vector to every key leaves softmax unchanged. With smooth_k the quantized kernel's error is
    the same with and without that offset; without smoothing the offset uses up K's range and the error
    grows (measured: 0.048 -> 0.048 smoothed, 0.066 -> 0.21 plain, relative L2)."""
    q, k, v = qkv(1, 2, 77, 64)
    shifted = (k.float() + 8.0).bfloat16()  # bf16 rounds k + 8, so each is compared with its own exact output
    exact, exact_shifted = exact_attention(q, k, v), exact_attention(q, shifted, v)
    smooth, plain = VARIANTS["fp8-block"], AttentionVariant("fp8", "block", smooth_k=False)
    smooth_err = rel_l2(attention(q, shifted, v, smooth), exact_shifted)
    assert smooth_err <= 1.1 * rel_l2(attention(q, k, v, smooth), exact)
    assert rel_l2(attention(q, shifted, v, plain), exact_shifted) > 2 * smooth_err


# ------------------------------------------------------------------ interpreter: the processor in diffusers


ONE_TILE = LaunchConfig(
    128, 128
)  # the tiny transformer's 80 tokens in one masked tile: fewest interpreter steps


def tiny_transformer_inputs(dtype: torch.dtype) -> dict[str, Any]:
    n, t, side = 64, 16, 8
    g = torch.Generator().manual_seed(1)
    img_ids = torch.zeros(n, 3)
    img_ids[:, 1], img_ids[:, 2] = torch.arange(n) // side, torch.arange(n) % side
    return dict(
        hidden_states=torch.randn(1, n, 64, generator=g).to(dtype),
        encoder_hidden_states=torch.randn(1, t, 32, generator=g).to(dtype),
        pooled_projections=torch.randn(1, 32, generator=g).to(dtype),
        timestep=torch.tensor([0.5], dtype=dtype),
        guidance=torch.tensor([2.5], dtype=dtype),
        img_ids=img_ids,
        txt_ids=torch.zeros(t, 3),
        return_dict=False,
    )


def tiny_transformer(dtype: torch.dtype, device: str = "cpu") -> Any:
    from diffusers import FluxTransformer2DModel

    from engine.config import PRESETS

    torch.manual_seed(0)
    model = FluxTransformer2DModel(**PRESETS["tiny"].transformer.to_diffusers()).eval()
    return model.to(device, dtype)


@in_interpreter
@torch.no_grad()
def test_processor_matches_stock_diffusers() -> None:
    """The tiny Flux transformer (1 double + 2 single blocks, RoPE, joint text + image attention) with our
    processor against stock diffusers: fp32 within 1e-5 of the output's scale; bf16 within a quarter of
    the gap between stock bf16 and stock fp32 (ours adds less than bf16 itself does). Restoring gives the
    stock output bit for bit."""
    from engine.kernels import restore_attention, use_kernel_attention

    model, inputs = tiny_transformer(torch.float32), tiny_transformer_inputs(torch.float32)
    stock = model(**inputs)[0]
    previous = use_kernel_attention(model, "bf16", ONE_TILE)
    ours = model(**inputs)[0]
    assert max_err(ours, stock) < 1e-5 * stock.abs().max().item()
    restore_attention(model, previous)
    assert torch.equal(model(**inputs)[0], stock)

    model16, inputs16 = model.to(torch.bfloat16), tiny_transformer_inputs(torch.bfloat16)
    stock16 = model16(**inputs16)[0]
    use_kernel_attention(model16, "bf16", ONE_TILE)
    ours16 = model16(**inputs16)[0]
    assert rel_l2(ours16, stock16) < 0.25 * rel_l2(stock16, stock)
    restore_attention(model16, previous)


@in_interpreter
@torch.no_grad()
def test_processor_quantized_variant_stays_close() -> None:
    """FP8 attention in every layer of the tiny transformer moves its output by under 0.5 % (relative L2;
    measured 0.08 %)."""
    from engine.kernels import use_kernel_attention

    model, inputs = tiny_transformer(torch.float32), tiny_transformer_inputs(torch.float32)
    stock = model(**inputs)[0]
    use_kernel_attention(model, "fp8-block", ONE_TILE)
    assert 0 < rel_l2(model(**inputs)[0], stock) < 5e-3


@in_interpreter
def test_benchmark_dry_run(tmp_path: Path) -> None:
    """benchmarks/attention_bench.py end to end on the interpreter at a tiny shape: every contestant that
    can run on a CPU reports its error, and the JSON is complete."""
    out = tmp_path / "attention_bench.json"
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.attention_bench",
        "--shape",
        "tiny",
        "--device",
        "cpu",
        "--iters",
        "1",
    ]
    proc = subprocess.run(
        [*cmd, "--out", str(out), "--deadline-s", "120"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["finished"] is True
    rows = {r["name"]: r for r in report["contestants"]}
    assert {"sdpa math", "triton bf16", "triton fp8-head", "triton fp8-block", "triton int8-fp8"} <= set(rows)
    for name, row in rows.items():
        if row["status"] != "ok":
            assert name.startswith("sdpa "), row  # only SDPA's CUDA-only backends may be skipped
            continue
        assert math.isfinite(row["max_abs_err"]) and math.isfinite(row["mean_abs_err"])
        assert row["max_abs_err"] < (0.02 if "bf16" in name or "sdpa" in name else 0.15), row
    assert "contestant" in proc.stdout  # the table


# ------------------------------------------------------------------ GPU (compiled kernel, Hopper)

FULL = (1, 24, 8704, 128)  # 1024^2 Kontext: 512 text + 4096 context + 4096 target tokens, 24 heads


@pytest.mark.parametrize("variant", ["bf16", "fp8-head", "fp8-block", "int8-fp8"])
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_gpu_kernel_vs_sdpa_at_1024(variant: str) -> None:
    """At the 1024^2 shape: bf16 against SDPA bf16 (cuDNN/flash) and fp32; quantized variants under the same
    bounds as on the interpreter."""
    q, k, v = qkv(*FULL, device="cuda")
    exact = exact_attention(q, k, v)
    out = attention(q, k, v, variant)
    assert torch.isfinite(out).all()
    if variant == "bf16":
        sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        assert max_err(out, exact) < 1e-2 * exact.abs().max().item()
        assert max_err(out, exact) <= 2 * max_err(sdpa, exact) + 1e-3
        return
    ref = reference_attention(q, k, v, variant)
    assert max_err(out, ref) <= v.float().abs().max().item() / 16 + exact.abs().max().item() / 256
    assert rel_l2(out, exact) <= 1.5 * rel_l2(ref, exact)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@torch.no_grad()
def test_gpu_processor_matches_stock() -> None:
    from engine.kernels import restore_attention, use_kernel_attention

    model = tiny_transformer(torch.bfloat16, "cuda")
    inputs = {
        k: v.cuda() if isinstance(v, torch.Tensor) else v
        for k, v in tiny_transformer_inputs(torch.bfloat16).items()
    }
    stock = model(**inputs)[0]
    previous = use_kernel_attention(model, "bf16")
    ours = model(**inputs)[0]
    restore_attention(model, previous)
    assert rel_l2(ours, stock) < 1e-2
