"""`kontext serve --ray`: the same API as a Ray Serve application, to run edits on many GPUs and nodes.

Two deployments:
- `kontext-api` (one replica): the ingress. It owns the job store (SQLite under --data on its node),
  the bounded admission queue and every route of create_app; its worker threads send each EditJob to
- `kontext-engine` (N replicas, or autoscaled between 1 and --max-replicas): one KontextEngine each,
  `max_ongoing_requests=1` (one edit at a time per replica), `max_queued_requests` = --queue, and a
  `check_health` that reports its engine.
The ingress runs as many worker threads as there can be engine replicas, so Ray's own queue stays
short and the 429s come from our admission, with Retry-After, as in the single-process server.
"""

from __future__ import annotations

import logging
import signal
import threading
from dataclasses import dataclass, replace
from typing import Any

from ..config import LoadOptions
from ..errors import ConfigError
from .editor import EditJob, EditOutput, LocalEditor
from .keys import KeyRing
from .settings import ServeSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RayOptions:
    replicas: int = 1
    max_replicas: int | None = None  # autoscale from 1 to this (None: a fixed `replicas`)
    gpus_per_replica: float = 0.0
    cpus_per_replica: float = 1.0
    address: str | None = None  # a Ray cluster; None starts a local one

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise ConfigError(f"--replicas must be at least 1, got {self.replicas}")
        if self.max_replicas is not None and self.max_replicas < 1:
            raise ConfigError(f"--max-replicas must be at least 1, got {self.max_replicas}")

    @property
    def most_replicas(self) -> int:
        return self.max_replicas or self.replicas


class EngineReplica:
    """One engine in a Ray actor. safety: "off" or "review" (policies with filter models run in the
    local server for now)."""

    def __init__(self, source: str, options: LoadOptions, safety: str | None) -> None:
        from ..runtime import load

        kontext = load(source, options=options, safety=safety)
        kontext.warmup()
        self.editor = LocalEditor(kontext)

    def edit(self, job: EditJob) -> EditOutput:
        return self.editor.edit(job)

    def family(self) -> str:
        return self.editor.family

    def review(self) -> bool:
        return self.editor.review

    def default_steps(self) -> int:
        return self.editor.default_steps

    def stats(self) -> dict[str, int]:
        return self.editor.stats()

    def check_health(self) -> None:
        """Ray Serve calls this periodically; raising marks the replica unhealthy and replaces it."""
        self.editor.engine._check_open()
        self.editor.stats()


class RayEditor:
    """The Editor the ingress's Service calls: each edit is a call to one engine replica."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle
        self.family: str = handle.family.remote().result()
        self.review: bool = handle.review.remote().result()
        self.default_steps: int = handle.default_steps.remote().result()

    def edit(self, job: EditJob) -> EditOutput:
        out: EditOutput = self.handle.edit.remote(job).result()
        return out

    def stats(self) -> dict[str, int]:
        """One replica's dispatch counters (Ray routes the call to any replica)."""
        stats: dict[str, int] = self.handle.stats.remote().result()
        return stats

    def close(self) -> None:
        pass


def build_app(
    settings: ServeSettings,
    source: str,
    load: LoadOptions,
    options: RayOptions,
    keys: KeyRing | None,
    *,
    safety: str | None = None,
) -> Any:
    """The Ray Serve application (bind it with serve.run). Each engine replica loads `source` with
    `load`, one edit at a time (its workers: 1)."""
    from ray import serve

    from .app import create_app
    from .service import Service

    engine_options: dict[str, Any] = {
        "name": "kontext-engine",
        "ray_actor_options": {"num_gpus": options.gpus_per_replica, "num_cpus": options.cpus_per_replica},
        "max_ongoing_requests": 1,
        "max_queued_requests": settings.queue,
        "health_check_period_s": 10,
        "health_check_timeout_s": 60,
    }
    if options.max_replicas is not None:
        engine_options["autoscaling_config"] = {
            "min_replicas": 1,
            "initial_replicas": options.replicas,
            "max_replicas": options.max_replicas,
            "target_ongoing_requests": 1,
        }
    else:
        engine_options["num_replicas"] = options.replicas
    engine_deployment: Any = serve.deployment(**engine_options)(EngineReplica)
    engine = engine_deployment.bind(source, replace(load, workers=1), safety)

    ingress_settings = ServeSettings(**{**settings.__dict__, "workers": options.most_replicas})

    @serve.deployment(
        name="kontext-api",
        num_replicas=1,  # the job store is one SQLite file
        ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=max(64, 4 * settings.queue),
        graceful_shutdown_timeout_s=settings.drain_timeout + 5,
    )
    @serve.ingress()
    class Ingress:
        def __init__(self, engine_handle: Any) -> None:
            self.service = Service(ingress_settings, lambda: RayEditor(engine_handle))
            self.asgi = create_app(self.service, keys)  # not `self.app`: a property of Ray's wrapper
            self.service.start()  # idempotent: also the app's lifespan, if Ray runs it

        def __serve_build_asgi_app__(self) -> Any:  # Ray calls this after __init__, on the replica
            return self.asgi

        def __del__(self) -> None:  # Ray Serve's graceful shutdown: drain, then close
            self.service.drain(ingress_settings.drain_timeout)
            self.service.close()

    ingress: Any = Ingress
    return ingress.bind(engine)


def run_ray(
    settings: ServeSettings,
    source: str,
    load: LoadOptions,
    options: RayOptions,
    keys: KeyRing | None,
    *,
    safety: str | None = None,
) -> int:
    """Start (or join) Ray, serve the app on settings.host:port, and block until SIGTERM/SIGINT."""
    import ray
    from ray import serve

    ray.init(address=options.address, include_dashboard=False, ignore_reinit_error=True)
    serve.start(http_options={"host": settings.host, "port": settings.port})
    serve.run(build_app(settings, source, load, options, keys, safety=safety), name="kontext")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    log.info("Ray Serve app 'kontext' on http://%s:%d", settings.host, settings.port)
    stop.wait()
    serve.shutdown()  # graceful: the ingress drains (see Ingress.__del__)
    ray.shutdown()
    return 0
