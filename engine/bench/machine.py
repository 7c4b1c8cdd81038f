"""What the benchmark ran on: a device name and a folder-safe slug, library versions, and the dense
bf16 / FP8 tensor-core peaks of known GPUs (vendor datasheets, dense, no sparsity)."""

from __future__ import annotations

import importlib.metadata as md
import os
import platform
import re
from pathlib import Path

import torch

# name fragment (lower case) -> (bf16 TFLOP/s, fp8 TFLOP/s or None). The first match wins: specific first.
GPU_PEAK_TFLOPS: tuple[tuple[str, float, float | None], ...] = (
    ("h100 pcie", 756.0, 1513.0),
    ("h100 nvl", 835.0, 1671.0),
    ("h100", 989.0, 1979.0),  # SXM
    ("h200", 989.0, 1979.0),  # before "h20", its prefix
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
FP8_PRECISIONS = frozenset({"fp8", "int8"})  # int8 tensor-core peak = fp8 peak on Ada/Hopper


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_name(device: torch.device) -> str:
    """'NVIDIA H100 80GB HBM3' or 'Intel(R) Xeon(R) ... (2 cores)'."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{cpu_name()} ({cores} cores)"


def slug(text: str) -> str:
    """A folder name: lower case, [a-z0-9-] only."""
    s = re.sub(r"\((r|tm)\)", "", text.lower())
    return re.sub(r"[^a-z0-9]+", "-", s).strip("-") or "device"


def peak_tflops(device: torch.device, precision: str) -> float | None:
    """The dense tensor-core peak for `precision` on this GPU (bf16 peak for fp32/bf16/fp16), or None."""
    if device.type != "cuda":
        return None
    return peak_for_gpu(torch.cuda.get_device_name(device), precision)


def peak_for_gpu(name: str, precision: str) -> float | None:
    """GPU_PEAK_TFLOPS lookup by device name: fp8 peak for fp8/int8, bf16 peak otherwise; None if unknown."""
    lower = name.lower()
    for fragment, bf16, fp8 in GPU_PEAK_TFLOPS:
        if fragment in lower:
            return fp8 if precision in FP8_PRECISIONS else bf16
    return None


def library_versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for dist in ("diffusers", "transformers", "onnxruntime", "onnxruntime-gpu", "tensorrt", "torchao"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            continue
    return out
