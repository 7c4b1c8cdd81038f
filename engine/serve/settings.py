"""ServeSettings: every knob of the server, validated once, frozen, with its default (DEFAULTS). Read
from argv by engine/cli/ only."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

from ..config import DEFAULT_GUIDANCE as DEFAULT_GUIDANCE  # the edit defaults: config owns them
from ..errors import ConfigError
from ..prompts import MAX_PROMPT_CHARS as MAX_PROMPT_CHARS  # prompts.py owns the prompt rules

LOOPBACK_NAMES = frozenset({"localhost", "ip6-localhost"})

# Ranges of the request fields (BFL's where BFL has one; steps and guidance as cog-flux-kontext).
# Their defaults are the model's: ModelPreset.default_steps and config.DEFAULT_GUIDANCE.
STEPS_RANGE = (1, 50)
GUIDANCE_RANGE = (0.0, 10.0)


def is_loopback(host: str) -> bool:
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class ServeSettings:
    """How the server runs. `queue` bounds the accepted, unfinished jobs (queued + running), as BFL's
    24 tasks in flight; `per_key` bounds them per API key (None: the same as `queue`)."""

    data: Path = Path("build/serve")
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 1  # edits run at once (engine workers)
    queue: int = 24
    per_key: int | None = None
    keys_file: Path | None = None  # None: --no-auth (loopback hosts only)
    result_ttl: float = 600.0  # seconds a finished result (and its sample URL) lives
    max_body_bytes: int = 48 * 1024 * 1024
    allow_urls: bool = False  # fetch http(s) input_image URLs
    allow_webhooks: bool = False
    review: bool = False  # hold every result until an admin approves it
    drain_timeout: float = 60.0  # SIGTERM: seconds to finish the jobs in flight
    public_url: str | None = None  # base of polling and sample URLs (default: the request's)
    default_steps: int | None = None  # steps of a request that leaves them out (None: the model's default)
    sync_timeout: float = 600.0  # synchronous routes (/v1/edit, /v1/images/edits) wait this long at most

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ConfigError(f"--workers must be at least 1, got {self.workers}")
        if self.queue < 1:
            raise ConfigError(f"--queue must be at least 1, got {self.queue}")
        if self.per_key is not None and self.per_key < 1:
            raise ConfigError(f"--per-key must be at least 1, got {self.per_key}")
        if self.result_ttl <= 0:
            raise ConfigError(f"--result-ttl must be positive, got {self.result_ttl}")
        if self.max_body_bytes < 1024:
            raise ConfigError(f"--max-body-mb is too small: {self.max_body_bytes} bytes")
        if self.drain_timeout < 0:
            raise ConfigError(f"--drain-timeout must be >= 0, got {self.drain_timeout}")
        if not 0 < self.port < 65536:
            raise ConfigError(f"--port must be 1-65535, got {self.port}")
        if self.sync_timeout <= 0:
            raise ConfigError(f"sync timeout must be positive, got {self.sync_timeout}")
        if self.default_steps is not None and not STEPS_RANGE[0] <= self.default_steps <= STEPS_RANGE[1]:
            raise ConfigError(f"default steps must be in {STEPS_RANGE}, got {self.default_steps}")
        if self.keys_file is None and not is_loopback(self.host):
            raise ConfigError(
                f"--no-auth serves anyone who can reach {self.host}: allowed only on a loopback host "
                "(127.0.0.1, ::1, localhost); create keys with `kontext keys new --file keys.jsonl`"
            )

    @property
    def key_limit(self) -> int:
        return self.per_key if self.per_key is not None else self.queue


# Every serve default, read by the CLI's flags (engine/cli/parser.py) rather than typed there again.
DEFAULTS = ServeSettings()
