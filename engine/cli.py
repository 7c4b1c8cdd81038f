"""`kontext build | edit | bench | info | serve | keys | loadtest`: the only place argv and the
environment are read.

Every failure the user can fix is one line on stderr and exit status 2, never a traceback. A request or
output flagged by the content filters is one line and exit status 3, with nothing written.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from .build.backend import BUILD_BACKENDS
from .config import DEFAULT_GUIDANCE, DEFAULT_PROMPT, DTYPES, LoadOptions
from .errors import ConfigError, KontextError, ModeratedError
from .manifest import PROFILE_MODES

if TYPE_CHECKING:
    from .bench import BenchConfig
    from .pipeline import EditResult
    from .provenance import ProvenanceSigner
    from .request import EditRequest
    from .runtime import KontextEngine
    from .safety import SafetyPolicy
    from .serve.settings import ServeSettings

log = logging.getLogger("engine.cli")

STEPS_HELP = "denoising steps (default: the model's, 8 on tiny and small, 28 on full and real weights)"


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like 1024x768, got {text!r}") from None
    return w, h


MODEL_HELP = (
    "preset (tiny, small, full: random weights, full is the real size on a GPU) or a local path: "
    "a diffusers folder of Kontext dev or BFL's .safetensors inside one"
)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kontext", description="Build and run FLUX.1 Kontext [dev] fast.")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    sub = p.add_subparsers(dest="command", required=True)

    e = sub.add_parser("edit", help="edit an image from a text instruction")
    e.add_argument("image", nargs="?", help="input image (PNG, JPEG, WebP); default: the bundled sample")
    e.add_argument("prompt", nargs="?", default=DEFAULT_PROMPT, help="the edit instruction")
    e.add_argument("-o", "--output", type=Path, default=Path("build/edit.png"), help="output .png or .jpg")
    e.add_argument("--model", default="tiny", help=MODEL_HELP)
    e.add_argument("--steps", type=int, default=None, help=STEPS_HELP)
    e.add_argument(
        "--guidance",
        type=float,
        default=DEFAULT_GUIDANCE,
        help=f"embedded guidance (default {DEFAULT_GUIDANCE})",
    )
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--size", type=_size, default=None, help="output WxH; default: the input's bucket")
    e.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    e.add_argument("--no-progress", action="store_true", help="no progress bar")
    e.add_argument("--engine", type=Path, default=None, help="a build folder: run its built artifacts")
    e.add_argument("--backend", default=None, help="with --engine: onnxruntime | tensorrt | torch")
    e.add_argument("--precision", default=None, help="with --engine: fp32 | int8 | fp8 | bf16")
    e.add_argument("--miss-policy", default="error", choices=("error", "torch"), help="unbuilt shapes")
    e.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads")
    _torch_path_flags(e)
    e.add_argument("--ref", action="append", default=[], metavar="IMG", help="a reference image (up to 3)")
    e.add_argument(
        "--then",
        action="append",
        default=[],
        metavar="PROMPT",
        help="edit the previous output again (repeatable): writes OUT-1.png, OUT-2.png, ...",
    )
    e.add_argument("--num-images", type=int, default=1, help="images per edit, seeds SEED, SEED+1, ...")
    e.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="PATH[:SCALE]",
        help="a LoRA (.safetensors, diffusers or kohya format) fused at load, at SCALE (default 1)",
    )
    e.add_argument(
        "--torch-mode", default="eager", help="torch backend: eager | compile | fp8 (FP8 needs cc >= 8.9)"
    )
    e.add_argument(
        "--levers",
        default="",
        help="torch levers, comma list: all (FP8 on every block Linear), static (calibrated FP8 scales), "
        "qkv (fused q|k|v), attn-VARIANT (our Triton attention: attn-bf16, attn-fp8-block...), "
        "graphs (CUDA graphs), dynamic (one dynamic-shape compile), vae (compiled VAE)",
    )
    e.add_argument(
        "--compile-cache",
        type=Path,
        default=None,
        help="folder of the persistent torch compile cache (e.g. build/full/compile-cache): read at load, "
        "written after the edits, so the next process skips the compiles",
    )
    _safety_flags(e)

    b = sub.add_parser("bench", help="time diffusers, torch and the built engines on the same edits")
    b.add_argument("--model", default="tiny", help=MODEL_HELP)
    b.add_argument("--steps", type=int, default=None, help=STEPS_HELP)
    b.add_argument("--repeats", type=int, default=3, help="timed rounds per bucket (default 3)")
    b.add_argument("--warmup", type=int, default=1, help="discarded rounds per bucket (default 1)")
    b.add_argument("--buckets", default=None, help="WxH,WxH,...; default: the square and two extreme aspects")
    b.add_argument(
        "--contestants",
        default=None,
        help="comma list of diffusers, torch-{eager|compile|fp8}[+lever...][+cache] (levers as in "
        "`kontext edit --levers`, e.g. torch-fp8+qkv+graphs), engines, or an artifact name "
        "(onnxruntime-int8); default: diffusers,torch-eager,engines (+compile, fp8 on a GPU)",
    )
    b.add_argument(
        "--schedule",
        default="interleaved",
        choices=("interleaved", "sequential"),
        help="interleaved rounds (all contestants loaded), or one contestant at a time (12B on a GPU)",
    )
    b.add_argument(
        "--deadline-s",
        type=float,
        default=None,
        help="sequential: seconds from this process's start (imports and the model build count); "
        "contestants that would end past it are skipped",
    )
    b.add_argument("--profile", default="", help="comma list of contestants whose one step is profiled")
    b.add_argument(
        "--context-parallel",
        type=int,
        default=1,
        metavar="N",
        help="also run each torch contestant split over N processes (+cpN), beside the one-process run",
    )
    b.add_argument("--build-dir", type=Path, default=None, help="the build to bench (default build/<model>)")
    b.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="results root folder")
    b.add_argument("--image", type=Path, default=None, help="input image (default: the bundled sample)")
    b.add_argument("--prompt", default=DEFAULT_PROMPT)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE)
    b.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    b.add_argument("--no-chart", action="store_true", help="skip the PNG chart")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")

    k = sub.add_parser("build", help="export, quantize, compile and verify the engine; write its manifest")
    k.add_argument("--model", default="tiny", help=MODEL_HELP)
    k.add_argument(
        "--precision",
        action="append",
        default=None,
        help="recipe(s): fp32, bf16, int8, fp8; repeat or comma list (default fp32,int8 on CPU)",
    )
    k.add_argument("--family", default=None, help="bucket family (default: the preset's, e.g. tiny)")
    k.add_argument("--backend", default="auto", choices=BUILD_BACKENDS)
    k.add_argument("--out", type=Path, default=None, help="build folder (default build/<model>)")
    k.add_argument("--force", action="store_true", help="rebuild every stage")
    k.add_argument("--opset", type=int, default=20)
    k.add_argument(
        "--profiles",
        default="dynamic",
        choices=PROFILE_MODES,
        help="TensorRT: one dynamic profile per family (one weight copy; default) or a static one per key",
    )
    k.add_argument("--opt-level", type=int, default=3, help="TensorRT builder optimization level (0-5)")
    k.add_argument("--workspace-gb", type=float, default=8.0, help="TensorRT workspace limit in GiB")
    k.add_argument("--calib-samples", type=int, default=32, help="calibration edits (image, instruction)")
    k.add_argument("--calib-steps", type=int, default=4, help="sampling steps per calibration edit")
    k.add_argument("--fp8-attention", action="store_true", help="fp8: quantize attention too (Hopper)")
    k.add_argument("--device", default=None, help="calibration's device (default: cuda, bf16; else cpu)")
    k.add_argument(
        "--refs",
        type=_int_list,
        default=(0,),
        metavar="N[,N]",
        help="reference-image counts to serve, e.g. 0,1 (default 0: the input image alone)",
    )
    k.add_argument(
        "--batch",
        type=_int_list,
        default=(1,),
        metavar="B[,B]",
        help="batch sizes to serve (images per denoiser call), e.g. 1,2,4 (default 1)",
    )
    k.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="PATH[:SCALE]",
        help="fuse a LoRA (safetensors) into the weights before export; repeatable; load with the same",
    )
    k.add_argument("--no-progress", action="store_true", help="no progress bar")

    i = sub.add_parser("info", help="what this machine can run: torch, CUDA, TensorRT, ONNX Runtime, presets")
    i.add_argument("build_dir", nargs="?", type=Path, help="a build folder: show its manifest")

    _serve_parsers(sub)
    return p


def _safety_flags(e: argparse.ArgumentParser, *, files: bool = True) -> None:
    """The licence duties: content filters or review, C2PA provenance, AI disclosure (README).
    files: the flags about written files (review folder, prompt in the file), which a server has not."""
    g = e.add_argument_group("safety and provenance")
    g.add_argument(
        "--safety",
        default=None,
        help="comma list of pixtral, nsfw, blocklist, review, or off; default: review for the real model, "
        "off for the random-weight presets",
    )
    g.add_argument("--safety-models", type=Path, default=None, help="folder of the filter models (README)")
    g.add_argument("--safety-device", default="cpu", help="where the filter models run (default cpu)")
    g.add_argument("--blocklist", type=Path, default=None, help="prompt terms to refuse, one per line")
    if files:
        g.add_argument(
            "--review-dir", type=Path, default=None, help="held outputs (default: review/ beside -o)"
        )
    g.add_argument("--c2pa-cert", type=Path, default=None, help="PEM certificate chain: C2PA-sign the output")
    g.add_argument("--c2pa-key", type=Path, default=None, help="PEM private key of the certificate")
    g.add_argument(
        "--c2pa-alg", default="es256", choices=("es256", "ps256"), help="signature (default es256)"
    )
    g.add_argument("--c2pa-tsa", default=None, help="timestamp authority URL (default none: offline)")
    if files:
        g.add_argument("--no-prompt-metadata", action="store_true", help="leave the prompt out of the file")


def _serve_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`kontext serve`, `kontext keys new`, `kontext loadtest`."""
    s = sub.add_parser("serve", help="serve BFL's HTTP API (submit, poll, fetch) over the engine")
    src = s.add_mutually_exclusive_group()
    src.add_argument("--model", default=None, help="preset (tiny, small) or a local path (default tiny)")
    src.add_argument("--engine", type=Path, default=None, help="a build folder: serve its built artifacts")
    s.add_argument("--precision", default=None, help="with --engine: fp32 | int8 | fp8 | bf16")
    s.add_argument("--backend", default=None, help="with --engine: onnxruntime | tensorrt | torch")
    s.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    s.add_argument("--miss-policy", default="error", choices=("error", "torch"), help="unbuilt shapes")
    _torch_path_flags(s)
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--workers", type=int, default=1, help="edits run at once (engine workers)")
    s.add_argument("--queue", type=int, default=24, help="tasks in flight (queued + running) before 429")
    s.add_argument("--per-key", type=int, default=None, help="tasks in flight per API key (default: --queue)")
    auth = s.add_mutually_exclusive_group()
    auth.add_argument("--keys", type=Path, default=None, help="API keys file (`kontext keys new --file`)")
    auth.add_argument("--no-auth", action="store_true", help="no API keys (loopback hosts only)")
    s.add_argument("--data", type=Path, default=Path("build/serve"), help="job store and results")
    s.add_argument("--result-ttl", type=float, default=600.0, help="seconds results and sample URLs live")
    s.add_argument("--steps", type=int, default=None, help=f"default {STEPS_HELP}")
    s.add_argument("--max-body-mb", type=float, default=48.0, help="request body limit in MiB")
    s.add_argument("--drain-timeout", type=float, default=60.0, help="SIGTERM: seconds to finish jobs")
    s.add_argument("--public-url", default=None, help="base of polling/sample URLs (behind a proxy)")
    s.add_argument("--allow-urls", action="store_true", help="fetch http(s) input_image URLs")
    s.add_argument("--allow-webhooks", action="store_true", help="call webhook_url when a task ends")
    s.add_argument("--review", action="store_true", help="hold every result until an admin approves it")
    _safety_flags(s, files=False)
    s.add_argument("--ray", action="store_true", help="run as a Ray Serve application")
    s.add_argument("--replicas", type=int, default=1, help="--ray: engine replicas")
    s.add_argument("--max-replicas", type=int, default=None, help="--ray: autoscale from 1 up to this")
    s.add_argument("--gpus-per-replica", type=float, default=None, help="--ray: default 1 with CUDA, else 0")
    s.add_argument("--address", default=None, help="--ray: a Ray cluster (default: start a local one)")

    k = sub.add_parser("keys", help="manage the server's API keys")
    ksub = k.add_subparsers(dest="keys_command", required=True)
    kn = ksub.add_parser("new", help="print a new key once; append only its hash to FILE")
    kn.add_argument("--file", type=Path, required=True)
    kn.add_argument("--name", default="", help="a label for the key (who holds it)")
    kn.add_argument("--admin", action="store_true", help="may approve and reject held results")

    lt = sub.add_parser("loadtest", help="load-test a running server; table + JSON under benchmarks/results")
    lt.add_argument("url", help="the server's base URL, e.g. http://127.0.0.1:8000")
    lt.add_argument("--key", default=None, help="X-Key to send (default: the KONTEXT_KEY variable)")
    lt.add_argument("--image", type=Path, default=None, help="input image (default: the bundled sample)")
    lt.add_argument("--steps", type=int, default=2, help="steps per edit")
    lt.add_argument("--queue", type=int, default=24, help="the server's --queue (sets the overload step)")
    lt.add_argument("--requests", type=int, default=8, help="requests per closed-loop level")
    lt.add_argument("--soak", type=int, default=200, help="requests in the soak")
    lt.add_argument("--open-seconds", type=float, default=20.0, help="seconds per open-loop rate")
    lt.add_argument("--pid", type=int, default=None, help="the server's process id, for its RSS slope")
    lt.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="results root folder")


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
        if args.command == "serve":
            return _serve(args)
        if args.command == "keys":
            return _keys(args)
        if args.command == "loadtest":
            return _loadtest(args)
    except ModeratedError as e:
        print(f"kontext {args.command}: {e}; nothing was written", file=sys.stderr)
        return 3
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
        tlog.disable_progress_bar()  # "Loading weights" bars of the filter models
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


def _torch_path_flags(p: argparse.ArgumentParser) -> None:
    """The torch path's weights dtype and context parallelism (kontext edit and serve)."""
    p.add_argument(
        "--dtype", default=None, choices=DTYPES, help="torch weights (default: bf16 on CUDA, fp32 on a CPU)"
    )
    p.add_argument(
        "--context-parallel",
        type=int,
        default=1,
        metavar="N",
        help="split each transformer forward over N processes (torch path; N GPUs on CUDA; default 1)",
    )


def _edit(args: argparse.Namespace) -> int:
    """`kontext edit`: a preset or weights path (torch eager), or `--engine build/...` (its artifacts),
    both through the runtime API that servers embed. --then chains edits through a session; --num-images
    and --then write OUT-1.png, OUT-2.png, ..."""

    from .assets import sample_image_path
    from .backends.torch_options import check_options, parse_levers
    from .images import output_format
    from .model.lora import LoraSpec
    from .runtime import load

    # Validate the request, the images, the filters and the signer before loading a model (a minute).
    if args.then and args.num_images != 1:
        raise ConfigError("--then edits one image per turn: drop --num-images, or run the turns separately")
    output_format(args.output)
    image_path = Path(args.image) if args.image else sample_image_path()
    request = _edit_request(args, image_path)
    loras = [LoraSpec.parse(text) for text in args.lora]
    torch_options = replace(parse_levers(args.levers), compile_cache=args.compile_cache)
    check_options(args.torch_mode, torch_options)
    policy, signer = _safety(args)
    source = args.engine if args.engine is not None else args.model
    options = LoadOptions(
        backend=args.backend,
        precision=args.precision,
        device=_device(args.device),
        miss_policy=args.miss_policy,
        threads=args.threads,
        torch_mode=args.torch_mode,
        dtype=args.dtype,
        context_parallel=args.context_parallel,
    )
    progress = not args.no_progress
    with load(
        source, options=options, safety=policy, signer=signer, torch_options=torch_options, loras=loras
    ) as kontext:
        extra = {  # recorded in every output's metadata
            "references": ",".join(Path(r).name for r in args.ref) or None,
            "loras": ",".join(f"{spec.path.name}:{spec.scale:g}" for spec in loras) or None,
        }
        if args.then:  # a session: each turn edits the previous turn's output
            session = kontext.session(image_path)
            previous: Path = image_path
            for turn, prompt in enumerate([args.prompt, *args.then], start=1):
                result = session.edit(replace(request, prompt=prompt), progress=progress)
                path = _numbered(args.output, turn)
                _save(kontext, result, 0, path, previous, args, extra)
                previous = path
            _save_compile_cache(kontext)
            return 0
        result = kontext.edit(request, progress=progress)
        for i in range(len(result.images)):
            path = args.output if args.num_images == 1 else _numbered(args.output, i + 1)
            _save(kontext, result, i, path, image_path, args, extra)
        _save_compile_cache(kontext)
    return 0


def _save_compile_cache(kontext: KontextEngine) -> None:
    """After the edits (everything compiled by now): write the torch compile cache, if one was named."""
    from .backends.torch import TorchDenoiser

    primary = kontext.dispatcher.primary
    if isinstance(primary, TorchDenoiser) and (saved := primary.save_compile_cache()) is not None:
        log.info("compile cache written to %s", saved)


def _edit_request(args: argparse.Namespace, image: Path) -> EditRequest:
    """The EditRequest of `kontext edit`'s flags: steps None stays None (the engine's default_steps)."""
    from .request import EditRequest

    return EditRequest.of(
        image,
        args.prompt,
        references=[Path(r) for r in args.ref],
        steps=args.steps,
        guidance=args.guidance,
        seed=args.seed,
        size=args.size,
        num_images=args.num_images,
    )


def _numbered(output: Path, n: int) -> Path:
    """out.png -> out-1.png, out-2.png, ..."""
    return output.with_name(f"{output.stem}-{n}{output.suffix}")


def _save(
    kontext: KontextEngine,
    result: EditResult,
    index: int,
    path: Path,
    source: Path,
    args: argparse.Namespace,
    extra: dict[str, str | None],
) -> None:
    """Write image `index` of `result` through the engine (metadata, C2PA, review hold), and say where."""
    saved = kontext.outputs.save(
        result,
        path,
        index=index,
        source=source,
        include_prompt=not args.no_prompt_metadata,
        review_dir=args.review_dir,
        extra=extra,
    )
    what = f"{result.size[0]}x{result.size[1]}, {len(result.step_times)} steps, " + (
        f"{result.timings['total']:.2f}s, {result.backend}" + (", C2PA-signed" if saved.signed else "")
    )
    if saved.held:
        print(
            f"held for review: {saved.path} ({what}); a person must approve it before it is shared: "
            f"move it to {path}"
        )
    else:
        print(f"wrote {saved.path} ({what})")


def _safety(args: argparse.Namespace) -> tuple[SafetyPolicy | None, ProvenanceSigner | None]:
    """The --safety policy (None: the model's default) and the C2PA signer (None: no certificate)."""
    from .provenance import ProvenanceSigner
    from .safety import build_policy

    policy = None
    if args.safety is not None:
        policy = build_policy(
            args.safety,
            models_dir=args.safety_models,
            blocklist=args.blocklist,
            device=_device(args.safety_device),
        )
    elif args.blocklist is not None or args.safety_models is not None:
        raise ConfigError(
            "--blocklist and --safety-models take effect with --safety (e.g. --safety nsfw,blocklist)"
        )
    if (args.c2pa_cert is None) != (args.c2pa_key is None):
        raise ConfigError("C2PA signing needs both --c2pa-cert and --c2pa-key")
    signer = None
    if args.c2pa_cert is not None:
        signer = ProvenanceSigner.from_files(
            args.c2pa_cert, args.c2pa_key, alg=args.c2pa_alg, tsa_url=args.c2pa_tsa
        )
    return policy, signer


def _int_list(text: str) -> tuple[int, ...]:
    """ "0,1" -> (0, 1), for --refs and --batch."""
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas, got {text!r}") from None


def _build(args: argparse.Namespace) -> int:
    from .build.builder import BuildOptions, build
    from .build.tensorrt_build import TensorRTOptions
    from .calibration import CalibrationSpec
    from .model.lora import LoraSpec

    if args.verbose == 0:
        logging.getLogger("engine.build").setLevel(logging.INFO)  # one line per stage
    precisions = tuple(p.strip() for v in (args.precision or []) for p in v.split(",") if p.strip()) or None
    options = BuildOptions(
        opset=args.opset,
        calibration=CalibrationSpec(edits=args.calib_samples, steps=args.calib_steps),
        tensorrt=TensorRTOptions(
            profiles=args.profiles, opt_level=args.opt_level, workspace_gb=args.workspace_gb
        ),
        fp8_attention=args.fp8_attention,
        device=args.device,
        progress=not args.no_progress,
        refs=args.refs,
        batches=args.batch,
        loras=tuple(LoraSpec.parse(text) for text in args.lora),
    )
    m = build(
        args.model,
        out_dir=args.out,
        precisions=precisions,
        family=args.family,
        backend=args.backend,
        force=args.force,
        options=options,
    )
    for a in m.artifacts:
        worst = max((v.rel_l2 for v in a.verification.values()), default=0.0)
        mode = f", {a.profile_mode} profiles" if a.backend == "tensorrt" else ""
        keys = f"{len(a.profiles)} shape keys{mode}"
        print(f"{a.precision}: {a.path} ({a.backend}, {keys}, worst rel L2 {worst:.2e})")
    return 0


def _info(args: argparse.Namespace) -> int:
    from .info import machine_report

    print(machine_report(args.build_dir))
    if args.build_dir is not None:
        from .info import build_report

        print(build_report(args.build_dir))
    return 0


def _bench(args: argparse.Namespace) -> int:
    from .bench import BenchRun, run_bench, write_results

    config = _bench_config(args)

    def save(run: BenchRun) -> None:  # after each contestant: a killed run still leaves results
        write_results(run, args.out, chart=False)

    table, files = write_results(run_bench(config, on_progress=save), args.out, chart=not args.no_chart)
    print(table)
    written = [files.jsonl, files.table, files.chart, files.profile]
    print("\nwrote " + ", ".join(str(p) for p in written if p is not None))
    return 0


def _bench_config(args: argparse.Namespace) -> BenchConfig:
    """BenchConfig of `kontext bench`'s flags; steps: the model's default (runtime.default_steps)."""
    from .bench import BenchConfig
    from .runtime import default_steps

    def names(text: str | None) -> tuple[str, ...] | None:
        return None if text is None else tuple(n.strip() for n in text.split(",") if n.strip())

    try:
        bucket_list = None if args.buckets is None else tuple(_size(s) for s in names(args.buckets) or ())
    except argparse.ArgumentTypeError as e:
        raise ConfigError(f"--buckets: {e}") from None
    return BenchConfig(
        model=args.model,
        steps=args.steps if args.steps is not None else default_steps(args.model),
        repeats=args.repeats,
        warmup=args.warmup,
        buckets=bucket_list or None,
        contestants=_with_context_parallel(
            names(args.contestants), args.context_parallel, _device(args.device)
        ),
        build_dir=args.build_dir,
        device=_device(args.device),
        prompt=args.prompt,
        image=args.image,
        seed=args.seed,
        guidance=args.guidance,
        progress=not args.no_progress,
        schedule=args.schedule,
        deadline_s=args.deadline_s,
        profile=names(args.profile) or (),
    )


def _with_context_parallel(
    chosen: tuple[str, ...] | None, n: int, device: str | None
) -> tuple[str, ...] | None:
    """The bench's contestants plus a +cpN twin of each torch one, timed side by side (n > 1)."""
    if n == 1:
        return chosen
    if n < 1:
        raise ConfigError(f"--context-parallel must be 1 (off) or more processes, got {n}")
    import torch

    from .bench.runner import default_contestants

    base = chosen or default_contestants(
        torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    )
    return (*base, *(f"{c}+cp{n}" for c in base if c.startswith("torch-")))


def _serve(args: argparse.Namespace) -> int:
    """`kontext serve`: the engine loads (and warms up) in the background; /readyz turns 200 after."""
    from .serve.keys import KeyRing

    if args.keys is None and not args.no_auth:
        raise ConfigError(
            "kontext serve needs --keys FILE (from `kontext keys new --file FILE`) or --no-auth"
        )
    source = _serve_source(args)
    settings = _serve_settings(args)
    keys = KeyRing.load(args.keys) if args.keys is not None else None
    device = _device(args.device)
    policy, signer = _safety(args)
    if args.verbose == 0:
        logging.getLogger("engine.serve").setLevel(logging.INFO)  # recoveries, drains, reaps
    load_options = LoadOptions(
        backend=args.backend,
        precision=args.precision,
        device=device,
        miss_policy=args.miss_policy,
        dtype=args.dtype,
        context_parallel=args.context_parallel,
    )
    if args.ray:
        from .serve.ray_app import RayOptions, run_ray

        if args.context_parallel > 1:
            raise ConfigError("--context-parallel runs in the local server: drop --ray or --context-parallel")

        gpus = (
            args.gpus_per_replica if args.gpus_per_replica is not None else (1.0 if device == "cuda" else 0.0)
        )
        options = RayOptions(
            replicas=args.replicas,
            max_replicas=args.max_replicas,
            gpus_per_replica=gpus,
            address=args.address,
        )
        if policy is not None and policy.names not in ((), ("off",), ("review",)):
            raise ConfigError(
                "kontext serve --ray takes --safety off or review; filters with models run in "
                "the local server (kontext serve without --ray) for now"
            )
        if signer is not None:
            raise ConfigError("kontext serve --ray does not sign outputs yet; drop --c2pa-cert/--c2pa-key")
        safety = policy.names[0] if policy is not None and policy.names else None
        return run_ray(settings, str(source), load_options, options, keys, safety=safety)

    from .serve.editor import LocalEditor
    from .serve.server import run

    def editor() -> LocalEditor:
        from .runtime import load

        kontext = load(
            source, options=replace(load_options, workers=settings.workers), safety=policy, signer=signer
        )
        kontext.warmup()
        return LocalEditor(kontext)

    print(
        f"kontext serve: http://{settings.host}:{settings.port} (engine loading; /readyz turns 200 when warm)"
    )
    return run(settings, editor, keys)


def _serve_source(args: argparse.Namespace) -> str | Path:
    """What `kontext serve` loads: --engine, else --model (default tiny)."""
    return args.engine if args.engine is not None else (args.model or "tiny")


def _serve_settings(args: argparse.Namespace) -> ServeSettings:
    """ServeSettings of `kontext serve`'s flags; default steps: the model's (runtime.default_steps),
    the same value `kontext edit` runs for the same --model or --engine."""
    from .runtime import default_steps
    from .serve.settings import ServeSettings

    return ServeSettings(
        data=args.data,
        host=args.host,
        port=args.port,
        workers=args.workers,
        queue=args.queue,
        per_key=args.per_key,
        keys_file=args.keys,
        result_ttl=args.result_ttl,
        max_body_bytes=int(args.max_body_mb * 1024 * 1024),
        allow_urls=args.allow_urls,
        allow_webhooks=args.allow_webhooks,
        review=args.review,
        drain_timeout=args.drain_timeout,
        public_url=args.public_url,
        default_steps=args.steps if args.steps is not None else default_steps(_serve_source(args)),
    )


def _keys(args: argparse.Namespace) -> int:
    from .serve.keys import new_key

    key = new_key(args.file, args.name, admin=args.admin)
    print(key)
    print(f"(shown once; its SHA-256 was appended to {args.file})", file=sys.stderr)
    return 0


def _loadtest(args: argparse.Namespace) -> int:
    import os

    from .assets import sample_image_path
    from .bench.loadtest import LoadConfig, run_loadtest, write_report

    image = args.image or sample_image_path()
    config = LoadConfig(
        url=args.url,
        key=args.key or os.environ.get("KONTEXT_KEY"),
        image=image.read_bytes(),
        steps=args.steps,
        queue=args.queue,
        requests=args.requests,
        soak=args.soak,
        open_seconds=args.open_seconds,
        pid=args.pid,
    )
    report = run_loadtest(config)
    table, files = write_report(report, args.out)
    print(table)
    print(f"\nwrote {', '.join(str(f) for f in files)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
