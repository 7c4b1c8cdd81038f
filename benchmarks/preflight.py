"""Every import benchmarks/gpu_bench.sh needs, checked right after the wheels are installed and before
anything slow: a missing package (diffusers 0.42.1 needs `requests` at import) fails here in seconds
with the fix, not minutes later inside a phase.

    python -m benchmarks.preflight        # exit 0: all import; 2: what failed, one line each
"""

from __future__ import annotations

import importlib
import sys
import time

# Third-party first (the image's and the wheels'), then ours: the modules each phase imports.
MODULES = (
    "torch",
    "numpy",
    "PIL.Image",
    "safetensors.torch",
    "huggingface_hub",
    "transformers",
    "tqdm.auto",
    "requests",
    "diffusers",
    "torchao.quantization",
    "engine",
    "engine.cli",
    "engine.model.load",
    "engine.pipeline",
    "engine.bench",
    "engine.bench.sequential",
    "engine.backends.torch",
    "engine.backends.fp8",
    "engine.backends.torch_options",
    "engine.calibration",
    "engine.backends.cuda_graphs",
    "engine.backends.compile_cache",
    "benchmarks.cold_start",
    "benchmarks.attention_bench",
    "benchmarks.gpu_report",
)
NAMES = {"diffusers": ("FluxKontextPipeline", "FluxTransformer2DModel", "AutoencoderKL")}


def check(modules: tuple[str, ...] = MODULES) -> list[str]:
    """'module: ExceptionType: message' for each module that does not import (or lacks a needed name)."""
    failed = []
    for name in modules:
        try:
            mod = importlib.import_module(name)
            for attr in NAMES.get(name, ()):
                getattr(mod, attr)
        except Exception as e:  # any import-time failure is what this check is for
            failed.append(f"{name}: {type(e).__name__}: {e}")
    return failed


def main() -> int:
    t0 = time.perf_counter()
    failed = check()
    if failed:
        print(
            "preflight: these imports fail; add the missing package to GPU_WHEELS (make gpu-wheels):",
            file=sys.stderr,
        )
        for line in failed:
            print(f"  {line}", file=sys.stderr)
        return 2
    print(f"preflight: {len(MODULES)} modules import ({time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
