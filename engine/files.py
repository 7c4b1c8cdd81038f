"""Atomic file writes: the one place that writes a file so a reader sees the old one or the new one.

Every writer in the package (manifests, plans, ONNX graphs, images, server results) goes through
`atomic_writer` or `atomic_write_bytes`: a temporary file beside the target, fsync, os.replace, then
an fsync of the directory so the rename survives a power cut. A SIGKILL at any point leaves at most
a `.NAME.*.tmp` file behind, never a half-written target.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

BytesLike = bytes | bytearray | memoryview  # anything with the buffer protocol f.write() takes

__all__ = ["atomic_write_bytes", "atomic_writer", "fsync_directory", "move_into_place"]


@contextmanager
def atomic_writer(path: str | os.PathLike[str], mode: int = 0o644) -> Iterator[BinaryIO]:
    """Yield a binary file whose contents replace `path` only when the block exits without error.

    `mode` is applied before the rename (mkstemp creates 0600 files).
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_directory(target.parent)


def atomic_write_bytes(path: str | os.PathLike[str], data: BytesLike) -> None:
    """Write `data` (bytes, or any buffer such as a memoryview of a TensorRT plan) to `path` atomically.

    A buffer is written as it is, without a copy into a new bytes object (a 12 GB plan stays 12 GB).
    """
    with atomic_writer(path) as f:
        f.write(data)


def move_into_place(tmp_dir: Path, dst_dir: Path, last: str | None = None) -> list[Path]:
    """Move every file of `tmp_dir` into `dst_dir`, each fsynced and renamed; `last` goes last.

    For outputs made of several files (an ONNX graph and its external data): the file readers open
    first (`last`, the graph) appears only once the files it points to are in place.
    """
    dst_dir.mkdir(parents=True, exist_ok=True)
    files = sorted(tmp_dir.iterdir(), key=lambda p: (p.name == last, p.name))
    moved: list[Path] = []
    for f in files:
        with open(f, "rb+") as fh:
            os.fsync(fh.fileno())
        target = dst_dir / f.name
        os.replace(f, target)
        moved.append(target)
    fsync_directory(dst_dir)
    return moved


def fsync_directory(directory: Path) -> None:
    """Make renames in `directory` durable (POSIX); a no-op where a directory cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
