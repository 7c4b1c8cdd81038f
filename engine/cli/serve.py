"""`kontext serve` (its ServeSettings, the local or Ray server), `kontext keys new` and `kontext loadtest`:
the commands of the HTTP server and its clients."""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import replace
from typing import TYPE_CHECKING

from ..errors import ConfigError
from .common import (
    load_args,
    load_options,
    load_source,
    quiet_third_party,
    safety_and_signer,
    save_compile_cache,
)

if TYPE_CHECKING:
    from ..serve.settings import ServeSettings


def serve_command(args: argparse.Namespace) -> int:
    """`kontext serve`: the engine loads (and warms up) in the background; /readyz turns 200 after.
    Its load flags are edit's (parser.add_load_flags, common.load_args): the compiled and FP8 torch
    paths, levers, LoRAs, threads and dtype serve as they edit."""
    if args.keys is None and not args.no_auth:
        raise ConfigError(
            "kontext serve needs --keys FILE (from `kontext keys new --file FILE`) or --no-auth"
        )
    load_options(args)  # the light checks first: flags, the build folder
    load_source(args)
    quiet_third_party(args.verbose)
    from ..serve.keys import KeyRing

    plan = load_args(args)
    settings = serve_settings(args)
    keys = KeyRing.load(args.keys) if args.keys is not None else None
    policy, signer = safety_and_signer(args)
    if args.verbose == 0:
        logging.getLogger("engine.serve").setLevel(logging.INFO)  # recoveries, drains, reaps
    if args.ray:
        from ..backends.torch_options import TorchOptions
        from ..serve.ray_app import RayOptions, run_ray

        if plan.options.context_parallel > 1:
            raise ConfigError("--context-parallel runs in the local server: drop --ray or --context-parallel")
        if plan.loras or plan.torch_options != TorchOptions():
            raise ConfigError(
                "kontext serve --ray takes no --lora, --levers or --compile-cache yet: drop them"
            )
        device = plan.options.device
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
        return run_ray(settings, str(plan.source), plan.options, options, keys, safety=safety)

    from ..serve.editor import LocalEditor
    from ..serve.server import run

    def editor() -> LocalEditor:
        from ..runtime import load

        kontext = load(
            plan.source,
            options=replace(plan.options, workers=settings.workers),
            safety=policy,
            signer=signer,
            torch_options=plan.torch_options,
            loras=plan.loras,
        )
        kontext.warmup()
        save_compile_cache(kontext)  # every served shape compiled: the next start skips the compiles
        return LocalEditor(kontext)

    print(
        f"kontext serve: http://{settings.host}:{settings.port} (engine loading; /readyz turns 200 when warm)"
    )
    return run(settings, editor, keys)


def serve_settings(args: argparse.Namespace) -> ServeSettings:
    """ServeSettings of `kontext serve`'s flags; default steps: the model's (loading.default_steps),
    the same value `kontext edit` runs for the same --model or --build."""
    from ..loading import default_steps
    from ..serve.settings import ServeSettings

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
        default_steps=args.steps if args.steps is not None else default_steps(load_source(args)),
    )


def keys_command(args: argparse.Namespace) -> int:
    from ..serve.keys import new_key

    key = new_key(args.file, args.name, admin=args.admin)
    print(key)
    print(f"(shown once; its SHA-256 was appended to {args.file})", file=sys.stderr)
    return 0


def loadtest_command(args: argparse.Namespace) -> int:
    import os

    from ..assets import sample_image_path
    from ..bench.loadtest import LoadConfig, run_loadtest, write_report

    if args.verbose == 0:
        logging.getLogger("engine.bench.loadtest").setLevel(logging.INFO)  # one line per phase: progress

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
