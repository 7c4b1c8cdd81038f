"""The argparse parser of `kontext`: every subcommand's flags and the flag helpers they share.
Nothing here runs a command or reads the environment; engine/cli/__init__.py dispatches what this parses.

Light to import (no torch): a usage error answers at once. Defaults are read from the dataclasses that own
them (LoadOptions, TorchOptions, ServeSettings), never typed twice.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..builder.backend import BUILD_BACKENDS
from ..config import (
    BACKENDS,
    DEFAULT_GUIDANCE,
    DEFAULT_PROMPT,
    DTYPES,
    MISS_POLICIES,
    TORCH_MODES,
    LoadOptions,
    parse_vram,
)
from ..errors import ConfigError
from ..manifest import PROFILE_MODES
from ..serve.settings import ServeSettings
from ..version import __version__

STEPS_HELP = "denoising steps (default: the model's, 8 on tiny and small, 28 on full and real weights)"
MODEL_HELP = (
    "preset (tiny, small, full: random weights, full is the real size on a GPU) or a local path: "
    "a diffusers folder of Kontext dev or BFL's .safetensors inside one (default tiny)"
)
DEFAULT_MODEL = "tiny"  # what edit, serve and bench load when given neither --model nor --build
DEFAULT_OUTPUT = Path("build/edit.png")
DEFAULT_BENCH_RESULTS = Path("build/bench")  # ignored by git: pass --out benchmarks/results to commit them
BUILD_ALIASES = ("--engine", "--build-dir")  # the build folder's old spellings, deprecated
# The levers of `--levers` (backends/torch_options.py parses and checks them; named here for --help).
LEVERS_HELP = (
    "torch levers, comma list: all (FP8 on every block Linear), static (calibrated FP8 scales), "
    "qkv (fused q|k|v), attn-VARIANT (our Triton attention: attn-bf16, attn-fp8-block...), "
    "graphs (CUDA graphs), dynamic (one dynamic-shape compile), vae (compiled VAE), freeze"
)


def default_of(cls: type, name: str) -> Any:
    """The default of dataclass `cls`'s field `name` (the one place it is written)."""
    for f in dataclasses.fields(cls):
        if f.name == name:
            if f.default is not dataclasses.MISSING:
                return f.default
            if f.default_factory is not dataclasses.MISSING:
                return f.default_factory()
    raise KeyError(f"{cls.__name__} has no field {name!r} with a default")


def parse_size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like 1024x768, got {text!r}") from None
    return w, h


class HelpFormatter(argparse.HelpFormatter):
    """--help says each flag's default, unless its text already does or it has none worth saying."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if (
            "default" in text
            or not action.option_strings
            or default is None
            or default is False  # a switch (0 is a default worth saying: 0 == False, so by identity)
            or default is argparse.SUPPRESS
            or (isinstance(default, str | list | tuple) and not default)
        ):
            return text
        return text + " (default: %(default)s)"


# Old spellings still accepted: each logs one line naming its new spelling and why (main()).
RENAMED: dict[str, tuple[str, str]] = {
    **{old: ("--build", "the one name of a build folder") for old in (*BUILD_ALIASES, "--out")},
    "--calib-samples": ("--calib-edits", "it counts calibration edits; samples are edits x steps"),
}


class Renamed(argparse.Action):
    """A flag under its one name or an old spelling (RENAMED): the value lands in `dest` either way; an
    old spelling is noted in `deprecated_flags`, which main() logs in one line."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[Any] | None,
        option_string: str | None = None,
    ) -> None:
        setattr(namespace, self.dest, values)
        if option_string in RENAMED:
            old = list(getattr(namespace, "deprecated_flags", None) or [])
            namespace.deprecated_flags = [*old, option_string]


def add_renamed(p: argparse.ArgumentParser | Any, name: str, *aliases: str, **kwargs: Any) -> None:
    """`name` with its old spellings (keys of RENAMED) as deprecated aliases: accepted, logged, and left
    out of --help."""
    p.add_argument(name, action=Renamed, **kwargs)
    hidden = {**kwargs, "help": argparse.SUPPRESS}
    hidden.pop("metavar", None)
    for alias in aliases:
        p.add_argument(alias, action=Renamed, **hidden)


def add_build_flag(p: argparse.ArgumentParser | Any, help: str, *aliases: str) -> None:
    """The build folder's one flag, `--build`, with its old spellings as deprecated aliases."""
    add_renamed(p, "--build", *aliases, dest="build", type=Path, default=None, metavar="DIR", help=help)


def add_load_flags(p: argparse.ArgumentParser, *, torch_path: bool = True) -> None:
    """Every flag of what to load and how: edit, serve and bench call this, and common.load_options turns
    the result into one LoadOptions. torch_path False (bench): only the source, device and context
    parallelism (a bench names its torch modes, levers and dtypes in --contestants)."""
    g = p.add_argument_group("what to load and how")
    g.add_argument("--model", default=None, help=MODEL_HELP)
    add_build_flag(g, "a build folder (kontext build --build DIR): run its built artifacts", *BUILD_ALIASES)
    g.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    g.add_argument(
        "--context-parallel",
        type=int,
        default=default_of(LoadOptions, "context_parallel"),
        metavar="N",
        help="split each transformer forward over N processes (torch path; N GPUs on CUDA)"
        + ("" if torch_path else "; bench: each torch contestant also runs split, as NAME+cpN"),
    )
    # Each LoadOptions field has one flag of its name, read by common.load_options (test_cli_flags.py).
    add_vram_flag(g)  # edit, serve and bench alike (bench refuses it: benchmarks.memory_phase times plans)
    if not torch_path:
        return
    add_cache_flag(g)  # edit and serve (a bench names its caches per contestant)
    g.add_argument("--backend", default=None, choices=BACKENDS, help="with --build: the artifact's backend")
    g.add_argument(
        "--precision", default=None, help="with --build: fp32 | int8 | fp8 | bf16 (default: the first built)"
    )
    g.add_argument(
        "--miss-policy",
        default=default_of(LoadOptions, "miss_policy"),
        choices=MISS_POLICIES,
        help="a shape the build does not serve: refuse, or run the torch path",
    )
    g.add_argument(
        "--threads",
        type=int,
        default=default_of(LoadOptions, "threads"),
        help="ONNX Runtime intra-op threads (default: its own)",
    )
    g.add_argument(
        "--dtype",
        default=default_of(LoadOptions, "dtype"),
        choices=DTYPES,
        help="torch weights (default: bf16 on CUDA, fp32 on a CPU)",
    )
    g.add_argument(
        "--torch-mode",
        default=default_of(LoadOptions, "torch_mode"),
        choices=TORCH_MODES,
        help="torch path: eager, compile, or fp8 (FP8 needs a CUDA GPU of compute capability >= 8.9)",
    )
    g.add_argument("--levers", default="", help=LEVERS_HELP)
    g.add_argument(
        "--compile-cache",
        type=Path,
        default=None,
        help="folder of the persistent torch compile cache (e.g. build/full/compile-cache): read at load, "
        "written after the edits, so the next process skips the compiles",
    )
    g.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="PATH[:SCALE]",
        help="a LoRA (.safetensors, diffusers or kohya format) fused at load, at SCALE (default 1)",
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kontext", description="Build and run FLUX.1 Kontext [dev] fast.", formatter_class=HelpFormatter
    )
    p.add_argument("--version", action="version", version=f"kontext {__version__}")
    p.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="more logging and third-party warnings (-vv: debug)",
    )
    sub = p.add_subparsers(dest="command", required=True)

    e = _command(sub, "edit", "edit an image from a text instruction")
    e.add_argument(
        "image",
        nargs="?",
        help="input image (PNG, JPEG, WebP). With neither image nor prompt: the demo, the bundled sample "
        f"and the prompt {DEFAULT_PROMPT!r}",
    )
    e.add_argument("prompt", nargs="?", default=None, help="the edit instruction (needed with an image)")
    e.add_argument("-o", "--output", type=Path, default=DEFAULT_OUTPUT, help="output .png or .jpg")
    e.add_argument("--steps", type=int, default=None, help=STEPS_HELP)
    e.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE, help="embedded guidance")
    e.add_argument("--seed", type=int, default=0, help="the noise seed")
    e.add_argument("--size", type=parse_size, default=None, help="output WxH; default: the input's bucket")
    e.add_argument("--no-progress", action="store_true", help="no progress bar")
    e.add_argument("--ref", action="append", default=[], metavar="IMG", help="a reference image (up to 3)")
    e.add_argument(
        "--then",
        action="append",
        default=[],
        metavar="PROMPT",
        help="edit the previous output again (repeatable): writes OUT-1.png, OUT-2.png, ...",
    )
    e.add_argument("--num-images", type=int, default=1, help="images per edit, seeds SEED, SEED+1, ...")
    add_load_flags(e)
    _safety_flags(e)

    b = _command(sub, "bench", "time diffusers, torch and the built engines on the same edits")
    b.add_argument("--steps", type=int, default=None, help=STEPS_HELP)
    b.add_argument("--repeats", type=int, default=3, help="timed rounds per bucket")
    b.add_argument("--warmup", type=int, default=1, help="discarded rounds per bucket")
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
    add_load_flags(b, torch_path=False)
    b.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_BENCH_RESULTS,
        help="results root folder (ignored by git; benchmarks/results holds the committed ones)",
    )
    b.add_argument(
        "--results-dir", type=Path, default=None, help="write exactly here (default: OUT/<device>/<date>)"
    )
    b.add_argument("--image", type=Path, default=None, help="input image (default: the bundled sample)")
    b.add_argument("--prompt", default=DEFAULT_PROMPT, help="the edit instruction")
    b.add_argument("--seed", type=int, default=0, help="the noise seed")
    b.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE, help="embedded guidance")
    b.add_argument("--no-chart", action="store_true", help="skip the PNG chart")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")

    k = _command(sub, "build", "export, quantize, compile and verify the engine; write its manifest")
    k.add_argument("--model", default=DEFAULT_MODEL, help=MODEL_HELP)
    add_build_flag(k, "the build folder to write (default build/<model>)", "--out")
    k.add_argument(
        "--precision",
        action="append",
        default=None,
        help="recipe(s): fp32, bf16, int8, fp8; repeat or comma list (default fp32,int8 on CPU)",
    )
    k.add_argument("--family", default=None, help="bucket family (default: the preset's, e.g. tiny)")
    k.add_argument("--backend", default="auto", choices=BUILD_BACKENDS, help="what the artifacts run on")
    k.add_argument("--force", action="store_true", help="rebuild every stage")
    k.add_argument("--opset", type=int, default=None, help="ONNX opset (default: BuildOptions')")
    k.add_argument(
        "--profiles",
        default=None,
        choices=PROFILE_MODES,
        help="TensorRT: one dynamic profile per family (one weight copy; default) or a static one per key",
    )
    # None: the dataclass's default (BuildOptions, CalibrationSpec, TensorRTOptions; the parser imports
    # no torch, so it cannot read them): build_command passes only the flags given.
    k.add_argument("--opt-level", type=int, default=None, help="TensorRT builder optimization level, 0-5")
    k.add_argument("--workspace-gb", type=float, default=None, help="TensorRT workspace limit in GiB")
    k.add_argument(
        "--weight-streaming",
        action="store_true",
        default=None,
        help="TensorRT: build plans that may stream their weights, so --vram can plan a smaller card",
    )
    add_renamed(
        k, "--calib-edits", "--calib-samples", dest="calib_edits", type=int, default=None,
        help="calibration edits (image, instruction)",
    )  # fmt: skip
    k.add_argument("--calib-steps", type=int, default=None, help="sampling steps per calibration edit")
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

    i = _command(sub, "info", "what this machine can run: torch, CUDA, TensorRT, ONNX Runtime, presets")
    i.add_argument("build_dir", nargs="?", type=Path, help="a build folder: show its manifest")
    i.add_argument(
        "--vram",
        type=vram_flag,
        default=None,
        metavar="GIB|auto",
        help="also the memory plan of --plan-model on this card",
    )
    i.add_argument("--plan-model", default="full", help="with --vram: the model to plan (default full)")

    _serve_parsers(sub)
    _plan_parser(sub)
    return p


def _command(sub: Any, name: str, text: str) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = sub.add_parser(
        name, help=text, description=text, formatter_class=HelpFormatter
    )
    return parser


VRAM_HELP = (
    "plan memory for a card of this many GiB (2^30 bytes), or 'auto' (this GPU's): T5 off the card, FP8 "
    "weights, tiled VAE, streamed blocks, as needed (`kontext plan` shows the plan)"
)


def vram_flag(text: str) -> float | str | None:
    """--vram's value by config.parse_vram (the rule LoadOptions checks), as an argparse type."""
    try:
        return parse_vram(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_vram_flag(p: argparse.ArgumentParser | Any) -> None:
    """--vram GIB|auto (engine/memory): the memory plan of edit, serve and bench (LoadOptions.vram)."""
    p.add_argument("--vram", type=vram_flag, default=None, metavar="GIB|auto", help=VRAM_HELP)


def _plan_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`kontext plan`: where each component would live on a card, and the expected peak."""
    pl = _command(sub, "plan", "the memory plan of a model on a card, before anything loads")
    pl.add_argument(
        "--model", default="full", help="a preset (full: the real model's sizes) or a Kontext folder"
    )
    pl.add_argument(
        "--precision", default="bf16", choices=("bf16", "fp8"), help="the transformer's (default bf16)"
    )
    pl.add_argument("--vram", required=True, metavar="GIB|auto", help="the card's memory in GiB, or auto")
    pl.add_argument("--json", action="store_true", help="the plan as JSON (diffusers' component names)")


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
    g.add_argument("--safety-device", default="cpu", help="where the filter models run")
    g.add_argument("--blocklist", type=Path, default=None, help="prompt terms to refuse, one per line")
    if files:
        g.add_argument(
            "--review-dir", type=Path, default=None, help="held outputs (default: review/ beside -o)"
        )
    g.add_argument("--c2pa-cert", type=Path, default=None, help="PEM certificate chain: C2PA-sign the output")
    g.add_argument("--c2pa-key", type=Path, default=None, help="PEM private key of the certificate")
    g.add_argument("--c2pa-alg", default="es256", choices=("es256", "ps256"), help="signature algorithm")
    g.add_argument("--c2pa-tsa", default=None, help="timestamp authority URL (default none: offline)")
    if files:
        g.add_argument("--no-prompt-metadata", action="store_true", help="leave the prompt out of the file")


def _serve_parsers(sub: Any) -> None:
    """`kontext serve`, `kontext keys new`, `kontext loadtest`. Serve's defaults are ServeSettings'."""

    def d(name: str) -> Any:
        return default_of(ServeSettings, name)

    s = _command(sub, "serve", "serve BFL's HTTP API (submit, poll, fetch) over the engine")
    add_load_flags(s)
    s.add_argument("--host", default=d("host"), help="address to listen on")
    s.add_argument("--port", type=int, default=d("port"), help="port to listen on")
    s.add_argument("--workers", type=int, default=d("workers"), help="edits run at once (engine workers)")
    s.add_argument(
        "--queue", type=int, default=d("queue"), help="tasks in flight (queued + running) before 429"
    )
    s.add_argument(
        "--per-key", type=int, default=d("per_key"), help="tasks in flight per API key (default: --queue)"
    )
    auth = s.add_mutually_exclusive_group()
    auth.add_argument("--keys", type=Path, default=None, help="API keys file (`kontext keys new --file`)")
    auth.add_argument("--no-auth", action="store_true", help="no API keys (loopback hosts only)")
    s.add_argument("--data", type=Path, default=d("data"), help="job store and results")
    s.add_argument(
        "--result-ttl", type=float, default=d("result_ttl"), help="seconds results and sample URLs live"
    )
    s.add_argument("--steps", type=int, default=None, help=STEPS_HELP)
    s.add_argument(
        "--max-body-mb", type=float, default=d("max_body_bytes") / 2**20, help="request body limit in MiB"
    )
    s.add_argument(
        "--drain-timeout", type=float, default=d("drain_timeout"), help="SIGTERM: seconds to finish jobs"
    )
    s.add_argument(
        "--public-url", default=d("public_url"), help="base of polling/sample URLs (behind a proxy)"
    )
    s.add_argument("--allow-urls", action="store_true", help="fetch http(s) input_image URLs")
    s.add_argument("--allow-webhooks", action="store_true", help="call webhook_url when a task ends")
    s.add_argument("--review", action="store_true", help="hold every result until an admin approves it")
    _safety_flags(s, files=False)
    s.add_argument("--ray", action="store_true", help="run as a Ray Serve application")
    s.add_argument("--replicas", type=int, default=1, help="--ray: engine replicas")
    s.add_argument("--max-replicas", type=int, default=None, help="--ray: autoscale from 1 up to this")
    s.add_argument("--gpus-per-replica", type=float, default=None, help="--ray: default 1 with CUDA, else 0")
    s.add_argument("--address", default=None, help="--ray: a Ray cluster (default: start a local one)")

    k = _command(sub, "keys", "manage the server's API keys")
    ksub = k.add_subparsers(dest="keys_command", required=True)
    kn = _command(ksub, "new", "print a new key once; append only its hash to FILE")
    kn.add_argument("--file", type=Path, required=True, help="the keys file the server reads (--keys)")
    kn.add_argument("--name", default="", help="a label for the key (who holds it)")
    kn.add_argument("--admin", action="store_true", help="may approve and reject held results")

    lt = _command(sub, "loadtest", "load-test a running server; table + JSON under benchmarks/results")
    lt.add_argument("url", help="the server's base URL, e.g. http://127.0.0.1:8000")
    lt.add_argument("--key", default=None, help="X-Key to send (default: the KONTEXT_KEY variable)")
    lt.add_argument("--image", type=Path, default=None, help="input image (default: the bundled sample)")
    lt.add_argument("--steps", type=int, default=2, help="steps per edit")
    lt.add_argument(
        "--queue", type=int, default=d("queue"), help="the server's --queue (sets the overload step)"
    )
    lt.add_argument("--requests", type=int, default=8, help="requests per closed-loop level")
    lt.add_argument("--soak", type=int, default=200, help="requests in the soak")
    lt.add_argument("--open-seconds", type=float, default=20.0, help="seconds per open-loop rate")
    lt.add_argument("--pid", type=int, default=None, help="the server's process id, for its RSS slope")
    lt.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="results root folder")


def add_cache_flag(p: argparse.ArgumentParser | Any) -> None:
    """--cache SPEC (LoadOptions.cache): every edit's step cache (docs/caching.md); a server's default,
    since neither BFL's nor OpenAI's API has the field. A bad spec: one line, exit status 2."""
    from ..caching.spec import PRESETS

    p.add_argument(
        "--cache",
        default=None,
        metavar="SPEC",
        help=f"step cache of every edit: off, a preset ({', '.join(PRESETS)}) or NAME[:key=value,...] "
        "with NAME fbc | taylorseer | magcache, e.g. magcache:threshold=0.05,ratios=kontext (default off)",
    )


def _int_list(text: str) -> tuple[int, ...]:
    """ "0,1" -> (0, 1), for --refs and --batch."""
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas, got {text!r}") from None
