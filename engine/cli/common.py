"""Helpers more than one command shares: the device choice, quieting third-party logs, and the
--safety policy and C2PA signer of `kontext edit` and `kontext serve`."""

from __future__ import annotations

import argparse
import logging
from typing import TYPE_CHECKING

from ..errors import ConfigError

if TYPE_CHECKING:
    from ..provenance import ProvenanceSigner
    from ..safety import SafetyPolicy


def quiet_third_party(verbose: int) -> None:
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


def vram_option(args: argparse.Namespace) -> float | str | None:
    """LoadOptions.vram of --vram (add_vram_flag): None, "auto" or GiB."""
    from ..memory.planning import parse_vram

    return parse_vram(getattr(args, "vram", None))
