"""`load_components(model)`: a preset name or a local path -> Components, and `source_signature`, the
cheap identity of what it would load (the build's no-op fast path). The top of engine/model."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from ..config import PRESETS
from ..errors import WeightsError
from .checkpoints import load_local, source_files
from .components import DOWNLOAD_HINT, Components
from .synthetic import build_on_device, build_synthetic


def load_components(
    model: str | Path, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> Components:
    """A preset name (tiny, small, full) or a local path to a Kontext checkpoint -> Components on `device`.

    A path may be a diffusers-format folder, or a BFL single-file transformer (flux1-kontext-dev.safetensors)
    inside a diffusers folder that provides the VAE and text encoders (checkpoints.load_local).
    """
    name = str(model)
    dev = torch.device(device)
    preset = PRESETS.get(name)
    if preset is not None:
        if not preset.synthetic:
            raise WeightsError(f"the {name} preset needs a local path to its weights. {DOWNLOAD_HINT}")
        if preset.init == "scaled":
            return build_on_device(preset, dtype=dtype, device=dev)
        comps = build_synthetic(preset)
        for m in comps.modules():
            torch.nn.Module.to(m, device=dev, dtype=dtype)  # not diffusers' override: it warns
        return comps
    path = Path(name).expanduser()
    if path.exists():
        return load_local(path, dtype=dtype, device=dev)
    synthetic = ", ".join(n for n, p in PRESETS.items() if p.synthetic)
    raise WeightsError(f"{name!r} is neither a preset ({synthetic}) nor an existing path. {DOWNLOAD_HINT}")


def source_signature(model: str | Path) -> str:
    """A cheap identity of what `load_components(model)` would load, without loading it.

    Synthetic presets: their configuration and seed plus the torch version (the weights are a pure
    function of those). Local paths: name, size and mtime of every file the load reads
    (checkpoints.source_files: a BFL file with the folder's encoders, VAE and tokenizers; a folder
    without the BFL file and ae.safetensors it never opens). Used to skip a build that has nothing to do
    without importing diffusers or hashing weights.
    """
    name = str(model)
    if name in PRESETS and PRESETS[name].synthetic:
        return hashlib.sha256(f"{PRESETS[name]!r}|torch {torch.__version__}".encode()).hexdigest()[:16]
    path = Path(os.path.abspath(Path(name).expanduser()))  # K, K/ and ./K: one signature
    if not path.exists():
        return "missing:" + name
    root = path.parent if path.is_file() else path
    h = hashlib.sha256()
    for f in source_files(path):
        st = f.stat()  # through a cache snapshot's symlinks: the blob's size and mtime
        h.update(f"{f.relative_to(root)}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()[:16]
