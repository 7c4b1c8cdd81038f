"""`kontext build` (export, quantize, compile, verify; one line per artifact) and `kontext info`
(what this machine can run, and a build's manifest)."""

from __future__ import annotations

import argparse
import logging
from typing import Any


def build_command(args: argparse.Namespace) -> int:
    from ..builder.builder import BuildOptions, build
    from ..builder.tensorrt_build import TensorRTOptions
    from ..calibration import CalibrationSpec
    from ..model.lora import LoraSpec

    if args.verbose == 0:
        logging.getLogger("engine.builder").setLevel(logging.INFO)  # one line per stage
    precisions = tuple(p.strip() for v in (args.precision or []) for p in v.split(",") if p.strip()) or None

    def given(**values: object) -> dict[str, Any]:  # a flag left unset keeps its dataclass's default
        return {k: v for k, v in values.items() if v is not None}

    options = BuildOptions(
        **given(opset=args.opset),
        calibration=CalibrationSpec(**given(edits=args.calib_edits, steps=args.calib_steps)),
        tensorrt=TensorRTOptions(
            **given(
                profiles=args.profiles,
                opt_level=args.opt_level,
                workspace_gb=args.workspace_gb,
                weight_streaming=args.weight_streaming,
            )
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
        out_dir=args.build,
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


def info_command(args: argparse.Namespace) -> int:
    from ..info import machine_report

    print(machine_report(args.build_dir))
    if getattr(args, "vram", None) is not None:
        from ..info import memory_report

        print(memory_report(args.plan_model, args.vram))
    if args.build_dir is not None:
        from ..info import build_report

        print(build_report(args.build_dir))
    return 0
