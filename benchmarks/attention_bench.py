"""GPU micro-benchmark of our Triton attention kernel against torch SDPA at the Kontext shapes.

    python -m benchmarks.attention_bench --out PATH.json [--deadline-s 80] [--shape 1024 --shape 0.25mp]

Contestants: SDPA bf16 with each backend torch offers (flash, cuDNN, efficient; math only on a CPU), then our
kernel in bf16, fp8-head, fp8-block and int8-fp8. Each reports the median time per call (the quantization
pre-pass included, and also timed alone), TFLOP/s at 4*B*H*S^2*D, its first call (Triton's compile), and the
max / mean abs error and relative L2 against fp32 SDPA on the same bf16 inputs; for quantized variants also
the relative L2 of the torch reference ("ref L2": the part of the error quantization alone causes). The JSON
is rewritten after every contestant, and a hard deadline (SIGALRM) ends the run with what it has. Imports
torch, triton and engine.kernels only, so it runs from a checkout where the package is not installed.
`--shape tiny --device cpu` runs the same path in Triton's interpreter in seconds (a test does).
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import platform
import signal
import statistics
import sys
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger("benchmarks.attention_bench")

# name -> (B, H, S, D). 1024^2: 512 text + 4096 context + 4096 target tokens; 0.25 MP: 512 + 1024 + 1024.
SHAPES = {"1024": (1, 24, 8704, 128), "0.25mp": (1, 24, 2560, 128), "tiny": (1, 2, 130, 64)}
OURS = ("bf16", "fp8-head", "fp8-block", "int8-fp8")
SDPA_BACKENDS = ("flash", "cudnn", "efficient", "math")


class DeadlineReached(BaseException):
    """Raised by the alarm; a BaseException so that no library's `except Exception` swallows it."""


@dataclass
class Row:
    name: str
    shape: str
    status: str = "ok"  # ok | skipped: why | error: what
    median_ms: float | None = None
    first_call_s: float | None = None  # compile + first run (Triton) or first run (SDPA)
    prepass_ms: float | None = None  # the quantization pre-pass alone (quantized variants)
    tflops: float | None = None
    max_abs_err: float | None = None
    mean_abs_err: float | None = None
    rel_l2: float | None = None
    ref_rel_l2: float | None = (
        None  # the torch reference's (quantize -> dequantize -> fp32 SDPA): quantization alone
    )
    iters: int = 0


def sdpa_context(backend: str) -> AbstractContextManager[None]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    names = {
        "flash": SDPBackend.FLASH_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "math": SDPBackend.MATH,
    }
    return sdpa_kernel([names[backend]])


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], Any], device: torch.device, iters: int) -> list[float]:
    """Milliseconds per call: CUDA events on a GPU, wall clock on a CPU."""
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def measure(
    row: Row,
    fn: Callable[[], torch.Tensor],
    exact: torch.Tensor,
    flops: float,
    device: torch.device,
    iters: int,
) -> None:
    synchronize(device)
    t0 = time.perf_counter()
    out = fn()
    synchronize(device)
    row.first_call_s = time.perf_counter() - t0
    diff = (out.float() - exact).abs()
    row.max_abs_err, row.mean_abs_err = diff.max().item(), diff.mean().item()
    row.rel_l2 = (torch.linalg.vector_norm(out.float() - exact) / torch.linalg.vector_norm(exact)).item()
    del out, diff
    times = time_calls(fn, device, iters)
    row.median_ms, row.iters = statistics.median(times), len(times)
    row.tflops = flops / (row.median_ms * 1e-3) / 1e12


def write(path: Path, report: dict[str, Any]) -> None:
    from engine.files import atomic_write_bytes  # stdlib only

    rows = [asdict(r) if isinstance(r, Row) else r for r in report["contestants"]]
    atomic_write_bytes(path, (json.dumps({**report, "contestants": rows}, indent=2) + "\n").encode())


def table(rows: list[Row]) -> str:
    head = (
        f"{'contestant':<22}{'shape':<8}{'ms':>9}{'TFLOP/s':>9}{'first s':>9}{'max err':>10}{'rel L2':>10}"
        f"{'ref L2':>10}  status"
    )
    lines = [head, "-" * len(head)]
    for r in rows:

        def f(x: float | None, spec: str) -> str:
            return format(x, spec) if x is not None else format("-", ">" + spec.split(".")[0])

        lines.append(
            f"{r.name:<22}{r.shape:<8}{f(r.median_ms, '9.3f')}{f(r.tflops, '9.1f')}"
            f"{f(r.first_call_s, '9.2f')}{f(r.max_abs_err, '10.2e')}{f(r.rel_l2, '10.2e')}"
            f"{f(r.ref_rel_l2, '10.2e')}  {r.status}"
        )
    return "\n".join(lines)


def contestants(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> list[tuple[str, Callable[[], torch.Tensor], Callable[[], AbstractContextManager[Any]]]]:
    """(name, call, context to run it in): SDPA per backend, then our variants."""
    from engine.kernels import attention

    def sdpa() -> torch.Tensor:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    def ours(variant: str) -> Callable[[], torch.Tensor]:
        return lambda: attention(q, k, v, variant)

    on_cpu = q.device.type == "cpu"  # math is the CPU's only backend, and too slow to time on a GPU
    backends = [b for b in SDPA_BACKENDS if (b == "math") == on_cpu]
    return [(f"sdpa {b}", sdpa, lambda b=b: sdpa_context(b)) for b in backends] + [
        (f"triton {variant}", ours(variant), nullcontext) for variant in OURS
    ]


def bench_shape(shape_name: str, args: argparse.Namespace, report: dict[str, Any], start: float) -> None:
    """Every contestant at one shape; appends to report["contestants"] and rewrites the JSON after each."""
    from engine.kernels import exact_attention, reference_attention
    from engine.kernels.attention import interpreted
    from engine.kernels.quant import quantize_qkv
    from engine.kernels.variants import resolve_variant

    device = torch.device(args.device)
    iters = args.iters or (20 if device.type == "cuda" else 2)
    b, h, s, d = SHAPES[shape_name]
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(b, h, s, d, generator=g, device=device, dtype=torch.bfloat16) for _ in range(3))
    exact = exact_attention(q, k, v)  # fp32 SDPA on the same bf16 inputs
    flops = 4.0 * b * h * s * s * d
    for name, fn, context in contestants(q, k, v):
        row = Row(name, shape_name)
        report["contestants"].append(row)
        ours = name.startswith("triton ")
        if time.monotonic() - start > args.deadline_s * 0.9:
            row.status = "skipped: deadline"
        elif ours and device.type == "cpu" and not interpreted():
            row.status = "skipped: CPU needs TRITON_INTERPRET=1"
        else:
            try:
                with context():
                    measure(row, fn, exact, flops, device, iters)
                spec = resolve_variant(name.removeprefix("triton ")) if ours else None
                if spec is not None and spec.quantized:
                    prepass = time_calls(functools.partial(quantize_qkv, q, k, v, spec), device, iters)
                    row.prepass_ms = statistics.median(prepass)
                    ref = reference_attention(q, k, v, spec)
                    row.ref_rel_l2 = (
                        torch.linalg.vector_norm(ref - exact) / torch.linalg.vector_norm(exact)
                    ).item()
                    del ref
            except Exception as e:  # one contestant's failure (a compile error, OOM) must not end the run
                first = (str(e).splitlines() or [""])[0][:160]
                unavailable = not ours and "No available kernel" in str(e)  # a backend this GPU/build lacks
                row.status = f"skipped: {first}" if unavailable else f"error: {type(e).__name__}: {first}"
        write(args.out, report)
        logger.info("%s %s: %s", name, shape_name, row.status)


def run(args: argparse.Namespace) -> dict[str, Any]:
    import triton

    from engine.kernels.attention import interpreted

    start = time.monotonic()
    device = torch.device(args.device)
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "interpreter": interpreted(),
        "deadline_s": args.deadline_s,
        "shapes": {s: SHAPES[s] for s in args.shape},
        "flops": "4*B*H*S^2*D per call (QK^T and PV)",
        "contestants": [],
        "finished": False,
    }
    for shape_name in args.shape:
        bench_shape(shape_name, args, report, start)
    report["finished"] = True
    write(args.out, report)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/attention_bench.json"))
    parser.add_argument("--deadline-s", type=float, default=80.0, help="hard limit for the whole run")
    parser.add_argument(
        "--shape", action="append", choices=sorted(SHAPES), help="repeatable; default 1024, 0.25mp"
    )
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument(
        "--iters", type=int, default=0, help="timed calls per contestant (default 20 GPU, 2 CPU)"
    )
    args = parser.parse_args(argv)
    args.shape = args.shape or ["1024", "0.25mp"]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.device == "cpu":
        # A script may read its environment: the interpreter must be chosen before triton is first imported.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    elif not torch.cuda.is_available():
        print(
            "no CUDA device: run with --device cpu --shape tiny for the interpreter dry run", file=sys.stderr
        )
        return 2

    def on_alarm(_signum: int, _frame: object) -> None:
        raise DeadlineReached

    if hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGALRM, on_alarm)
        signal.setitimer(signal.ITIMER_REAL, args.deadline_s)
    try:
        report = run(args)
    except DeadlineReached:
        print(f"deadline of {args.deadline_s:.0f} s reached; partial results in {args.out}", file=sys.stderr)
        report = json.loads(args.out.read_text()) if args.out.exists() else {"contestants": []}
    finally:
        if hasattr(signal, "setitimer"):
            signal.setitimer(signal.ITIMER_REAL, 0)
    print(table([Row(**r) if isinstance(r, dict) else r for r in report["contestants"]]))
    return 0 if report.get("finished") else 1


if __name__ == "__main__":
    sys.exit(main())
