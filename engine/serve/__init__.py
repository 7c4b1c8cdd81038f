"""`kontext serve`: BFL's HTTP API (submit, poll, fetch) and OpenAI's images/edits over a KontextEngine,
with a bounded admission queue, hashed API keys, a SQLite job store, Prometheus metrics and graceful
drain. The engine knows nothing of HTTP; this package knows nothing of tensors (images cross it as
bytes).

Layout: app (create_app assembles), api_bfl / api_openai / api_review / api_operations (one router
per API), deps (service, caller, base URL), refusals (every error, in each API's shape), params (a
job's typed parameters and their EditRequest), service (the job lifecycle), sync (the synchronous
routes' one wait), admission (the bounded queue and its workers), jobs (the SQLite store), editor (the
engine behind bytes), schemas and views (BFL's wire format and status strings),
inputs (request fields to image bytes and sizes), keys, metrics, webhooks, body_limit, settings,
server (uvicorn with drain), ray_app (the same app on Ray Serve)."""

from __future__ import annotations

from .settings import ServeSettings

__all__ = ["ServeSettings"]
