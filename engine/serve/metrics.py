"""Prometheus metrics of one server, in a registry of its own (never prometheus_client's global
one, so two apps in a process, as in the tests, do not collide). What mirrors live state is read at
scrape time: gauges (queue depth, in flight, jobs by state) and the dispatch counters."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from . import jobs as J
from .schemas import STATUS

STAGES = ("text_encode", "vae_encode", "denoise", "vae_decode", "total")
_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0, 120.0, 300.0, 600.0)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@dataclass(frozen=True)
class Live:
    """The server's state at scrape time."""

    depth: int
    running: int
    ready: bool
    draining: bool
    states: dict[str, int] = field(default_factory=dict)  # jobs in the store by state
    dispatch: dict[str, int] = field(default_factory=dict)  # engine hits, misses, fallbacks


class _LiveCollector(Collector):
    def __init__(self, read: Callable[[], Live]) -> None:
        self._read = read

    def collect(self) -> Iterator[Metric]:
        s = self._read()
        yield GaugeMetricFamily("kontext_queue_depth", "Jobs accepted and waiting for a worker", s.depth)
        yield GaugeMetricFamily("kontext_jobs_in_flight", "Jobs running on a worker", s.running)
        yield GaugeMetricFamily("kontext_ready", "1 once the engine is loaded and warm", int(s.ready))
        yield GaugeMetricFamily("kontext_draining", "1 while draining after SIGTERM", int(s.draining))
        jobs = GaugeMetricFamily("kontext_jobs", "Jobs in the store by state", labels=["state"])
        for state, n in sorted(s.states.items()):
            jobs.add_metric([state], n)
        yield jobs
        for name in ("hits", "misses", "fallbacks"):
            yield CounterMetricFamily(
                f"kontext_dispatch_{name}", f"Engine dispatch {name} since load", s.dispatch.get(name, 0)
            )


class ServeMetrics:
    def __init__(self, live: Callable[[], Live]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.submitted = Counter("kontext_jobs_submitted", "Jobs accepted", registry=r)
        self.finished = Counter("kontext_jobs_finished", "Jobs ended, by BFL status", ["status"], registry=r)
        self.rejected = Counter("kontext_rejections", "Requests refused, by reason", ["reason"], registry=r)
        self.queue_wait = Histogram(
            "kontext_queue_wait_seconds", "Accept to start of the edit", buckets=_BUCKETS, registry=r
        )
        self.service = Histogram(
            "kontext_service_seconds", "Edit time per stage", ["stage"], buckets=_BUCKETS, registry=r
        )
        r.register(_LiveCollector(live))

    def job_ended(self, state: str) -> None:
        """Count a job that ended in `state` (jobs.py), labelled by its BFL status ("Held" apart)."""
        self.finished.labels("Held" if state == J.HELD else STATUS[state].value).inc()

    def observe_timings(self, timings: dict[str, float]) -> None:
        for stage in STAGES:
            if stage in timings:
                self.service.labels(stage).observe(timings[stage])

    def render(self) -> bytes:
        return generate_latest(self.registry)
