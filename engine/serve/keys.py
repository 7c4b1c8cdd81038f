"""API keys: `kontext keys new` prints a fresh key once and appends only its SHA-256 to a JSON-lines
file; the server loads that file and maps a presented key to its owner id (never the key itself).

A key is 32 random bytes (256 bits), so a plain SHA-256 is enough: there is nothing to brute-force,
and a slow password hash would only cost CPU on every request.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError
from ..files import atomic_write_bytes

KEY_PREFIX = "kx_"


@dataclass(frozen=True)
class KeyEntry:
    """One line of the keys file."""

    sha256: str
    name: str
    admin: bool = False

    @property
    def owner(self) -> str:
        """The id jobs are stored under: a prefix of the hash, stable and not secret."""
        return f"key:{self.sha256[:16]}"


def digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def new_key(path: Path, name: str, *, admin: bool = False) -> str:
    """Create a key, append its hash to `path` (created 0600 if missing), return the key itself."""
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    entry = {"sha256": digest(key), "name": name, "admin": admin, "created": int(time.time())}
    old = path.read_bytes() if path.exists() else b""
    if old and not old.endswith(b"\n"):
        old += b"\n"
    atomic_write_bytes(path, old + json.dumps(entry).encode() + b"\n")
    os.chmod(path, 0o600)
    return key


class KeyRing:
    """The keys a server accepts, by hash."""

    def __init__(self, entries: list[KeyEntry]) -> None:
        self._by_hash = {e.sha256: e for e in entries}

    def __len__(self) -> int:
        return len(self._by_hash)

    def find(self, key: str | None) -> KeyEntry | None:
        if not key:
            return None
        return self._by_hash.get(digest(key))

    @classmethod
    def load(cls, path: Path) -> KeyRing:
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except OSError as e:
            raise ConfigError(
                f"--keys {path}: cannot read it ({e.strerror or e}); create one with "
                f"`kontext keys new --file {path}`"
            ) from e
        entries: list[KeyEntry] = []
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                raw = json.loads(line)
                entry = KeyEntry(str(raw["sha256"]), str(raw.get("name", "")), bool(raw.get("admin", False)))
            except (ValueError, KeyError, TypeError) as e:
                raise ConfigError(f"--keys {path}, line {n}: not a key entry ({e}); fix or delete it") from e
            if len(entry.sha256) != 64:
                raise ConfigError(f"--keys {path}, line {n}: sha256 must be 64 hex digits")
            entries.append(entry)
        if not entries:
            raise ConfigError(f"--keys {path} holds no keys; add one with `kontext keys new --file {path}`")
        return cls(entries)
