"""What every route depends on: the Service and KeyRing of its app (`request.app.state`, set by
create_app), the caller (an API key in `X-Key`, BFL's header, or `Authorization: Bearer`, OpenAI's),
and the public base URL of polling and sample links.

No `from __future__ import annotations`: FastAPI reads these signatures' annotations at import time.
"""

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from .keys import KeyRing
from .refusals import Refused, refuse
from .service import Service

_x_key = APIKeyHeader(name="X-Key", auto_error=False, description="An API key from `kontext keys new`.")
_bearer = HTTPBearer(auto_error=False, description="The same API key as `Authorization: Bearer <key>`.")


@dataclass(frozen=True)
class Principal:
    owner: str  # the id its jobs are stored under (never the key)
    admin: bool


def get_service(request: Request) -> Service:
    service: Service = request.app.state.service
    return service


def get_keys(request: Request) -> KeyRing | None:
    """None: no auth (the settings allow that on loopback only)."""
    keys: KeyRing | None = request.app.state.keys
    return keys


ServiceDep = Annotated[Service, Depends(get_service)]


def principal(
    service: ServiceDep,
    keys: Annotated[KeyRing | None, Depends(get_keys)],
    key: Annotated[str | None, Depends(_x_key)],
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    if keys is None:
        return Principal("anonymous", admin=True)
    entry = keys.find(key or (bearer.credentials if bearer is not None else None))
    if entry is None:
        raise refuse(
            service,
            "unauthorized",
            401,
            "missing or unknown API key (send it as X-Key or Authorization: Bearer); "
            "create one with `kontext keys new`",
        )
    return Principal(entry.owner, entry.admin)


def admin(p: Annotated[Principal, Depends(principal)]) -> Principal:
    if not p.admin:
        raise Refused(403, "this route needs an admin key (`kontext keys new --admin`)")
    return p


User = Annotated[Principal, Depends(principal)]
Admin = Annotated[Principal, Depends(admin)]


def base_url(request: Request) -> str:
    """Where clients reach this server: --public-url, else the request's own base URL."""
    service = get_service(request)
    return service.settings.public_url or str(request.base_url)
