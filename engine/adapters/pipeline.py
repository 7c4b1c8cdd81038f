"""A loaded engine as diffusers' FluxKontextPipeline: our denoiser as its transformer, with one call.

as_transformer() wraps the engine's dispatcher in a DenoiserTransformer (transformer.py): a torch engine
that runs its stock transformer eagerly gives a full diffusers transformer (its module registered), any
other (ONNX Runtime, TensorRT, compiled or FP8 torch) a built one. kontext_pipeline() builds the
pipeline around it with the engine's other modules (nothing is monkeypatched).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING, Any

from ..backends.torch import TorchDenoiser
from .transformer import DenoiserTransformer

if TYPE_CHECKING:
    from ..runtime import KontextEngine

log = logging.getLogger(__name__)


def as_transformer(engine: KontextEngine) -> DenoiserTransformer:
    """The engine as a FluxTransformer2DModel stand-in; calls are dispatched (and counted) per call.

    Its transformer module is registered (a full diffusers transformer) only when the engine's denoiser
    runs that very module eagerly with no levers: then `.to()`, diffusers' hooks and save_pretrained act
    on what runs. The module is the engine's own: changing it through the pipeline changes the engine."""
    module = engine.components.transformer
    primary = engine.dispatcher.primary
    stock = isinstance(primary, TorchDenoiser) and primary.transformer is module and "+" not in primary.name
    return DenoiserTransformer(
        engine.dispatcher.denoiser(),
        module.config,
        transformer=module if stock else None,
        dtype=engine.dtype,
        device=engine.device,
    )


def kontext_pipeline(engine: KontextEngine) -> Any:
    """diffusers' FluxKontextPipeline with our engine as its transformer and the engine's own VAE,
    text encoders, tokenizers and scheduler config. One call; nothing patched.

    Unchecked: this is diffusers' pipeline, not KontextEngine.edit. Its calls skip the engine's safety
    policy (no prompt, input or output filters, no review hold) and its images carry no metadata, AI
    disclosure or C2PA signature (engine.outputs). It is for comparing against diffusers and for diffusers
    tooling; under the real model's licence, run the filters yourself (engine.safety.check_request and
    check_output) and write files with engine.outputs, or use engine.edit. A warning is logged when the
    engine's policy is not off.
    """
    if not engine.safety.off:
        log.warning(
            "kontext_pipeline: diffusers' pipeline skips the engine's safety policy (%s) and output "
            "metadata; use engine.edit and engine.outputs for outputs you share",
            ",".join(engine.safety.names),
        )
    # the engine's components with the adapter as transformer, through the one place that builds
    # diffusers' pipeline from components (Components.diffusers_pipeline)
    return dataclasses.replace(engine.components, transformer=as_transformer(engine)).diffusers_pipeline()
