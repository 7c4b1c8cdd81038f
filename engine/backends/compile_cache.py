"""A persistent torch.compile cache in a folder of the build (torch's "mega-cache").

`torch.compiler.save_cache_artifacts()` serializes what this process compiled (inductor's FX graph
cache, AOTAutograd's cache, Triton kernels, autotuning results) into one blob;
`load_cache_artifacts(blob)` in a fresh process fills the local caches from it, so compiling the same
graphs becomes a cache hit instead of code generation. The blob is tied to the torch version and the
GPU, which are part of its file name. Nothing here reads the environment: where inductor keeps its
own local cache is the caller's business (the CLI and the benchmark scripts may set it).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch

from ..files import atomic_write_bytes

log = logging.getLogger(__name__)


def cache_file(folder: Path) -> Path:
    """<folder>/torch-<version>-<gpu>.bin: one blob per torch version and device."""
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    tag = re.sub(r"[^a-z0-9.]+", "-", f"{torch.__version__}-{gpu}".lower()).strip("-")
    return folder / f"torch-{tag}.bin"


def load_compile_cache(folder: Path) -> bool:
    """Fill torch's compile caches from the folder's blob; False when there is none yet."""
    path = cache_file(folder)
    if not path.is_file():
        log.info("no compile cache at %s yet: this process compiles from scratch", path)
        return False
    info = torch.compiler.load_cache_artifacts(path.read_bytes())
    log.info("loaded compile cache %s (%s)", path, _describe(info))
    return True


def save_compile_cache(folder: Path) -> Path | None:
    """Write everything this process compiled to the folder's blob (atomically); None if nothing was."""
    saved = torch.compiler.save_cache_artifacts()
    if saved is None:
        log.info("nothing compiled in this process: compile cache not written")
        return None
    blob, info = saved
    path = cache_file(folder)
    atomic_write_bytes(path, blob)
    log.info("wrote compile cache %s, %d bytes (%s)", path, len(blob), _describe(info))
    return path


def _describe(info: object) -> str:
    artifacts = getattr(info, "artifacts", None)
    if not isinstance(artifacts, dict):
        return "no details"
    return ", ".join(f"{k}: {len(v)}" for k, v in artifacts.items() if v) or "empty"
