"""`kontext info`: what this machine can run (libraries, GPU, presets, buckets)."""

from __future__ import annotations

import importlib.metadata as md
import importlib.util
from pathlib import Path

from .buckets import FAMILIES, buckets, tokens
from .config import PRESETS


def _version(dist: str) -> str | None:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def gpu_summary() -> dict[str, str | None]:
    """torch build, CUDA device name and compute capability (None where absent)."""
    import torch

    out: dict[str, str | None] = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "gpu": None,
        "capability": None,
    }
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(0)
        major, minor = torch.cuda.get_device_capability(0)
        out["capability"] = f"{major}.{minor}"
    return out


def library_summary() -> dict[str, str | None]:
    """Versions of the optional libraries each backend or build stage needs (None: not installed)."""
    libs = {
        "diffusers": _version("diffusers"),
        "onnx": _version("onnx"),
        "onnxruntime": _version("onnxruntime") or _version("onnxruntime-gpu"),
        "nvidia-modelopt": _version("nvidia-modelopt"),
        "torchao": _version("torchao"),
        "tensorrt": None,
    }
    # Importing tensorrt is safe without a GPU (deserializing is not). Type stubs or tensorrt-lean
    # import too, without a Builder: only a full TensorRT counts.
    if importlib.util.find_spec("tensorrt") is not None:
        from .build.tensorrt_build import tensorrt_module

        trt = tensorrt_module()
        libs["tensorrt"] = (
            str(trt.__version__) if trt is not None else "present, but no Builder (stubs or lean)"
        )
    return libs


def machine_report(build_dir: Path | None = None) -> str:
    lines = ["machine:"]
    lines += [f"  {k:<16} {v or '-'}" for k, v in gpu_summary().items()]
    lines.append("libraries:")
    lines += [f"  {k:<16} {v or 'not installed'}" for k, v in library_summary().items()]
    lines.append("presets:")
    for p in PRESETS.values():
        t = p.transformer
        kind = "local path" if not p.synthetic else "synthetic (seeded random weights)"
        if p.init == "scaled":
            kind = "synthetic, built on the GPU (random weights: its images are noise)"
        lines.append(
            f"  {p.name:<12} hidden {t.hidden_size}, {t.num_layers}+{t.num_single_layers} blocks, "
            f"family {p.bucket_family}, {kind}"
        )
    lines.append("bucket families:")
    for f in FAMILIES:
        bs = buckets(f)
        toks = sorted({tokens(*b) for b in bs})
        lines.append(f"  {f:<7} {len(bs):>2} buckets, {len(toks)} token counts {toks[0]}..{toks[-1]}")
    if build_dir is not None:
        from .build.manifest import describe

        lines.append(describe(build_dir))
    return "\n".join(lines)
