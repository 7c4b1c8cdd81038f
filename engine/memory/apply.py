"""Putting a MemoryPlan into effect on loaded Components: FP8 storage, streamed blocks, T5 off the card,
the VAE tiled, everything else on the card. And the one-line refusals of what a plan cannot compose
with.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch

from ..errors import ConfigError
from .fp8_storage import store_fp8
from .plan import MemoryPlan
from .streaming import BlockStreamer, Transfer, stream_blocks
from .text_encoder import OffloadedEncoder
from .vae_tiling import tile_for, tile_vae

if TYPE_CHECKING:
    from ..model.components import Components

log = logging.getLogger(__name__)


def check_composes(
    plan: MemoryPlan,
    *,
    torch_mode: str = "eager",
    cuda_graphs: bool = False,
    context_parallel: int = 1,
    workers: int = 1,
) -> None:
    """Refuse, in one line, the levers a plan cannot run under (before any weight is loaded)."""
    if plan.levers.streamed and cuda_graphs:
        raise ConfigError(
            "CUDA graphs replay fixed weight addresses and a streamed plan moves the blocks every step: "
            "drop the graphs lever, or give --vram room for resident blocks"
        )
    if plan.levers.streamed and torch_mode == "fp8":
        raise ConfigError(
            "torch_mode fp8 (torchao's tensor subclasses) cannot be streamed; a streamed plan stores the "
            "blocks in FP8 itself: use torch_mode eager or compile"
        )
    if plan.levers.streamed and workers > 1:
        raise ConfigError(
            "a streamed plan runs one edit at a time (one set of blocks on the card): use workers=1"
        )
    if context_parallel > 1 and not plan.resident:
        raise ConfigError("context parallelism runs resident plans only: drop --context-parallel or --vram")


def apply_plan(
    components: Components,
    plan: MemoryPlan,
    device: str | torch.device,
    *,
    torchao_fp8: bool = False,
    transformer_levers: bool = True,
    transfer: Transfer | None = None,
    tracker: Callable[[str, int, int], None] | None = None,
) -> tuple[Components, BlockStreamer | None]:
    """Components placed as `plan` says (modules changed in place; T5 wrapped). torchao_fp8: the torch
    path quantizes the transformer itself (torch_mode fp8), so FP8 storage is skipped. transfer/tracker:
    the streamer's (tests pass a tracker; None: CUDA streams on a GPU, NoOpTransfer on a CPU).
    transformer_levers False: a TensorRT engine streams its own weights (tensorrt_streaming.py); the
    encoders' and VAE's levers still apply here."""
    dev = torch.device(device)
    lv = plan.levers
    transformer: Any = components.transformer
    if lv.fp8 and not torchao_fp8 and transformer_levers:
        store_fp8(transformer, "all", compute="fp8" if plan.fp8_compute else "bf16")
    streamer = None
    if lv.streamed and transformer_levers:
        for name in ("transformer_blocks", "single_transformer_blocks"):
            for block in getattr(transformer, name):
                torch.nn.Module.to(block, "cpu")  # the host copies; pinned by the streamer
        streamer = stream_blocks(
            transformer, dev, group=plan.stream_group or 1, transfer=transfer, tracker=tracker
        )
    torch.nn.Module.to(transformer, dev)  # the embedders and output head (streamed blocks stay put)
    t5: Any = components.text_encoder_2
    if lv.t5 != "resident":
        t5 = OffloadedEncoder(t5, lv.t5, dev)
    for module in (components.text_encoder, components.vae):
        torch.nn.Module.to(module, dev)
    if lv.vae_tiled:
        tile_vae(components.vae, tile_for(components.preset.bucket_family))
    if dev.type == "cuda":
        torch.cuda.empty_cache()  # what moved off the card goes back to the driver
    log.info("memory plan applied: %s", ", ".join(lv.names()) or "everything resident")
    return replace(components, transformer=transformer, text_encoder_2=t5), streamer
