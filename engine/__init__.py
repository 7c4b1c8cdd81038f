"""Kontext engine: build and run FLUX.1 Kontext [dev] fast. Importing this module does no work.

Usage: `with engine.load("build/tiny") as kontext: result = kontext.edit(image, "add a red hat", seed=0)`,
or `kontext.edit(engine.EditRequest.of(image, "add a red hat", seed=0))`; result.image is the PIL image,
result.timings the seconds per stage. load() takes a build folder, a preset name or a local weights path.
"""

from __future__ import annotations

import importlib
from typing import Any

from . import noise
from .version import __version__ as __version__

noise.install()  # drop torchao's, torch's and diffusers' known noise lines (engine/noise.py says which)

# The public API: each name and the module it lives in (imported on first use). __init__.pyi repeats
# them for type checkers, which cannot read this table; tests/test_public_api.py holds the two equal.
_LAZY = {
    "load": "runtime",
    "KontextEngine": "runtime",
    "kontext_pipeline": "adapters",
    "DenoiserTransformer": "adapters",
    "EditRequest": "request",
}

__all__ = sorted([*_LAZY, "__version__"])


def __getattr__(name: str) -> Any:
    """Import the public API on first use (torch and diffusers are heavy). Its types are in __init__.pyi
    (the lazy_loader convention), so the package imports no module but version.py and noise.py (logging
    filters), not even for type checking: every module may import the package without a cycle."""
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
