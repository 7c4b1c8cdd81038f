"""`kontext serve`: BFL's HTTP API (submit, poll, fetch) over a KontextEngine, with a bounded job
queue, hashed API keys, a SQLite job store, Prometheus metrics and graceful drain. The engine knows
nothing of HTTP; this package knows nothing of tensors (images cross it as bytes)."""

from __future__ import annotations

from .settings import ServeSettings

__all__ = ["ServeSettings"]
