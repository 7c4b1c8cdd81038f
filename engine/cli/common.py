"""Helpers more than one command shares: the one LoadOptions of argv (and what else a load takes), the
checks made before any heavy import, the device choice, quieting third-party logs, and the --safety
policy and C2PA signer of `kontext edit` and `kontext serve`.

Light to import: torch, diffusers and transformers are imported inside the functions that need them, so
a command checks its arguments, paths and prompt in a fraction of a second before loading anything.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..config import LoadOptions
from ..errors import ConfigError
from .parser import DEFAULT_MODEL

if TYPE_CHECKING:
    from ..backends.torch_options import TorchOptions
    from ..model.lora import LoraSpec
    from ..provenance import ProvenanceSigner
    from ..runtime import KontextEngine
    from ..safety import SafetyPolicy

log = logging.getLogger("engine.cli")

# LoadOptions fields that no flag sets: the server sets workers from --workers (ServeSettings).
_NOT_FLAGS = frozenset({"workers", "plan_memory_budget"})


def load_options(args: argparse.Namespace) -> LoadOptions:
    """The one LoadOptions of edit's, serve's and bench's flags (parser.add_load_flags): each field from
    the flag of its name, a field without a flag on this command keeps its default. The device stays as
    given (None: the runtime picks cuda when torch sees one), so no torch import is needed here."""
    values = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(LoadOptions)
        if f.name not in _NOT_FLAGS and hasattr(args, f.name)
    }
    return LoadOptions(**values)


@dataclass(frozen=True)
class LoadArgs:
    """Everything `runtime.load` takes from argv: the source, its LoadOptions, the torch path's levers
    and the LoRAs (safety and signing are separate: safety_and_signer)."""

    source: str | Path
    options: LoadOptions
    torch_options: TorchOptions | None = None
    loras: tuple[LoraSpec, ...] = ()


def load_source(args: argparse.Namespace) -> str | Path:
    """What to load: --build DIR (a build folder, checked to hold a manifest), else --model (default
    tiny). Both at once is refused: the build names its own model."""
    if args.build is None:
        return args.model or DEFAULT_MODEL
    if args.model is not None:
        raise ConfigError(
            f"--model and --build both name what to load: drop --model (the build {args.build} names its own)"
        )
    check_build_folder(args.build)
    return args.build


def check_build_folder(folder: Path) -> None:
    """A --build folder must hold a manifest; say how to make one when it does not."""
    from ..manifest import MANIFEST_NAME

    if not (folder / MANIFEST_NAME).is_file():
        what = "does not exist" if not folder.exists() else f"has no {MANIFEST_NAME}"
        raise ConfigError(
            f"--build {folder}: the folder {what}, so it is not a build; make one with "
            f"`kontext build --model tiny --build {folder}` (or pass a preset with --model)"
        )


def load_args(args: argparse.Namespace) -> LoadArgs:
    """LoadArgs of edit's and serve's flags: load_options with the device resolved, the levers
    (--levers, --compile-cache, checked against --torch-mode and the device) and the LoRAs (--lora).
    Imports torch: call it after the light checks."""
    from ..backends.torch_options import check_options, parse_levers
    from ..model.lora import LoraSpec

    source = load_source(args)
    options = load_options(args)
    options = dataclasses.replace(options, device=resolve_device(options.device))
    torch_options = dataclasses.replace(parse_levers(args.levers), compile_cache=args.compile_cache)
    check_options(options.torch_mode, torch_options)
    check_torch_mode(options, options.device or "cpu")
    loras = tuple(LoraSpec.parse(text) for text in args.lora)
    return LoadArgs(source, options, torch_options, loras)


def check_torch_mode(options: LoadOptions, device: str) -> None:
    """--torch-mode fp8 on a device without FP8 GEMMs: refused in the CLI's words before the load."""
    if options.torch_mode != "fp8" or options.backend not in (None, "torch"):
        return
    import torch

    from ..backends.fp8 import device_capability, fp8_supported

    capability = device_capability(torch.device(device))
    if not fp8_supported(capability):
        raise ConfigError(
            f"--torch-mode fp8 needs a CUDA GPU of compute capability >= 8.9; {device} has "
            f"{capability or 'none'}: use --torch-mode eager or --torch-mode compile here"
        )


def check_output(path: Path) -> None:
    """An output path `kontext edit` can write: a .png/.jpg/.jpeg file name (not a folder) whose folder
    exists and is writable, or can be made. Checked before the load, so a bad -o costs no edit."""
    from ..images import output_format

    if path.is_dir():
        raise ConfigError(f"-o {path}: is a folder; give a file name in it, e.g. -o {path / 'edit.png'}")
    output_format(path)
    existing = next((p for p in path.parents if p.exists()), Path("."))  # the folder, or what will hold it
    if not existing.is_dir():
        raise ConfigError(f"-o {path}: {existing} is a file, not a folder")
    try:  # a real probe: permission bits say nothing to root, nor about /proc or a read-only mount
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise ConfigError(
            f"-o {path}: cannot write in {existing} ({e.strerror}); choose another output path"
        ) from None
    if path.exists() and not os.access(path, os.W_OK):
        raise ConfigError(f"-o {path}: the file exists and is not writable")


def save_compile_cache(kontext: KontextEngine) -> None:
    """After the edits or a server's warm-up (everything compiled by now): write the torch compile cache
    named by --compile-cache, so the next process skips the compiles."""
    if (saved := kontext.save_compile_cache()) is not None:
        log.info("compile cache written to %s", saved)


def quiet_third_party(verbose: int) -> None:
    """No third-party warning or log line on the user's terminal unless -v: Python warnings off in this
    process (the CLI is the application), the libraries' loggers at ERROR, transformers' bars off.
    Call it once the command has passed its checks and is about to import the heavy libraries."""
    from .. import noise

    noise.show(verbose >= 1)
    if verbose >= 1:
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


def resolve_device(requested: str | None) -> str:
    import torch

    if requested is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(
            "--device cuda asked for, but torch sees no CUDA device (is this a CPU build of torch?)"
        )
    return requested


def safety_and_signer(args: argparse.Namespace) -> tuple[SafetyPolicy | None, ProvenanceSigner | None]:
    """The --safety policy (None: the model's default) and the C2PA signer (None: no certificate)."""
    from ..provenance import ProvenanceSigner
    from ..safety import build_policy

    policy = None
    if args.safety is not None:
        policy = build_policy(
            args.safety,
            models_dir=args.safety_models,
            blocklist=args.blocklist,
            device=resolve_device(args.safety_device),
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
