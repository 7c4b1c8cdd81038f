"""create_app: the ASGI app over a Service, assembled from one router per API (as vLLM's
entrypoints/api_router.py): BFL's (api_bfl), OpenAI's images (api_openai), review (api_review) and
operations (api_operations). Routes are module-level functions; each reads the Service and KeyRing
from `request.app.state` (deps.py). Refusals render in each API's error shape (refusals.py); bodies
over the limit are refused before they are read whole (body_limit.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from ..version import __version__
from . import api_bfl, api_openai, api_operations, api_review
from .body_limit import BodyLimit
from .keys import KeyRing
from .refusals import install_handlers
from .schemas import STEPS_DEFAULT, ErrorResponse
from .service import Service
from .webhooks import Webhooks

TITLE = "Kontext engine: BFL-compatible API"
DESCRIPTION = (
    "FLUX.1 Kontext [dev] behind BFL's task API (submit, poll get_result, fetch the sample) and "
    "OpenAI's images/edits."
)
ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in {
        401: "missing or unknown API key",
        413: "request body over the limit",
        422: "invalid input",
        429: "too many tasks in flight (Retry-After says when to retry)",
        503: "warming up or shutting down",
    }.items()
}


def create_app(service: Service, keys: KeyRing | None = None) -> FastAPI:
    """The ASGI app over `service`. keys None: no auth (the settings allow that on loopback only)."""
    if service.settings.allow_webhooks:
        service.on_end = Webhooks()

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        service.start()
        yield
        service.close()  # after the drain: waits for the webhooks in flight, then frees the engine

    app = FastAPI(
        title=TITLE, version=__version__, description=DESCRIPTION, lifespan=lifespan, responses=ERRORS
    )
    app.state.service = service
    app.state.keys = keys
    app.add_middleware(BodyLimit, limit=service.settings.max_body_bytes)
    install_handlers(app, service)
    app.include_router(api_bfl.router)
    app.include_router(api_openai.router)
    app.include_router(api_review.router)
    app.include_router(api_operations.router)
    app.openapi = lambda: openapi(app, service)  # type: ignore[method-assign]
    return app


def openapi(app: FastAPI, service: Service) -> dict[str, Any]:
    """FastAPI's schema, with the default steps of the loaded model in the field descriptions (cached
    once the engine is loaded; until then they say "the model's default")."""
    if app.openapi_schema is not None:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    steps = service.default_steps
    if steps is None:
        return schema
    _replace(schema, STEPS_DEFAULT, f"Default {steps} on this server (--steps, else the model's default).")
    app.openapi_schema = schema
    return schema


def _replace(node: Any, old: str, new: str) -> None:
    """Replace every `description` equal to `old` in a JSON tree."""
    if isinstance(node, dict):
        if node.get("description") == old:
            node["description"] = new
        for value in node.values():
            _replace(value, old, new)
    elif isinstance(node, list):
        for value in node:
            _replace(value, old, new)
