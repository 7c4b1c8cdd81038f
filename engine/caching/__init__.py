"""Step caching: per-edit caches the sampling loop consults each step (docs/caching.md).

spec.py: the one spec syntax (`NAME[:key=value,...]`, a preset, `off`) -> CacheSpec.
policies.py: the caches (first-block, MagCache on the residual or the velocity, TaylorSeer), one per edit.
stages.py: the split forward (embed, first block, rest, head) a residual cache needs from a backend.
ratios.py: MagCache's published magnitude ratios (Kontext, FLUX.1-dev).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .spec import (
    CACHE_OFF,
    PRESETS,
    CacheSpec,
    FbcConfig,
    MagCacheConfig,
    TaylorSeerConfig,
    parse_cache_spec,
)

if TYPE_CHECKING:
    from .policies import StepCache, check_cache, needs_stages, new_step_cache, refuse_unsplit
    from .stages import Embedded, ForwardStages, stages_of

# The spec is light (the CLI parses one before importing torch); the caches and stages import torch
# on first use.
_LAZY = {
    **dict.fromkeys(
        ("StepCache", "check_cache", "needs_stages", "new_step_cache", "refuse_unsplit"), "policies"
    ),
    **dict.fromkeys(("Embedded", "ForwardStages", "stages_of"), "stages"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "CACHE_OFF",
    "PRESETS",
    "CacheSpec",
    "Embedded",
    "FbcConfig",
    "ForwardStages",
    "MagCacheConfig",
    "StepCache",
    "TaylorSeerConfig",
    "check_cache",
    "needs_stages",
    "new_step_cache",
    "parse_cache_spec",
    "refuse_unsplit",
    "stages_of",
]
