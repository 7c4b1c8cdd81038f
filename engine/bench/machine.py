"""What the benchmark ran on: a device name and a folder-safe slug, library versions, and the dense
bf16 / FP8 tensor-core peaks of known GPUs (vendor datasheets, dense, no sparsity)."""

from __future__ import annotations

import importlib.metadata as md
import os
import platform
import re
from pathlib import Path

import torch

from ..flops import gpu_peaks

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
    """engine.flops.gpu_peaks by device name: fp8 peak for fp8/int8, bf16 peak otherwise; None if unknown."""
    bf16, fp8 = gpu_peaks(name)
    return fp8 if precision in FP8_PRECISIONS else bf16


def library_versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for dist in ("diffusers", "transformers", "onnxruntime", "onnxruntime-gpu", "tensorrt", "torchao"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            continue
    return out


CPU_BF16_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})  # /proc/cpuinfo flags of bf16 matmul hardware


def cpu_flags(cpuinfo: str | None = None) -> frozenset[str]:
    """The `flags` of the first CPU in /proc/cpuinfo (or of the given text); empty when unreadable."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return frozenset()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def cpu_has_bf16(flags: frozenset[str] | None = None) -> bool:
    """True when the CPU multiplies bf16 in hardware (AMX or AVX512-BF16): bf16 is then worth benching."""
    return bool(CPU_BF16_FLAGS & (cpu_flags() if flags is None else flags))
