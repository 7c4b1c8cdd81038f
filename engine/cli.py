"""`kontext build | edit | bench | info`: the only place argv and the environment are read.

Every failure the user can fix is one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import ConfigError, KontextError

if TYPE_CHECKING:
    from PIL import Image

    from .pipeline import EditResult

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
    e.add_argument("--engine", type=Path, default=None, help="a build folder: run its built artifacts")
    e.add_argument("--backend", default=None, help="with --engine: onnxruntime | tensorrt | torch")
    e.add_argument("--precision", default=None, help="with --engine: fp32 | int8 | fp8 | bf16")
    e.add_argument("--miss-policy", default="error", choices=("error", "torch"), help="unbuilt shapes")
    e.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads")
    e.add_argument("--ref", action="append", default=[], metavar="IMG", help="a reference image (up to 3)")
    e.add_argument(
        "--then", action="append", default=[], metavar="PROMPT",
        help="edit the previous output again (repeatable): writes OUT-1.png, OUT-2.png, ...",
    )  # fmt: skip
    e.add_argument("--num-images", type=int, default=1, help="images per edit, seeds SEED, SEED+1, ...")
    e.add_argument(
        "--lora", action="append", default=[], metavar="PATH[:SCALE]",
        help="a LoRA (.safetensors, diffusers or kohya format) fused at load, at SCALE (default 1)",
    )  # fmt: skip

    b = sub.add_parser("bench", help="time diffusers, torch and the built engines on the same edits")
    b.add_argument("--model", default="tiny", help="preset (tiny, small) or a local path to Kontext dev")
    b.add_argument("--steps", type=int, default=None, help="denoising steps (default 4 synthetic, 28 real)")
    b.add_argument("--repeats", type=int, default=3, help="timed rounds per bucket (default 3)")
    b.add_argument("--warmup", type=int, default=1, help="discarded rounds per bucket (default 1)")
    b.add_argument("--buckets", default=None, help="WxH,WxH,...; default: the square and two extreme aspects")
    b.add_argument(
        "--contestants",
        default=None,
        help="comma list of diffusers, torch-eager, torch-compile, torch-fp8, engines, or an artifact "
        "name (onnxruntime-int8); default: diffusers,torch-eager,engines (+compile, fp8 on a GPU)",
    )
    b.add_argument("--build-dir", type=Path, default=None, help="the build to bench (default build/<model>)")
    b.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="results root folder")
    b.add_argument("--image", type=Path, default=None, help="input image (default: the bundled sample)")
    b.add_argument("--prompt", default=DEFAULT_PROMPT)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--guidance", type=float, default=2.5)
    b.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    b.add_argument("--no-chart", action="store_true", help="skip the PNG chart")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")

    k = sub.add_parser("build", help="export, quantize, compile and verify the engine; write its manifest")
    k.add_argument("--model", default="tiny", help="preset (tiny, small) or a local path to Kontext dev")
    k.add_argument(
        "--precision",
        action="append",
        default=None,
        help="recipe(s): fp32, bf16, int8, fp8; repeat or comma list (default fp32,int8 on CPU)",
    )
    k.add_argument("--family", default=None, help="bucket family (default: the preset's, e.g. tiny)")
    k.add_argument("--backend", default="auto", choices=("auto", "tensorrt", "onnxruntime"))
    k.add_argument("--out", type=Path, default=None, help="build folder (default build/<model>)")
    k.add_argument("--force", action="store_true", help="rebuild every stage")
    k.add_argument("--opset", type=int, default=20)
    k.add_argument("--opt-level", type=int, default=3, help="TensorRT builder optimization level (0-5)")
    k.add_argument("--workspace-gb", type=float, default=8.0, help="TensorRT workspace limit in GiB")
    k.add_argument("--calib-samples", type=int, default=32, help="calibration edits (image, instruction)")
    k.add_argument("--calib-steps", type=int, default=4, help="sampling steps per calibration edit")
    k.add_argument("--fp8-attention", action="store_true", help="fp8: quantize attention too (Hopper)")
    k.add_argument("--device", default="cpu", help="where calibration runs the torch transformer")
    k.add_argument("--no-progress", action="store_true", help="no progress bar")

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
        if args.command == "build":
            return _build(args)
        if args.command == "bench":
            return _bench(args)
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
    import torch  # noqa: F401  (importing torch resets its loggers' levels: import it before setting them)

    for name in ("diffusers", "transformers", "torchao", "modelopt", "onnxruntime", "torch"):
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
    """`kontext edit`: a preset or weights path (torch eager), or `--engine build/...` (its artifacts),
    both through the runtime API that servers embed. --then chains edits through a session; --num-images
    and --then write OUT-1.png, OUT-2.png, ..."""
    from . import assets
    from .config import EditSettings
    from .images import load_image
    from .lora import LoraSpec
    from .runtime import load

    # Validate the knobs and the images before loading a model (which can take a minute).
    if args.steps is not None:
        EditSettings(steps=args.steps, guidance=args.guidance, seed=args.seed, size=args.size)
    if args.then and args.num_images != 1:
        raise ConfigError("--then edits one image per turn: drop --num-images, or run the turns separately")
    if not 1 <= args.num_images <= 64:
        raise ConfigError(f"--num-images must be between 1 and 64, got {args.num_images}")
    image_path = Path(args.image) if args.image else assets.sample_image_path()
    image = load_image(image_path)
    refs = [load_image(Path(r)) for r in args.ref]
    loras = [LoraSpec.parse(text) for text in args.lora]
    source = args.engine if args.engine is not None else args.model
    with load(source, backend=args.backend, precision=args.precision, device=_device(args.device),
              miss_policy=args.miss_policy, threads=args.threads, loras=loras) as kontext:  # fmt: skip
        c = kontext.components
        steps = args.steps if args.steps is not None else c.preset.default_steps
        common = {
            "steps": str(steps),
            "guidance": str(args.guidance),
            "model": c.source,
            "weights": c.weights_id,
        }
        if args.engine is not None:
            common["engine"] = str(args.engine)
        if args.ref:
            common["references"] = ",".join(Path(r).name for r in args.ref)
        if loras:
            common["loras"] = ",".join(f"{spec.path.name}:{spec.scale:g}" for spec in loras)
        knobs = {"seed": args.seed, "steps": args.steps, "guidance": args.guidance, "size": args.size,
                 "references": refs, "progress": not args.no_progress}  # fmt: skip
        if args.then:  # a session: each turn edits the previous turn's output
            session = kontext.session(image)
            previous = image_path.name
            for turn, prompt in enumerate([args.prompt, *args.then], start=1):
                result = session.edit(prompt, **knobs)
                path = _numbered(args.output, turn)
                _write(result.image, path, result, prompt, args.seed, {**common, "source_image": previous})
                previous = path.name
            return 0
        result = kontext.edit(image, args.prompt, num_images=args.num_images, **knobs)
        common["source_image"] = image_path.name
        for i, (img, seed) in enumerate(zip(result.images, result.seeds, strict=True), start=1):
            path = args.output if args.num_images == 1 else _numbered(args.output, i)
            _write(img, path, result, args.prompt, seed, common)
    return 0


def _numbered(output: Path, n: int) -> Path:
    """out.png -> out-1.png, out-2.png, ..."""
    return output.with_name(f"{output.stem}-{n}{output.suffix}")


def _write(
    image: Image.Image, path: Path, result: EditResult, prompt: str, seed: int, common: dict[str, str]
) -> None:
    """Save one output PNG with what made it in its metadata, and say so."""
    from .images import save_png

    steps = common["steps"]
    w, h = result.size
    metadata = {"prompt": prompt, "seed": str(seed), **common,
                "backend": result.backend, "size": f"{w}x{h}"}  # fmt: skip
    save_png(image, path, metadata)
    print(f"wrote {path} ({w}x{h}, {steps} steps, {result.timings['total']:.2f}s, {result.backend})")


def _build(args: argparse.Namespace) -> int:
    from .build.builder import BuildOptions, build
    from .build.calibrate import CalibrationSpec
    from .build.tensorrt_build import TensorRTOptions

    if args.verbose == 0:
        logging.getLogger("engine.build").setLevel(logging.INFO)  # one line per stage
    precisions = tuple(p.strip() for v in (args.precision or []) for p in v.split(",") if p.strip()) or None
    options = BuildOptions(
        opset=args.opset,
        calibration=CalibrationSpec(edits=args.calib_samples, steps=args.calib_steps),
        tensorrt=TensorRTOptions(opt_level=args.opt_level, workspace_gb=args.workspace_gb),
        fp8_attention=args.fp8_attention,
        device=args.device,
        progress=not args.no_progress,
    )
    m = build(args.model, args.out, precisions, args.family, args.backend, args.force, options)
    for a in m.artifacts:
        worst = max((v.rel_l2 for v in a.verification.values()), default=0.0)
        keys = len(a.profiles)
        print(f"{a.precision}: {a.path} ({a.backend}, {keys} shape keys, worst rel L2 {worst:.2e})")
    return 0


def _info(args: argparse.Namespace) -> int:
    from .info import machine_report

    print(machine_report(args.build_dir))
    if args.build_dir is not None:
        from .runtime import build_report

        print(build_report(args.build_dir))
    return 0


def _bench(args: argparse.Namespace) -> int:
    from .bench import BenchConfig, run_bench, write_results

    def names(text: str | None) -> tuple[str, ...] | None:
        return None if text is None else tuple(n.strip() for n in text.split(",") if n.strip())

    try:
        bucket_list = None if args.buckets is None else tuple(_size(s) for s in names(args.buckets) or ())
    except argparse.ArgumentTypeError as e:
        raise ConfigError(f"--buckets: {e}") from None
    synthetic = args.model in ("tiny", "small")
    config = BenchConfig(
        model=args.model,
        steps=args.steps if args.steps is not None else (4 if synthetic else 28),
        repeats=args.repeats,
        warmup=args.warmup,
        buckets=bucket_list or None,
        contestants=names(args.contestants),
        build_dir=args.build_dir,
        device=_device(args.device),
        prompt=args.prompt,
        image=args.image,
        seed=args.seed,
        guidance=args.guidance,
        progress=not args.no_progress,
    )
    table, files = write_results(run_bench(config), args.out, chart=not args.no_chart)
    print(table)
    print(f"\nwrote {files.jsonl}, {files.table}" + (f", {files.chart}" if files.chart else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
