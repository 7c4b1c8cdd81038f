"""TensorRT 10 weight streaming under a memory plan: a plan built with BuilderFlag.WEIGHT_STREAMING (on
a strongly typed network, which every plan here is) keeps `weight_streaming_budget_v2` bytes of its
weights on the card and streams the rest from host memory while it runs. The budget is set once per
deserialized engine, before any execution context exists; the engine's device memory then includes its
streaming scratch (`weight_streaming_scratch_memory_size`), which get_device_memory_size_for_profile_v2
reports.

The budget of a MemoryPlan: what the card's budget leaves after the heaviest phase's other bytes
(encoders, VAE, activations), so the transformer's weights and any phase fit together.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from ..errors import ManifestError

if TYPE_CHECKING:
    from ..memory.plan import MemoryPlan

log = logging.getLogger(__name__)


def enable_weight_streaming(config: Any, trt: Any) -> None:
    """The builder flag that makes a plan's weights streamable (TensorRT >= 10.0, strongly typed)."""
    config.set_flag(trt.BuilderFlag.WEIGHT_STREAMING)


def plan_weight_budget(plan: MemoryPlan) -> int | None:
    """Bytes of transformer weights a streamed plan may keep on the card; None: the plan keeps the
    transformer resident (no streaming)."""
    if not plan.levers.streamed:
        return None
    others = max(peak - plan.transformer_card_bytes for peak in plan.phases.values())
    return max(0, plan.budget_bytes - others)


def set_weight_budget(engine: Any, budget: int, path: str, rebuild: str) -> int:
    """Set a deserialized engine's weight streaming budget (before its contexts). A plan built without
    streamable weights is refused in one line that names the rebuild. Returns the budget set (at most
    the streamable size: more would keep every weight resident anyway)."""
    streamable = int(engine.streamable_weights_size)
    if streamable <= 0:
        raise ManifestError(
            f"{path} was built without weight streaming and the memory plan streams the transformer; "
            "rebuild with weight streaming (kontext build --weight-streaming), or give more --vram "
            f"(`{rebuild}`)"
        )
    budget = min(max(0, budget), streamable)
    engine.weight_streaming_budget_v2 = budget
    log.info(
        "%s: %.2f of %.2f GiB of weights on the card, scratch %.2f GiB",
        path,
        budget / 2**30,
        streamable / 2**30,
        int(engine.weight_streaming_scratch_memory_size) / 2**30,
    )
    return budget
