"""`kontext build | edit | bench | info`: the only place argv and the environment are read.

Every failure the user can fix is one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from .errors import ConfigError, KontextError

log = logging.getLogger("engine.cli")

DEFAULT_PROMPT = "add a small red hat"


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like 1024x768, got {text!r}") from None
    return w, h


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kontext", description="Build and run FLUX.1 Kontext [dev] fast.")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    sub = p.add_subparsers(dest="command", required=True)

    e = sub.add_parser("edit", help="edit an image from a text instruction")
    e.add_argument("image", nargs="?", help="input image (PNG, JPEG, WebP); default: the bundled sample")
    e.add_argument("prompt", nargs="?", default=DEFAULT_PROMPT, help="the edit instruction")
    e.add_argument("-o", "--output", type=Path, default=Path("build/edit.png"), help="output PNG")
    e.add_argument("--model", default="tiny", help="preset (tiny, small) or a local path to Kontext dev")
    e.add_argument(
        "--steps", type=int, default=None, help="denoising steps (default 28; 8 on synthetic presets)"
    )
    e.add_argument("--guidance", type=float, default=2.5, help="embedded guidance (default 2.5)")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--size", type=_size, default=None, help="output WxH; default: the input's bucket")
    e.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    e.add_argument("--no-progress", action="store_true", help="no progress bar")

    i = sub.add_parser("info", help="what this machine can run: torch, CUDA, TensorRT, ONNX Runtime, presets")
    i.add_argument("build_dir", nargs="?", type=Path, help="a build folder: show its manifest")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)]
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    _quiet_third_party(args.verbose)
    try:
        if args.command == "edit":
            return _edit(args)
        if args.command == "info":
            return _info(args)
    except KontextError as e:
        print(f"kontext {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"kontext {args.command}: interrupted", file=sys.stderr)
        return 130
    return 1


def _quiet_third_party(verbose: int) -> None:
    if verbose >= 2:
        return
    import warnings

    warnings.filterwarnings("ignore")
    for name in ("diffusers", "transformers", "torchao", "modelopt", "onnxruntime"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from diffusers.utils import logging as dlog
        from transformers.utils import logging as tlog

        dlog.set_verbosity_error()
        tlog.set_verbosity_error()
    except ImportError:
        pass


def _device(requested: str | None) -> str:
    import torch

    if requested is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(
            "--device cuda asked for, but torch sees no CUDA device (is this a CPU build of torch?)"
        )
    return requested


def _edit(args: argparse.Namespace) -> int:
    import torch

    from . import assets
    from .backends.torch import TorchDenoiser
    from .config import EditSettings
    from .images import load_image, save_png
    from .pipeline import KontextPipeline
    from .weights import load_components

    device = _device(args.device)
    synthetic = args.model in ("tiny", "small")
    steps = args.steps if args.steps is not None else (8 if synthetic else 28)
    settings = EditSettings(steps=steps, guidance=args.guidance, seed=args.seed, size=args.size)
    image_path = Path(args.image) if args.image else assets.sample_image_path()
    image = load_image(image_path)
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    comps = load_components(args.model, dtype=dtype, device=device)
    denoiser = TorchDenoiser(comps.transformer, name=f"torch-eager-{str(dtype).removeprefix('torch.')}")
    pipe = KontextPipeline(comps, denoiser, device=device, dtype=dtype)
    result = pipe.edit(image, args.prompt, settings, progress=not args.no_progress)
    metadata = {
        "prompt": args.prompt,
        "seed": str(settings.seed),
        "steps": str(settings.steps),
        "guidance": str(settings.guidance),
        "model": comps.source,
        "weights": comps.weights_id,
        "backend": denoiser.name,
        "size": f"{result.size[0]}x{result.size[1]}",
        "source_image": image_path.name,
    }
    save_png(result.image, args.output, metadata)
    print(
        f"wrote {args.output} ({result.size[0]}x{result.size[1]}, {settings.steps} steps, "
        f"{result.timings['total']:.2f}s, {denoiser.name})"
    )
    return 0


def _info(args: argparse.Namespace) -> int:
    from .info import machine_report

    print(machine_report(args.build_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
