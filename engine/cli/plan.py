"""`kontext plan`: the memory plan of a model on a card, before anything loads (engine/memory).
Nothing fits: one line naming the smallest card that would, exit status 2."""

from __future__ import annotations

import argparse
import json
import sys


def plan_command(args: argparse.Namespace) -> int:
    import torch

    from ..errors import ConfigError
    from ..memory.plan import plan_memory
    from ..memory.planning import card_gib, parse_vram

    vram = parse_vram(args.vram)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gib = card_gib(vram or "auto", device)
    if gib is None:
        raise ConfigError(
            "--vram auto reads this machine's GPU, and it has none: pass a size, e.g. --vram 24"
        )
    fp8_compute = False
    if device.type == "cuda":
        from ..backends.fp8 import device_capability, fp8_supported

        fp8_compute = fp8_supported(device_capability(device))
    plan = plan_memory(args.model, vram=gib, precision=args.precision, fp8_compute=fp8_compute)
    if args.json:
        print(json.dumps(plan.to_json(), indent=2))
    else:
        print(plan.describe())
    if not plan.fits:
        print(f"kontext plan: {plan.refusal()}", file=sys.stderr)
        return 2
    return 0
