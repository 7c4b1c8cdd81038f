"""The GPU script's start-up, in one process (one torch import): every import benchmarks/gpu_bench.sh
needs and the names the code calls in them, checked right after the wheels are installed and before
anything slow; then the versions, the results folder, the contestant names and the optional modules.

    python -m benchmarks.preflight                       # the imports only: exit 0, or 2 and what failed
    python -m benchmarks.preflight --device cuda --results-root R --day 2026-12-07 \\
        --contestants A,B --optional benchmarks.memory_phase

With --results-root it prints the versions (also into versions.txt) and makes the results folder,
R/<device slug>/<day>: the day is the script's start date, so a run crossing midnight keeps one folder.
--contestants: each name is resolved as `kontext bench` resolves it for --device (over the tiny
preset's modules: a name, not a measurement); the script drops the ones it refuses, with the reason.
--optional: a module that another part of the repository may not have yet (its file absent: "absent";
present but not importing: "broken"). The lines the script reads start with `results: `, `contestants: `,
`optional <module>: `.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import platform
import sys
import time
from pathlib import Path

# Third-party first (the image's and the wheels'), then ours: the modules each phase imports.
MODULES = (
    "torch",
    "torch.compiler",
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
    "benchmarks.results_check",
)
# The names the code calls in them (engine/backends/fp8.py, compile_cache.py, fp8_static.py, the baseline).
NAMES = {
    "torch": ("_scaled_mm", "float8_e4m3fn"),
    "torch.compiler": ("save_cache_artifacts", "load_cache_artifacts", "is_compiling"),
    "diffusers": ("FluxKontextPipeline", "FluxTransformer2DModel", "AutoencoderKL"),
    "torchao.quantization": ("Float8DynamicActivationFloat8WeightConfig", "PerRow", "quantize_"),
}


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


def versions(device: str) -> list[str]:
    """The lines of versions.txt: python, torch/CUDA and the device, the wheels' packages."""
    import importlib.metadata as md

    import torch

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    lines = [
        f"python {platform.python_version()}",
        f"torch {torch.__version__} cuda {torch.version.cuda} {gpu} (device {device})",
    ]
    for dist in ("triton", "diffusers", "torchao", "transformers", "numpy"):
        try:
            lines.append(f"{dist} {md.version(dist)}")
        except md.PackageNotFoundError:
            lines.append(f"{dist} not installed")
    return lines


def results_folder(root: Path, device: str, day: str) -> Path:
    """root/<device slug>/<day>: the folder every phase of one run writes into."""
    import torch

    from engine.bench.machine import device_name, slug

    return root / slug(device_name(torch.device(device))) / day


def refusals(names: list[str], device: str) -> dict[str, str]:
    """name -> why `kontext bench` refuses it, for each refused: resolved as the bench resolves it for
    `device`, over the tiny preset's modules on the CPU (parsing a name loads no weights of its own)."""
    import torch

    from engine.backends.torch import default_dtype
    from engine.bench.runner import select_contestants
    from engine.model.load import load_components

    components = load_components("tiny")
    dev, dtype = torch.device(device), default_dtype(device)
    out = {}
    for name in names:
        try:
            select_contestants((name,), components, dev, dtype, Path("build/tiny"), [])
        except Exception as e:  # a refusal is what this looks for; any other failure refuses it too
            out[name] = " ".join(f"{type(e).__name__}: {e}".split())[:300]
    return out


def optional(module: str) -> str:
    """'ok', 'absent' (no such file in this checkout) or 'broken: why' (there, but the import fails)."""
    if importlib.util.find_spec(module.rsplit(".", 1)[0]) is None or importlib.util.find_spec(module) is None:
        return "absent"
    try:
        importlib.import_module(module)
    except Exception as e:
        return f"broken: {type(e).__name__}: {e}"
    return "ok"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--results-root", type=Path, default=None)
    p.add_argument("--day", default=time.strftime("%Y-%m-%d"))
    p.add_argument("--contestants", default="")
    p.add_argument("--optional", action="append", default=[])
    args = p.parse_args(argv)
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
    if args.results_root is not None:
        folder = results_folder(args.results_root, args.device, args.day)
        folder.mkdir(parents=True, exist_ok=True)
        lines = versions(args.device)
        (folder / "versions.txt").write_text("\n".join(lines) + "\n")
        print("\n".join(lines))
        print(f"results: {folder}")
    names = [n.strip() for n in args.contestants.split(",") if n.strip()]
    if names:
        refused = refusals(names, args.device)
        for name, why in refused.items():
            print(f"refused {name}: {why}")
        print(f"contestants: {','.join(n for n in names if n not in refused)}")
    for module in args.optional:
        print(f"optional {module}: {optional(module)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
