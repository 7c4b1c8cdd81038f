"""Context parallelism: one edit's transformer forward split over N processes (docs/context-parallel.md).

sharding.py: the per-rank half (token layout, the attention processor that gathers keys and values).
rank.py: what every rank runs (its process group, one call's step, a worker's command loop).
launcher.py: rank 0 (the Denoiser the pipeline calls, spawning and stopping workers, failures, refusals).
"""

from __future__ import annotations

from .launcher import (
    ContextParallelDenoiser,
    RankFailedError,
    check_context_parallel,
    context_parallel_denoiser,
)
from .sharding import (
    ContextParallelAttnProcessor,
    Group,
    Layout,
    install_processors,
    shard_inputs,
    split_sizes,
)

__all__ = [
    "ContextParallelAttnProcessor",
    "ContextParallelDenoiser",
    "Group",
    "Layout",
    "RankFailedError",
    "check_context_parallel",
    "context_parallel_denoiser",
    "install_processors",
    "shard_inputs",
    "split_sizes",
]
