"""`kontext loadtest URL`: load a running server through BFL's API as clients do (submit, poll, fetch).

Phases: closed-loop concurrency 1, 2, 4, 8 and queue + 4 (past the bound, to see the 429s); open-loop
Poisson arrivals at 0.5x, 0.9x and 1.2x the capacity measured by the closed loop; a soak of N requests
while the server's RSS is sampled. Each phase reports end-to-end p50/p95/p99 split into the server's
queue wait and service time (from result.timings), images/s, 429s, errors (5xx, transport failures,
status Error, wrong sample) and, for the soak, the RSS slope and growth.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import random
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

FINAL = frozenset({"Ready", "Error", "Request Moderated", "Content Moderated", "Task not found"})


@dataclass(frozen=True)
class LoadConfig:
    url: str
    key: str | None
    image: bytes  # the input file
    steps: int = 2
    queue: int = 24  # the server's --queue: the overload level is queue + 4
    requests: int = 8  # per closed-loop level (at least 2x the concurrency)
    soak: int = 200
    soak_concurrency: int = 2
    open_seconds: float = 20.0  # arrivals per open-loop rate
    levels: tuple[int, ...] = (1, 2, 4, 8)
    rates: tuple[float, ...] = (0.5, 0.9, 1.2)  # x measured capacity
    pid: int | None = None  # the server's process, for its RSS
    poll_interval: float = 0.05
    timeout: float = 600.0  # per request, submit to final status
    seed: int = 0


@dataclass
class Outcome:
    code: int  # HTTP status of the submit (0: transport error)
    status: str | None = None  # final BFL status
    e2e: float = 0.0  # submit to sample fetched, seconds
    queue_wait: float | None = None
    service: float | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == "Ready" and self.error is None


@dataclass
class PhaseReport:
    name: str
    offered: int
    ok: int
    rejected: int  # 429
    errors: int
    wall_s: float
    images_per_s: float
    e2e: dict[str, float] = field(default_factory=dict)
    queue_wait: dict[str, float] = field(default_factory=dict)
    service: dict[str, float] = field(default_factory=dict)
    error_samples: list[str] = field(default_factory=list)
    rss_mb: list[tuple[float, float]] = field(default_factory=list)  # (seconds, MiB) of the server
    rss_slope_mb_per_100: float | None = None  # MiB per 100 requests
    rss_growth_pct: float | None = None  # last tenth vs first tenth of the soak


@dataclass
class LoadReport:
    url: str
    started: str
    steps: int
    capacity_images_per_s: float
    phases: list[PhaseReport]


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    a = np.asarray(values, dtype=np.float64)
    return {f"p{q}": float(np.percentile(a, q)) for q in (50, 95, 99)}


class Client:
    def __init__(self, config: LoadConfig) -> None:
        import httpx

        self.config = config
        headers = {"X-Key": config.key} if config.key else {}
        limits = httpx.Limits(max_connections=256, max_keepalive_connections=64)
        self.http = httpx.AsyncClient(base_url=config.url, headers=headers, timeout=60.0, limits=limits)
        self.body = {
            "prompt": "add a red hat",
            "input_image": base64.b64encode(config.image).decode(),
            "steps": config.steps,
        }

    async def one(self, seed: int) -> Outcome:
        """Submit, poll until final, fetch the sample (the whole client path)."""
        import httpx

        t0 = time.perf_counter()
        try:
            r = await self.http.post("/v1/flux-kontext-dev", json={**self.body, "seed": seed})
            if r.status_code != 200:
                err = None if r.status_code == 429 else f"submit {r.status_code}: {r.text[:200]}"
                return Outcome(r.status_code, error=err)
            task = r.json()
            deadline = t0 + self.config.timeout
            while True:
                body = (await self.http.get(task["polling_url"])).json()
                if body["status"] in FINAL:
                    break
                if time.perf_counter() > deadline:
                    return Outcome(200, body["status"], error="timed out polling")
                await asyncio.sleep(self.config.poll_interval)
            if body["status"] != "Ready":
                return Outcome(200, body["status"], error=f"status {body['status']}: {body.get('details')}")
            sample = await self.http.get(body["result"]["sample"])
            if sample.status_code != 200 or not sample.content:
                return Outcome(200, "Ready", error=f"sample {sample.status_code}")
            timings = body["result"].get("timings", {})
            return Outcome(
                200, "Ready", time.perf_counter() - t0, timings.get("queue_wait"), timings.get("service")
            )
        except (httpx.HTTPError, ValueError, KeyError) as e:
            return Outcome(0, error=f"{type(e).__name__}: {e}")

    async def close(self) -> None:
        await self.http.aclose()


async def closed_loop(
    client: Client, concurrency: int, total: int, seed0: int
) -> tuple[list[Outcome], float]:
    """`concurrency` clients, each submitting its next request as soon as its last one ends."""
    counter = iter(range(total))
    out: list[Outcome] = []

    async def worker() -> None:
        for i in counter:
            out.append(await client.one(seed0 + i))

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return out, time.perf_counter() - t0


async def open_loop(client: Client, rate: float, seconds: float, seed0: int) -> tuple[list[Outcome], float]:
    """Poisson arrivals at `rate` per second for `seconds`, whatever the server's state."""
    rng = random.Random(seed0)
    tasks: list[asyncio.Task[Outcome]] = []
    t0 = time.perf_counter()
    next_at = 0.0
    i = 0
    while True:
        next_at += rng.expovariate(rate)
        if next_at > seconds:
            break
        await asyncio.sleep(max(0.0, t0 + next_at - time.perf_counter()))
        tasks.append(asyncio.create_task(client.one(seed0 + i)))
        i += 1
    out = list(await asyncio.gather(*tasks))
    return out, time.perf_counter() - t0


def summarize(name: str, outcomes: list[Outcome], wall: float) -> PhaseReport:
    ok = [o for o in outcomes if o.ok]
    errors = [o for o in outcomes if o.error is not None]
    return PhaseReport(
        name=name,
        offered=len(outcomes),
        ok=len(ok),
        rejected=sum(o.code == 429 for o in outcomes),
        errors=len(errors),
        wall_s=wall,
        images_per_s=len(ok) / wall if wall > 0 else 0.0,
        e2e=percentiles([o.e2e for o in ok]),
        queue_wait=percentiles([o.queue_wait for o in ok if o.queue_wait is not None]),
        service=percentiles([o.service for o in ok if o.service is not None]),
        error_samples=sorted({o.error for o in errors if o.error})[:5],
    )


async def _sample_rss(pid: int, into: list[tuple[float, float]], stop: asyncio.Event, t0: float) -> None:
    import psutil

    proc = psutil.Process(pid)
    while not stop.is_set():
        into.append((time.perf_counter() - t0, proc.memory_info().rss / 2**20))
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.5)


def rss_trend(
    samples: list[tuple[float, float]], requests: int, wall: float
) -> tuple[float | None, float | None]:
    """(slope in MiB per 100 requests from a least-squares line, growth % last tenth vs first tenth)."""
    if len(samples) < 4 or wall <= 0:
        return None, None
    t = np.array([s[0] for s in samples])
    m = np.array([s[1] for s in samples])
    slope_per_s = float(np.polyfit(t, m, 1)[0])
    tenth = max(1, len(m) // 10)
    first, last = float(np.median(m[:tenth])), float(np.median(m[-tenth:]))
    return slope_per_s * wall / requests * 100, (last - first) / first * 100


async def run_phases(config: LoadConfig) -> LoadReport:
    client = Client(config)
    started = datetime.now().isoformat(timespec="seconds")
    phases: list[PhaseReport] = []
    seed = config.seed
    try:
        for c in (*config.levels, config.queue + 4):
            total = max(config.requests, 2 * c)
            outcomes, wall = await closed_loop(client, c, total, seed)
            seed += total
            phases.append(summarize(f"closed c={c}", outcomes, wall))
            log.info("%s", phases[-1].name)
        capacity = max(p.images_per_s for p in phases)
        for x in config.rates:
            outcomes, wall = await open_loop(client, x * capacity, config.open_seconds, seed)
            seed += len(outcomes)
            phases.append(summarize(f"open {x:g}x ({x * capacity:.2f}/s)", outcomes, wall))
        rss: list[tuple[float, float]] = []
        stop = asyncio.Event()
        t0 = time.perf_counter()
        sampler = asyncio.create_task(_sample_rss(config.pid, rss, stop, t0)) if config.pid else None
        outcomes, wall = await closed_loop(client, config.soak_concurrency, config.soak, seed)
        stop.set()
        if sampler is not None:
            await sampler
        soak = summarize(f"soak {config.soak}", outcomes, wall)
        soak.rss_mb = rss
        soak.rss_slope_mb_per_100, soak.rss_growth_pct = rss_trend(rss, config.soak, wall)
        phases.append(soak)
    finally:
        await client.close()
    return LoadReport(config.url, started, config.steps, capacity, phases)


def run_loadtest(config: LoadConfig) -> LoadReport:
    return asyncio.run(run_phases(config))


def format_table(report: LoadReport) -> str:
    def ms(d: dict[str, float]) -> str:
        return "/".join(f"{d[k] * 1000:.0f}" for k in ("p50", "p95", "p99")) if d else "-"

    lines = [
        f"kontext loadtest {report.url} ({report.started}, {report.steps} steps/edit, "
        f"capacity {report.capacity_images_per_s:.2f} images/s)",
        "latencies in ms as p50/p95/p99; queue wait and service time are the server's own",
        f"{'phase':<24} {'sent':>5} {'ok':>5} {'429':>5} {'err':>4} {'img/s':>6}  "
        f"{'end to end':>18} {'queue wait':>18} {'service':>18}",
    ]
    for p in report.phases:
        lines.append(
            f"{p.name:<24} {p.offered:>5} {p.ok:>5} {p.rejected:>5} {p.errors:>4} {p.images_per_s:>6.2f}  "
            f"{ms(p.e2e):>18} {ms(p.queue_wait):>18} {ms(p.service):>18}"
        )
        for e in p.error_samples:
            lines.append(f"    error: {e}")
        if p.rss_growth_pct is not None:
            first, last = p.rss_mb[0][1], p.rss_mb[-1][1]
            lines.append(
                f"    server RSS {first:.0f} -> {last:.0f} MiB, growth {p.rss_growth_pct:+.2f}% "
                f"(last tenth vs first), slope {p.rss_slope_mb_per_100:+.2f} MiB per 100 requests"
            )
    return "\n".join(lines)


def write_report(report: LoadReport, out_root: Path) -> tuple[str, list[Path]]:
    """Table and JSON under <out_root>/<machine>/<date>/load-<time>.{txt,json}."""
    import os

    from ..files import atomic_write_bytes
    from .machine import cpu_name, slug

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    stamp = datetime.fromisoformat(report.started)
    folder = out_root / slug(f"{cpu_name()} {cores} cores") / stamp.strftime("%Y-%m-%d")
    table = format_table(report)
    txt, js = folder / f"load-{stamp:%H%M%S}.txt", folder / f"load-{stamp:%H%M%S}.json"
    atomic_write_bytes(txt, (table + "\n").encode())
    atomic_write_bytes(js, json.dumps(asdict(report), indent=1, allow_nan=False).encode())
    return table, [txt, js]
