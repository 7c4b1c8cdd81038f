"""Review mode's hold: an output that passed the filters waits in a review folder, not at its target,
until a person approves it (moves it out). The server keeps its own store and calls `hold` the same way."""

from __future__ import annotations

import logging
from pathlib import Path

from ..errors import ConfigError
from ..files import atomic_write_bytes

log = logging.getLogger(__name__)

REVIEW_FOLDER = "review"


def default_review_dir(target: str | Path) -> Path:
    """`review/` beside the target: `out/cat.png` is held as `out/review/cat.png`."""
    return Path(target).parent / REVIEW_FOLDER


def hold(data: bytes, review_dir: str | Path, name: str) -> Path:
    """Write an encoded output into `review_dir` under `name` (atomically) and return its path."""
    if not name or Path(name).name != name or name in (".", ".."):
        raise ConfigError(f"a held output needs a plain file name, got {name!r}")
    path = Path(review_dir) / name
    atomic_write_bytes(path, data)
    log.info("held for review: %s", path)
    return path
