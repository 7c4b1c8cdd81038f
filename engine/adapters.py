"""The diffusers adapter: our built engine as FluxKontextPipeline.transformer, with one call.

DenoiserTransformer is an nn.Module whose forward takes FluxTransformer2DModel.forward's keyword
arguments and calls a Denoiser; kontext_pipeline() builds a FluxKontextPipeline around it with the
loaded engine's other modules (nothing is monkeypatched).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image

from .backends import Denoiser
from .errors import ConfigError
from .request import EditRequest

if TYPE_CHECKING:
    from .runtime import KontextEngine

log = logging.getLogger(__name__)


class DenoiserTransformer(torch.nn.Module):
    """Looks like FluxTransformer2DModel to diffusers: `config`, `dtype`, `device`, forward(...)."""

    def __init__(
        self,
        denoiser: Denoiser,
        config: Any,
        *,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> None:
        super().__init__()
        self.denoiser = denoiser
        self.config = config  # the FluxTransformer2DModel's config (in_channels, guidance_embeds, ...)
        self._dtype = dtype
        self._device = torch.device(device)

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def device(self) -> torch.device:
        return self._device

    def forward(
        self,
        hidden_states: torch.Tensor,  # [B, N + M, 64]
        encoder_hidden_states: torch.Tensor | None = None,  # [B, L, D_txt]
        pooled_projections: torch.Tensor | None = None,  # [B, D_pooled]
        timestep: torch.Tensor | None = None,  # [B], sigma in [0, 1]
        img_ids: torch.Tensor | None = None,  # [N + M, 3]
        txt_ids: torch.Tensor | None = None,  # [L, 3]
        guidance: torch.Tensor | None = None,  # [B]
        joint_attention_kwargs: dict[str, Any] | None = None,
        controlnet_block_samples: Any = None,
        controlnet_single_block_samples: Any = None,
        return_dict: bool = True,
        controlnet_blocks_repeat: bool = False,
    ) -> Any:
        if joint_attention_kwargs or controlnet_block_samples is not None or controlnet_single_block_samples:
            raise ConfigError(
                "a built engine runs the plain transformer: joint_attention_kwargs (LoRA scale, "
                "IP-Adapter) and ControlNet residuals are not supported; use the torch backend"
            )
        if encoder_hidden_states is None or pooled_projections is None or timestep is None:
            raise ConfigError("encoder_hidden_states, pooled_projections and timestep are required")
        if img_ids is None or txt_ids is None:
            raise ConfigError("img_ids and txt_ids are required")
        if img_ids.ndim == 3:  # diffusers' deprecated batched ids: every row is the same
            img_ids = img_ids[0]
        if txt_ids.ndim == 3:
            txt_ids = txt_ids[0]
        if guidance is None:
            if self.config.guidance_embeds:
                raise ConfigError("this transformer embeds guidance: pass guidance ([B] float32)")
            guidance = torch.zeros(hidden_states.shape[0], dtype=torch.float32, device=hidden_states.device)
        out = self.denoiser(
            hidden_states,
            img_ids,
            encoder_hidden_states,
            txt_ids,
            pooled_projections,
            timestep,
            guidance.to(torch.float32),
        )
        out = out.to(hidden_states.dtype)
        if not return_dict:
            return (out,)
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        return Transformer2DModelOutput(sample=out)


def as_transformer(engine: KontextEngine) -> DenoiserTransformer:
    """The engine as a FluxTransformer2DModel stand-in; calls are dispatched (and counted) per call."""
    return DenoiserTransformer(
        engine.dispatcher.denoiser(),
        engine.components.transformer.config,
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
    from diffusers import FluxKontextPipeline

    if not engine.safety.off:
        log.warning(
            "kontext_pipeline: diffusers' pipeline skips the engine's safety policy (%s) and output "
            "metadata; use engine.edit and engine.outputs for outputs you share",
            ",".join(engine.safety.names),
        )
    c = engine.components
    return FluxKontextPipeline(
        scheduler=c.scheduler(),
        vae=c.vae,
        text_encoder=c.text_encoder,
        tokenizer=c.tokenizer,
        text_encoder_2=c.text_encoder_2,
        tokenizer_2=c.tokenizer_2,
        transformer=as_transformer(engine),
    )


def diffusers_call(request: EditRequest, max_sequence_length: int) -> dict[str, Any]:
    """The keywords of `FluxKontextPipeline.__call__` that run `request` as our pipeline does: at its
    size exactly (diffusers otherwise resizes the input to about 1024² and rounds the output through
    max_area), with its steps, guidance and seed (a CPU generator, as our noise). Used by the bench's
    diffusers baseline and by the parity tests, so both call diffusers the one way."""
    if request.size is None:
        raise ConfigError("calling diffusers like our pipeline needs an explicit output size (request.size)")
    if not isinstance(request.image, Image.Image):
        raise ConfigError("diffusers takes the input as pixels, not as an EncodedImage")
    w, h = request.size
    return {
        "image": request.image,
        "prompt": request.prompt,
        "height": h,
        "width": w,
        "max_area": w * h,
        "_auto_resize": False,
        "num_inference_steps": request.steps,
        "guidance_scale": request.guidance,
        "generator": torch.Generator("cpu").manual_seed(request.seed),
        "max_sequence_length": max_sequence_length,
    }
