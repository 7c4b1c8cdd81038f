"""The argparse parser of `kontext`: every subcommand's flags and the flag helpers they share.
Nothing here runs a command or reads the environment; engine/cli/__init__.py dispatches what this parses."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..builder.backend import BUILD_BACKENDS
from ..config import DEFAULT_GUIDANCE, DEFAULT_PROMPT, DTYPES
from ..manifest import PROFILE_MODES

STEPS_HELP = "denoising steps (default: the model's, 8 on tiny and small, 28 on full and real weights)"


def parse_size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like 1024x768, got {text!r}") from None
    return w, h


MODEL_HELP = (
    "preset (tiny, small, full: random weights, full is the real size on a GPU) or a local path: "
    "a diffusers folder of Kontext dev or BFL's .safetensors inside one"
)


def build_parser() -> argparse.ArgumentParser:
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
    e.add_argument("--size", type=parse_size, default=None, help="output WxH; default: the input's bucket")
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
    add_cache_flag(e)

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
    add_cache_flag(s, server=True)

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


def add_cache_flag(p: argparse.ArgumentParser, *, server: bool = False) -> None:
    """--cache SPEC: the step cache (docs/caching.md); a bad spec is one line and exit status 2 at load."""
    from ..caching import PRESETS

    p.add_argument(
        "--cache",
        default=None,
        metavar="SPEC",
        help=(
            "every edit's step cache (neither BFL's nor OpenAI's API has the field): "
            if server
            else "step cache: "
        )
        + f"off, a preset ({', '.join(PRESETS)}) or NAME[:key=value,...] with NAME fbc | taylorseer | "
        "magcache, e.g. magcache:threshold=0.05,ratios=kontext (default off)",
    )


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


def _int_list(text: str) -> tuple[int, ...]:
    """ "0,1" -> (0, 1), for --refs and --batch."""
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas, got {text!r}") from None
