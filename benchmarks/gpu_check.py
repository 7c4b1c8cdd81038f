"""The prepared GPU check: speed of the full-size Kontext transformer, eager / torch.compile / torchao FP8.

One script for one device call (gpu_check.sh installs the wheels it needs): random bf16 weights built on
the GPU, two shapes (a 1024^2 edit and a 0.25 MP edit), CUDA-event timings, TFLOP/s from engine.flops,
peak memory and the FP8 error. A global deadline skips what would overrun; the JSON is rewritten after
every contestant, so a killed run still leaves its results. `--scale tiny --device cpu` runs in seconds.

On the device: `bash benchmarks/gpu_check.sh .whl --out "$OUT/gpu_check.json"` (about 5-7 minutes on an
H100 with the default --budget-s 420). Compile is regional by default (each repeated block compiled,
as diffusers' compile_repeated_blocks does): a whole-model torch.compile of the 57 blocks can take
minutes per shape, and four such compiles (2 precisions x 2 shapes) do not fit the budget.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import os
import platform
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import cast

import torch
from torch import nn

from engine.buckets import ShapeKey, shape_key
from engine.config import KONTEXT_DEV_TRANSFORMER, PRESETS, TransformerConfig
from engine.flops import gpu_peaks, transformer_flops

logger = logging.getLogger("benchmarks.gpu_check")

DEFAULT_OUT = Path("benchmarks/results/gpu_check.json")

# scale -> model config and the two shapes: (side in pixels of target and context, text tokens).
SCALES: dict[str, tuple[TransformerConfig, tuple[tuple[int, int], ...]]] = {
    "full": (KONTEXT_DEV_TRANSFORMER, ((1024, 512), (512, 512))),  # 4096+4096+512, 1024+1024+512 tokens
    "small": (PRESETS["small"].transformer, ((256, 128), (128, 128))),
    "tiny": (PRESETS["tiny"].transformer, ((128, 32), (64, 32))),
}

# Until a compile has been measured, what one is assumed to cost (seconds, first call included).
COMPILE_GUESS_S = {"regional": 75.0, "full": 200.0}
QUANTIZE_GUESS_S = 30.0
ASSUMED_TFLOPS = {"cuda": 150.0, "cpu": 0.02}  # pessimistic rate to guess a contestant's run time


class BudgetExceeded(BaseException):
    """Raised by the deadline alarm; a BaseException so that no library's `except Exception` eats it."""


@dataclass(frozen=True)
class Contestant:
    precision: str  # bf16 | fp8
    compiled: bool
    shape_index: int
    priority: int  # 1: the numbers that matter most; 2: skipped first when time runs short

    @property
    def name(self) -> str:
        return f"{self.precision} {'compile' if self.compiled else 'eager'}"


# Quantization is in place, so every bf16 contestant runs before every fp8 one. Within that order the
# 1024^2 numbers (priority 1) keep time reserved ahead of the 0.25 MP ones (priority 2).
PLAN: tuple[Contestant, ...] = (
    Contestant("bf16", False, 0, 1),
    Contestant("bf16", False, 1, 2),
    Contestant("bf16", True, 0, 1),
    Contestant("bf16", True, 1, 2),
    Contestant("fp8", False, 0, 1),
    Contestant("fp8", True, 0, 1),
    Contestant("fp8", False, 1, 2),
    Contestant("fp8", True, 1, 2),
)


@dataclass
class Result:
    name: str
    precision: str
    compiled: bool
    shape: str
    status: str = "pending"  # ok | skipped: <why> | error: <what> (pending, running: not yet done)
    median_ms: float | None = None
    p90_ms: float | None = None
    iters: int = 0
    first_call_s: float | None = None  # the first forward, compile included
    compile_s: float | None = None  # compiled contestants: first call less one steady forward
    tflops: float | None = None
    pct_bf16_peak: float | None = None
    pct_fp8_peak: float | None = None
    peak_mem_gb: float | None = None
    rel_l2_vs_bf16_eager: float | None = None
    output_finite: bool | None = None
    graphs_compiled: int | None = None  # dynamo's unique graphs so far: recompiles show here
    note: str = ""


class Deadline:
    """A global deadline: estimates decide what to skip, and an alarm interrupts what overruns."""

    def __init__(self, budget_s: float) -> None:
        self.start = time.monotonic()
        self.budget_s = budget_s
        self.armed = False

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.start)

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def arm(self) -> None:
        """SIGALRM at the deadline raises BudgetExceeded in the main thread (Unix only)."""
        if not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
            return

        def on_alarm(_signum: int, _frame: object) -> None:
            raise BudgetExceeded

        signal.signal(signal.SIGALRM, on_alarm)
        signal.setitimer(signal.ITIMER_REAL, max(self.left(), 0.001))
        self.armed = True

    def disarm(self) -> None:
        if self.armed:
            signal.setitimer(signal.ITIMER_REAL, 0)
            self.armed = False


@dataclass
class State:
    """What the run carries between contestants."""

    model: nn.Module
    device: torch.device
    inputs: list[dict[str, torch.Tensor]]
    shapes: list[ShapeKey]
    deadline: Deadline
    peaks: tuple[float | None, float | None] = (None, None)  # bf16, fp8 dense TFLOP/s of this card
    refs: dict[int, torch.Tensor] = field(default_factory=dict)  # shape index -> bf16 eager output
    eager_ms: dict[int, float] = field(default_factory=dict)  # shape index -> bf16 eager median
    compile_s: dict[str, float] = field(default_factory=dict)  # precision -> longest first call compiled
    compiled_fns: dict[nn.Module, Callable[..., object]] = field(default_factory=dict)
    quantized: str | None = None  # None until quantized; then "ok" or why fp8 is skipped


# ---------------------------------------------------------------- arguments and environment


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scale", choices=sorted(SCALES), default="full", help="model size and shapes")
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    p.add_argument("--budget-s", type=float, default=420.0, help="global deadline from start, seconds")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results path")
    p.add_argument("--warmup", type=int, default=2, help="untimed forwards after the first call")
    p.add_argument("--iters", type=int, default=10, help="timed forwards per contestant")
    p.add_argument(
        "--compile-scope",
        choices=("regional", "full"),
        default="regional",
        help="regional: torch.compile each repeated block (diffusers' compile_repeated_blocks: one compile "
        "per block type, seconds); full: torch.compile(model) (one 57-block graph, minutes per shape)",
    )
    p.add_argument("--compile-on-cpu", action="store_true", help="also compile on a CPU (slow)")
    p.add_argument(
        "--fp8-granularity",
        choices=("row", "tensor"),
        default="row",
        help="torchao scales: row (per-token activations, per-channel weights) or tensor",
    )
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("diffusers", "torchao", "triton", "numpy", "huggingface-hub"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def device_info(device: torch.device) -> dict[str, object]:
    if device.type != "cuda":
        return {
            "name": platform.processor() or platform.machine(),
            "type": device.type,
            "threads": torch.get_num_threads(),
        }
    props = torch.cuda.get_device_properties(device)
    return {
        "name": props.name,
        "type": "cuda",
        "capability": list(torch.cuda.get_device_capability(device)),
        "multiprocessors": props.multi_processor_count,
        "memory_gb": round(props.total_memory / 2**30, 1),
        "cuda": torch.version.cuda,
    }


def fp8_skip_reason(device: torch.device) -> str | None:
    """Why FP8 cannot run here, or None when it can."""
    if device.type != "cuda":
        return f"skipped: fp8 needs a CUDA GPU of compute capability >= 8.9 (device is {device.type})"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        return f"skipped: fp8 needs compute capability >= 8.9, this GPU has {major}.{minor}"
    try:
        import torchao.quantization  # noqa: F401
    except ImportError as e:
        return f"skipped: torchao is not importable ({e})"
    return None


# ---------------------------------------------------------------- model and inputs


def build_model(cfg: TransformerConfig, device: torch.device, dtype: torch.dtype, seed: int) -> nn.Module:
    """FluxTransformer2DModel with random weights, created directly on `device` in `dtype` (no CPU copy)."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:
            model = cast(nn.Module, FluxTransformer2DModel(**cfg.to_diffusers()))
    finally:
        torch.set_default_dtype(previous)
    return model.eval().requires_grad_(False)


def grid_ids(side_tokens: int, index: int, device: torch.device) -> torch.Tensor:
    """Position ids of a square packed latent: (index, row, col) per token. ids: [side^2, 3]."""
    rows = torch.arange(side_tokens, device=device).repeat_interleave(side_tokens)
    cols = torch.arange(side_tokens, device=device).repeat(side_tokens)
    first = torch.full_like(rows, index)
    return torch.stack([first, rows, cols], dim=-1).float()


def make_inputs(
    cfg: TransformerConfig, shape: ShapeKey, side_px: int, device: torch.device, dtype: torch.dtype, seed: int
) -> dict[str, torch.Tensor]:
    """The Denoiser arguments of one Kontext step: target then context tokens, context ids[..., 0] = 1."""
    g = torch.Generator(device=device).manual_seed(seed)
    b, side = shape.batch, side_px // 16
    return {
        # hidden_states: [B, N_tgt + N_ctx, 64]
        "hidden_states": torch.randn(
            b, shape.image_tokens, cfg.in_channels, generator=g, device=device, dtype=dtype
        ),
        # encoder_hidden_states: [B, N_txt, 4096]
        "encoder_hidden_states": torch.randn(
            b, shape.text_tokens, cfg.joint_attention_dim, generator=g, device=device, dtype=dtype
        ),
        # pooled_projections: [B, 768]
        "pooled_projections": torch.randn(
            b, cfg.pooled_projection_dim, generator=g, device=device, dtype=dtype
        ),
        "timestep": torch.full((b,), 0.5, device=device, dtype=dtype),  # t / 1000, as the pipeline passes it
        "img_ids": torch.cat([grid_ids(side, 0, device), grid_ids(side, 1, device)]),  # [N_tgt + N_ctx, 3]
        "txt_ids": torch.zeros(shape.text_tokens, 3, device=device),  # [N_txt, 3]
        "guidance": torch.full((b,), 3.5, device=device, dtype=dtype),
    }


def forward(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**inputs, return_dict=False)[0]  # [B, N_tgt + N_ctx, 64]


# ---------------------------------------------------------------- compile and quantize


def compile_targets(model: nn.Module, scope: str) -> list[nn.Module]:
    if scope == "full":
        return [model]
    blocks = [model.get_submodule("transformer_blocks"), model.get_submodule("single_transformer_blocks")]
    return [block for blocks_of_a_kind in blocks for block in blocks_of_a_kind.children()]


def set_compiled(state: State, scope: str, on: bool) -> None:
    """Switch torch.compile on or off without losing compiled code: the compiled callables are kept.

    mode="default" (no CUDA graphs), dynamic=False: each shape gets its own static graph, as a
    TensorRT profile would; the second shape is a recompile, and its first call times it.
    """
    for module in compile_targets(state.model, scope):
        if not on:
            module._compiled_call_impl = None  # what nn.Module.compile() sets; None means eager
        elif module in state.compiled_fns:
            module._compiled_call_impl = state.compiled_fns[module]
        else:
            module.compile(mode="default", dynamic=False)
            if module._compiled_call_impl is not None:
                state.compiled_fns[module] = module._compiled_call_impl


def reset_compiled(state: State, scope: str) -> None:
    """Forget compiled code (before quantizing: the weights change type)."""
    set_compiled(state, scope, on=False)
    state.compiled_fns.clear()
    torch._dynamo.reset()


def is_token_linear(module: nn.Module, fqn: str) -> bool:
    """The Linears of the blocks that act on tokens; modulation (norm*.linear, B rows) stays bf16.

    Embedders, norm_out and proj_out stay bf16 too, as in ModelOpt's Flux recipe.
    """
    in_blocks = fqn.startswith(("transformer_blocks.", "single_transformer_blocks."))
    return isinstance(module, nn.Linear) and in_blocks and ".norm" not in fqn


def quantize_fp8(model: nn.Module, granularity: str) -> int:
    """torchao dynamic FP8 (e4m3) activations and weights, in place; returns the number of Linears quantized.

    Per-row by default: a scale per token and per output channel. Text and image tokens differ in
    magnitude, and one per-tensor scale set by the largest token costs the others precision; on Hopper
    the row-wise scaled matmul runs at about the speed of the tensor-wise one. set_inductor_config=False
    keeps inductor's defaults (torchao's coordinate-descent tuning would multiply compile time and make
    the FP8 compile unlike the bf16 one).
    """
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, PerTensor, quantize_

    scale = PerRow() if granularity == "row" else PerTensor()
    config = Float8DynamicActivationFloat8WeightConfig(granularity=scale, set_inductor_config=False)
    count = sum(is_token_linear(m, n) for n, m in model.named_modules())
    quantize_(model, config, filter_fn=is_token_linear)
    return count


def raise_recompile_limit(limit: int) -> None:
    """Regional compile keeps 2 block types x 2 shapes on one code object: stay clear of the limit (8)."""
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, max(getattr(config, name), limit))


# ---------------------------------------------------------------- timing


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_forwards(
    fn: Callable[[], torch.Tensor], device: torch.device, warmup: int, iters: int
) -> tuple[float, list[float], torch.Tensor]:
    """First-call seconds, per-iteration milliseconds of `iters` timed calls, and the last output."""
    t0 = time.perf_counter()
    out = fn()
    synchronize(device)
    first_s = time.perf_counter() - t0
    for _ in range(warmup):
        out = fn()
    synchronize(device)
    times_ms: list[float] = []
    if device.type == "cuda":
        events = [
            (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)
        ]
        for start, end in events:
            start.record()
            out = fn()
            end.record()
        torch.cuda.synchronize(device)
        times_ms = [start.elapsed_time(end) for start, end in events]
    else:
        for _ in range(iters):
            t = time.perf_counter()
            out = fn()
            times_ms.append((time.perf_counter() - t) * 1e3)
    return first_s, times_ms, out


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def rel_l2(out: torch.Tensor, ref: torch.Tensor) -> float:
    diff = (out.float() - ref.float()).norm()
    return float(diff / ref.float().norm().clamp_min(1e-30))


def graphs_compiled() -> int | None:
    try:
        from torch._dynamo.utils import counters

        return int(counters["stats"]["unique_graphs"])
    except Exception:  # counters are private; their absence only loses a diagnostic
        return None


# ---------------------------------------------------------------- budget


def estimate_s(c: Contestant, state: State, args: argparse.Namespace) -> float:
    """Seconds a contestant is expected to take, first call and compile included."""
    flops = transformer_flops(SCALES[args.scale][0], state.shapes[c.shape_index]).total
    per_iter = state.eager_ms.get(c.shape_index, 0.0) / 1e3 * 1.5
    per_iter = per_iter or flops / (ASSUMED_TFLOPS.get(state.device.type, 1.0) * 1e12)
    run = per_iter * (1 + args.warmup + args.iters)
    if c.compiled and compile_allowed(state.device, args):
        # the same precision's compile if measured; FP8 traces torchao's tensor subclass, so more than bf16
        same, bf16 = state.compile_s.get(c.precision), state.compile_s.get("bf16")
        run += same or (1.5 * bf16 if bf16 else COMPILE_GUESS_S[args.compile_scope])
    if c.precision == "fp8" and state.quantized is None:
        run += QUANTIZE_GUESS_S
    return run


def reserve_s(index: int, state: State, args: argparse.Namespace, skipped: set[int]) -> float:
    """Time to keep for the later, runnable contestants that matter more than PLAN[index].

    All of them when they fit in what is left; otherwise at least the next one.
    """
    priority = PLAN[index].priority
    later = [
        estimate_s(c, state, args)
        for j, c in enumerate(PLAN)
        if j > index and j not in skipped and c.priority < priority and not blocked_reason(c, state, args)
    ]
    total = sum(later)
    return total if not later or total <= state.deadline.left() else later[0]


def compile_allowed(device: torch.device, args: argparse.Namespace) -> bool:
    return device.type == "cuda" or args.compile_on_cpu


# ---------------------------------------------------------------- the run


def run_contestant(c: Contestant, result: Result, state: State, args: argparse.Namespace) -> None:
    """Measure one contestant into `result` (the model is already in the right precision)."""
    shape, inputs = state.shapes[c.shape_index], state.inputs[c.shape_index]
    recompile = c.compiled and bool(state.compiled_fns)  # compiled code exists, for another shape
    set_compiled(state, args.compile_scope, on=c.compiled)
    if state.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(state.device)
    try:
        with torch.no_grad():  # not inference_mode: safest with compile and torchao's tensor subclasses
            first_s, times_ms, out = time_forwards(
                lambda: forward(state.model, inputs), state.device, args.warmup, args.iters
            )
    finally:
        set_compiled(state, args.compile_scope, on=False)

    median = percentile(times_ms, 50)
    result.median_ms, result.p90_ms, result.iters = median, percentile(times_ms, 90), len(times_ms)
    result.first_call_s = first_s
    result.tflops = transformer_flops(SCALES[args.scale][0], shape).total / (median / 1e3) / 1e12
    bf16_peak, fp8_peak = state.peaks
    result.pct_bf16_peak = 100 * result.tflops / bf16_peak if bf16_peak else None
    result.pct_fp8_peak = 100 * result.tflops / fp8_peak if fp8_peak and c.precision == "fp8" else None
    if state.device.type == "cuda":
        result.peak_mem_gb = torch.cuda.max_memory_allocated(state.device) / 2**30
    result.output_finite = bool(torch.isfinite(out).all())
    if c.precision == "bf16" and not c.compiled:
        state.refs[c.shape_index] = out.clone()
        state.eager_ms[c.shape_index] = median
    if c.shape_index in state.refs:
        result.rel_l2_vs_bf16_eager = rel_l2(out, state.refs[c.shape_index])
    if c.compiled:
        result.compile_s = max(first_s - median / 1e3, 0.0)
        state.compile_s[c.precision] = max(first_s, state.compile_s.get(c.precision, 0.0))
        result.graphs_compiled = graphs_compiled()
        result.note = "recompiled for this shape (dynamic=False)" if recompile else "first compile"
    result.status = "ok"


def prepare_fp8(state: State, args: argparse.Namespace) -> None:
    """Quantize once, after every bf16 contestant; sets state.quantized to "ok" or why fp8 is skipped."""
    reset_compiled(state, args.compile_scope)
    gc.collect()
    if state.device.type == "cuda":
        torch.cuda.empty_cache()
    t0 = time.perf_counter()
    try:
        count = quantize_fp8(state.model, args.fp8_granularity)
    except Exception as e:  # quantization failing skips the fp8 contestants, not the report
        logger.exception("FP8 quantization failed")
        state.quantized = f"skipped: fp8 quantization failed: {type(e).__name__}: {str(e)[:200]}"
        return
    synchronize(state.device)
    logger.info(
        "quantized %d Linears to FP8 (%s) in %.1f s", count, args.fp8_granularity, time.perf_counter() - t0
    )
    state.quantized = "ok"


def blocked_reason(c: Contestant, state: State, args: argparse.Namespace) -> str | None:
    """Why a contestant cannot run on this machine at all, or None."""
    if c.precision == "fp8":
        reason = fp8_skip_reason(state.device) or (state.quantized if state.quantized != "ok" else None)
        if reason:
            return reason
    if c.compiled and not compile_allowed(state.device, args):
        return "skipped: compile is off on a CPU (pass --compile-on-cpu)"
    return None


def skip_reason(
    c: Contestant, index: int, state: State, args: argparse.Namespace, skipped: set[int]
) -> str | None:
    """Why PLAN[index] does not run now, or None."""
    reason = blocked_reason(c, state, args)
    if reason:
        return reason
    need, keep, left = (
        estimate_s(c, state, args),
        reserve_s(index, state, args, skipped),
        state.deadline.left(),
    )
    if need + keep > left:
        return f"skipped: budget (needs ~{need:.0f} s, keeps {keep:.0f} s for priority 1, {left:.0f} s left)"
    return None


def run_plan(state: State, results: list[Result], args: argparse.Namespace, save: Callable[[], None]) -> None:
    """Every contestant in PLAN order; the report is saved after each one."""
    skipped: set[int] = set()
    for i, (c, result) in enumerate(zip(PLAN, results, strict=True)):
        reason = skip_reason(c, i, state, args, skipped)
        if reason is None and c.precision == "fp8" and state.quantized is None:
            prepare_fp8(state, args)
            reason = state.quantized if state.quantized != "ok" else None
        if reason:
            result.status = reason
            skipped.add(i)
            logger.info("%s at %s: %s", c.name, result.shape, reason)
            save()
            continue
        logger.info("%s at %s ...", c.name, result.shape)
        result.status = "running"
        try:
            run_contestant(c, result, state, args)
        except Exception as e:  # one failing contestant must not lose the others' numbers
            logger.exception("%s at %s failed", c.name, result.shape)
            result.status = f"error: {type(e).__name__}: {str(e)[:300]}"
            if state.device.type == "cuda":
                torch.cuda.empty_cache()
        logger.info("%s at %s: %s %s ms", c.name, result.shape, result.status, _fmt(result.median_ms, ".2f"))
        save()


def write_report(path: Path, report: dict[str, object]) -> None:
    """Write the JSON whole or not at all (temporary file, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def describe(args: argparse.Namespace, device: torch.device, shapes: list[ShapeKey]) -> dict[str, object]:
    """The report's header: machine, versions, model, shapes and the settings of the run."""
    cfg, sides = SCALES[args.scale]
    info = device_info(device)
    bf16_peak, fp8_peak = gpu_peaks(str(info["name"]))
    rows = []
    for (side, _), key in zip(sides, shapes, strict=True):
        f = transformer_flops(cfg, key)
        flops = {
            "tflop": f.total / 1e12,
            "linear_tflop": f.linear / 1e12,
            "attention_tflop": f.attention / 1e12,
        }
        rows.append({"key": str(key), **asdict(key), "side_px": side, **flops})
    return {
        "scale": args.scale,
        "device": info,
        "peaks_tflops": {"bf16": bf16_peak, "fp8": fp8_peak},
        "versions": versions(),
        "config": asdict(cfg),
        "shapes": rows,
        "budget_s": args.budget_s,
        "warmup": args.warmup,
        "iters": args.iters,
        "compile": {"scope": args.compile_scope, "mode": "default", "dynamic": False},
        "fp8": {
            "recipe": "torchao Float8DynamicActivationFloat8WeightConfig, e4m3, set_inductor_config=False",
            "granularity": args.fp8_granularity,
            "quantized": "token Linears of the blocks; modulation, embedders, norm_out, proj_out stay bf16",
        },
    }


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_table(results: list[Result]) -> None:
    print(
        f"{'contestant':<13} {'shape':<20} {'median ms':>9} {'p90 ms':>8} {'TFLOP/s':>8} {'%bf16pk':>7} "
        f"{'1st s':>6} {'peak GB':>7} {'relL2':>8}  status"
    )
    for r in results:
        print(
            f"{r.name:<13} {r.shape:<20} {_fmt(r.median_ms, '.2f'):>9} {_fmt(r.p90_ms, '.2f'):>8} "
            f"{_fmt(r.tflops, '.4g'):>8} {_fmt(r.pct_bf16_peak, '.1f'):>7} {_fmt(r.first_call_s, '.1f'):>6} "
            f"{_fmt(r.peak_mem_gb, '.1f'):>7} {_fmt(r.rel_l2_vs_bf16_eager, '.1e'):>8}  {r.status}"
        )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    deadline = Deadline(args.budget_s)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device here: pass --device cpu (with --scale tiny or small)", file=sys.stderr)
        return 2
    cfg, sides = SCALES[args.scale]
    shapes = [shape_key((side, side), (side, side), text) for side, text in sides]
    raise_recompile_limit(16)

    results = [Result(c.name, c.precision, c.compiled, str(shapes[c.shape_index])) for c in PLAN]
    meta = describe(args, device, shapes)
    report: dict[str, object] = {"meta": meta, "finished": False}

    def save() -> None:
        report["contestants"] = [asdict(r) for r in results]
        report["elapsed_s"] = round(deadline.elapsed(), 1)
        write_report(args.out, report)

    save()
    logger.info("device %s; versions %s", meta["device"], meta["versions"])
    interrupted = False
    deadline.arm()
    try:
        t0 = time.perf_counter()
        model = build_model(cfg, device, torch.bfloat16, args.seed)
        synchronize(device)
        params = sum(p.numel() for p in model.parameters())
        report["build"] = {"seconds": round(time.perf_counter() - t0, 1), "params": params}
        logger.info("built a %.3fB-parameter model in %.1f s", params / 1e9, time.perf_counter() - t0)
        inputs = [
            make_inputs(cfg, key, side, device, torch.bfloat16, args.seed + 1)
            for key, (side, _) in zip(shapes, sides, strict=True)
        ]
        state = State(
            model, device, inputs, shapes, deadline, peaks=gpu_peaks(str(device_info(device)["name"]))
        )
        run_plan(state, results, args, save)
    except BudgetExceeded:
        interrupted = True
        for r in results:
            if r.status == "running":
                r.status = "skipped: budget (interrupted at the deadline)"
            elif r.status == "pending":
                r.status = "skipped: budget (deadline reached)"
    finally:
        deadline.disarm()
    report["finished"] = not interrupted
    save()
    print_table(results)
    print(f"wrote {args.out} in {deadline.elapsed():.0f} s")
    if interrupted:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)  # compile workers may still be busy: do not wait for them at interpreter exit
    return 0


if __name__ == "__main__":
    sys.exit(main())
