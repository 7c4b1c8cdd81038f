"""`kontext serve` (its ServeSettings, the local or Ray server), `kontext keys new` and `kontext loadtest`:
the commands of the HTTP server and its clients."""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from ..config import LoadOptions
from ..errors import ConfigError
from .common import resolve_device, safety_and_signer

if TYPE_CHECKING:
    from ..serve.settings import ServeSettings


def serve_command(args: argparse.Namespace) -> int:
    """`kontext serve`: the engine loads (and warms up) in the background; /readyz turns 200 after."""
    from ..serve.keys import KeyRing

    if args.keys is None and not args.no_auth:
        raise ConfigError(
            "kontext serve needs --keys FILE (from `kontext keys new --file FILE`) or --no-auth"
        )
    source = _serve_source(args)
    settings = serve_settings(args)
    keys = KeyRing.load(args.keys) if args.keys is not None else None
    device = resolve_device(args.device)
    policy, signer = safety_and_signer(args)
    if args.verbose == 0:
        logging.getLogger("engine.serve").setLevel(logging.INFO)  # recoveries, drains, reaps
    load_options = LoadOptions(
        backend=args.backend,
        precision=args.precision,
        device=device,
        miss_policy=args.miss_policy,
        dtype=args.dtype,
        context_parallel=args.context_parallel,
        cache=args.cache,
    )
    if args.ray:
        from ..serve.ray_app import RayOptions, run_ray

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

    from ..serve.editor import LocalEditor
    from ..serve.server import run

    def editor() -> LocalEditor:
        from ..runtime import load

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


def serve_settings(args: argparse.Namespace) -> ServeSettings:
    """ServeSettings of `kontext serve`'s flags; default steps: the model's (runtime.default_steps),
    the same value `kontext edit` runs for the same --model or --engine."""
    from ..runtime import default_steps
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
        default_steps=args.steps if args.steps is not None else default_steps(_serve_source(args)),
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
