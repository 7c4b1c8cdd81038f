"""`kontext bench`: the BenchConfig of its flags (with the +cpN context-parallel twins), the run, and
the results written after each contestant."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from ..errors import ConfigError
from .common import load_options, quiet_third_party, resolve_device
from .parser import DEFAULT_MODEL, parse_size

if TYPE_CHECKING:
    from ..bench import BenchConfig


def bench_command(args: argparse.Namespace) -> int:
    from ..prompts import check_prompt

    if load_options(args).vram is not None:  # the light checks first
        raise ConfigError(
            "kontext bench times resident contestants; the memory plans are timed by "
            "`python -m benchmarks.memory_phase --vram 24,16` (docs/memory.md)"
        )
    check_prompt(args.prompt)
    quiet_third_party(args.verbose)
    from ..bench import BenchRun, run_bench, write_results

    config = bench_config(args)

    def save(run: BenchRun) -> None:  # after each contestant: a killed run still leaves results
        write_results(run, args.out, chart=False, folder=args.results_dir)

    run = run_bench(config, on_progress=save)
    table, files = write_results(run, args.out, chart=not args.no_chart, folder=args.results_dir)
    print(table)
    written = [files.jsonl, files.table, files.chart, files.profile]
    print("\nwrote " + ", ".join(str(p) for p in written if p is not None))
    return 0


def bench_config(args: argparse.Namespace) -> BenchConfig:
    """BenchConfig of `kontext bench`'s flags; steps: the model's default (loading.default_steps).
    Its load flags are edit's source, device and context parallelism (parser.add_load_flags, read through
    common.load_options); the torch modes, levers and dtypes are named per contestant."""
    from ..bench import BenchConfig
    from ..loading import default_steps

    def names(text: str | None) -> tuple[str, ...] | None:
        return None if text is None else tuple(n.strip() for n in text.split(",") if n.strip())

    options = load_options(args)
    model = args.model or DEFAULT_MODEL
    device = resolve_device(options.device)
    try:
        bucket_list = (
            None if args.buckets is None else tuple(parse_size(s) for s in names(args.buckets) or ())
        )
    except argparse.ArgumentTypeError as e:
        raise ConfigError(f"--buckets: {e}") from None
    return BenchConfig(
        model=model,
        steps=args.steps if args.steps is not None else default_steps(model),
        repeats=args.repeats,
        warmup=args.warmup,
        buckets=bucket_list or None,
        contestants=_with_context_parallel(names(args.contestants), options.context_parallel, device),
        build_dir=args.build,
        device=device,
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
    import torch

    from ..bench.runner import default_contestants

    base = chosen or default_contestants(
        torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    )
    return (*base, *(f"{c}+cp{n}" for c in base if c.startswith("torch-")))
