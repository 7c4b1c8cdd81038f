"""Incremental, atomic stages: skip a stage when its input hash and its files on disk match the manifest.

A stage's input hash covers its upstream files' sha256 and the settings it depends on. Its outputs
appear under their final names only when whole (temporary name + rename), and the manifest that
records them is written after them, so a build killed at any point leaves nothing a later run accepts.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from ..manifest import Stage, sha256_file

log = logging.getLogger(__name__)

TEMP_PREFIXES = (".export-", ".quantize-", ".compile-")


def input_hash(inputs: Mapping[str, Any]) -> str:
    """sha256 of a JSON-able description of everything a stage depends on."""
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()


def file_record(root: Path, rel: str) -> tuple[str, list[int]]:
    st = (root / rel).stat()
    return sha256_file(root / rel), [st.st_size, st.st_mtime_ns]


def outputs_intact(root: Path, stage: Stage) -> bool:
    """Every output the stage recorded exists with its recorded sha256 (size + mtime as a fast path)."""
    for rel in stage.outputs:
        path = root / rel
        if not path.is_file():
            return False
        recorded = stage.output_sha256.get(rel)
        if recorded is None:
            return False
        st = path.stat()
        if stage.output_stat.get(rel) == [st.st_size, st.st_mtime_ns]:
            continue
        if sha256_file(path) != recorded:
            log.warning("%s changed on disk since it was built; its stage runs again", rel)
            return False
    return True


T = TypeVar("T")


@dataclass(frozen=True)
class StageResult(Generic[T]):
    """A stage's record, whether it ran, and what its work returned besides its files (None: skipped)."""

    stage: Stage
    ran: bool
    value: T | None = None


def run_stage(
    name: str,
    root: Path,
    inputs: Mapping[str, Any],
    previous: Stage | None,
    force: bool,
    work: Callable[[], tuple[Sequence[Path], T]],
    still_valid: bool = True,
) -> StageResult[T]:
    """Run `work` (which returns the files it wrote and its value) unless `previous` matches; return the
    stage record and the value."""
    key = input_hash(inputs)
    if (
        not force
        and still_valid
        and previous is not None
        and previous.inputs == key
        and outputs_intact(root, previous)
    ):
        log.info("stage %s: up to date", name)
        return StageResult(previous, ran=False)
    why = "forced" if force else ("new" if previous is None else "inputs or files changed")
    log.info("stage %s: running (%s)", name, why)
    t0 = time.perf_counter()
    files, value = work()
    rels = tuple(str(Path(f).relative_to(root)) for f in files)
    records = {rel: file_record(root, rel) for rel in rels}
    seconds = time.perf_counter() - t0
    log.info("stage %s: done in %.1fs", name, seconds)
    stage = Stage(
        inputs=key,
        seconds=round(seconds, 3),
        outputs=rels,
        output_sha256={r: v[0] for r, v in records.items()},
        output_stat={r: v[1] for r, v in records.items()},
    )
    return StageResult(stage, ran=True, value=value)


@contextmanager
def build_lock(root: Path) -> Iterator[None]:
    """One build per folder at a time (a second one waits); leftovers of killed builds are removed once
    the lock is held. The lock dies with its process, so a killed build never blocks the next."""
    root.mkdir(parents=True, exist_ok=True)
    fd = os.open(root / ".lock", os.O_CREAT | os.O_RDWR, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.warning("another build is writing %s; waiting for it (its stages will then be reused)", root)
            fcntl.flock(fd, fcntl.LOCK_EX)
        remove_leftovers(root)
        yield
    finally:
        os.close(fd)


def remove_leftovers(root: Path) -> list[Path]:
    """Temporary files and folders of interrupted builds (never a file under a final name)."""
    removed: list[Path] = []
    for path in sorted(root.rglob(".*")):
        if path.name == ".lock" or not path.exists():
            continue
        if path.is_dir() and path.name.startswith(TEMP_PREFIXES):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
        elif path.is_file() and path.name.endswith(".tmp"):
            path.unlink(missing_ok=True)
            removed.append(path)
    if removed:
        log.info("removed %d leftovers of an interrupted build", len(removed))
    return removed


def rename_stage(root: Path, stages: dict[str, Stage], old: str, new: str, files: Mapping[str, str]) -> None:
    """Record a stage of an older build under its new name and its files under their new paths (a hard
    link: same bytes, sha256 and mtime), so a renamed stage is reused, not silently run again. The old
    files stay: the old manifest, until the next one replaces it, still names them."""
    stage = stages.pop(old, None)
    if stage is None or new in stages:
        return
    for rel_old, rel_new in files.items():
        src, dst = root / rel_old, root / rel_new
        if src.is_file() and not dst.exists():
            try:
                os.link(src, dst)
            except OSError:
                shutil.copy2(src, dst)
    moved = {rel: files.get(rel, rel) for rel in stage.outputs}
    stages[new] = Stage(
        inputs=stage.inputs,
        seconds=stage.seconds,
        outputs=tuple(moved[r] for r in stage.outputs),
        output_sha256={moved[r]: v for r, v in stage.output_sha256.items() if r in moved},
        output_stat={moved[r]: v for r, v in stage.output_stat.items() if r in moved},
    )
    log.info("stage %s: adopted from the build's %r stage (renamed)", new, old)
