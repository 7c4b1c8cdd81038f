"""DenoiserTransformer: a Denoiser as diffusers' FluxTransformer2DModel, a ModelMixin diffusers can drive.

Two kinds, one class:
- torch-backed ("stock"): the denoiser runs a stock FluxTransformer2DModel eagerly, and that module's
  children are the adapter's registered children under the same names (x_embedder,
  transformer_blocks.0.attn, ...). `.to()`, dtype changes, offload hooks, layerwise casting, attention
  processors and diffusers' cache hooks (whose name patterns are anchored at the root:
  "^transformer_blocks.*attn") act on the modules the denoiser runs, as they would on the stock model.
  save_pretrained writes the stock transformer folder (FluxTransformer2DModel.from_pretrained loads it);
  from_pretrained loads one back into an adapter.
- built (an ONNX Runtime or TensorRT engine, or a torch denoiser that runs something else: a compiled
  view, FP8 or fused-QKV Linears): no module diffusers may change. It runs, and refuses in one line,
  with a BackendUnavailableError saying what to load instead, what it cannot do: save, a dtype or device
  change, caches, attention processors, layerwise casting, offloading, LoRA scale, ControlNet residuals.
IP-Adapter is refused for both (diffusers loads it into the transformer's attention processors).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from diffusers.configuration_utils import ConfigMixin
from diffusers.models.attention import AttentionMixin
from diffusers.models.cache_utils import CacheMixin
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.modeling_utils import ModelMixin  # by this name here: see from_pretrained
from diffusers.models.transformers.transformer_flux import FluxTransformer2DModel

from ..backends import Denoiser
from ..backends.torch import TorchDenoiser, dtype_name
from ..errors import BackendUnavailableError, ConfigError

log = logging.getLogger(__name__)

__all__ = ["DenoiserTransformer", "ModelMixin"]

STOCK_HINT = (
    "load the engine with backend='torch', torch_mode='eager' and no levers, or use diffusers' transformer"
)
IP_ADAPTER_REFUSAL = (
    "IP-Adapter is not supported by the diffusers adapter (it swaps the transformer's attention processors "
    "and adds image projections our denoisers do not have); use diffusers' FluxTransformer2DModel"
)


class DenoiserTransformer(ModelMixin, ConfigMixin, CacheMixin, AttentionMixin):  # type: ignore[misc]
    """Looks like FluxTransformer2DModel to diffusers: config, dtype, device, forward(...), and the
    ModelMixin / CacheMixin / AttentionMixin methods FluxKontextPipeline and diffusers' tooling call.

    denoiser: what forward calls. config: the FluxTransformer2DModel's config (in_channels,
    guidance_embeds, ...). transformer: the stock module that `denoiser` runs eagerly, or None for a
    built engine, whose dtype and device are then fixed (`dtype`, `device`).
    """

    config_name = "config.json"  # type: ignore[assignment]
    _no_split_modules = FluxTransformer2DModel._no_split_modules
    _skip_layerwise_casting_patterns = FluxTransformer2DModel._skip_layerwise_casting_patterns
    _repeated_blocks = FluxTransformer2DModel._repeated_blocks

    def __init__(
        self,
        denoiser: Denoiser,
        config: Any,
        *,
        transformer: torch.nn.Module | None = None,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> None:
        super().__init__()
        self.register_to_config(**{k: v for k, v in dict(config).items() if not k.startswith("_")})
        self.denoiser = denoiser
        # The stock module itself stays unregistered; its children become ours (the same objects under
        # the same names), so hooks and name patterns written for FluxTransformer2DModel find them.
        object.__setattr__(self, "transformer", transformer)
        if transformer is not None:
            self._modules = dict(transformer._modules)
        self._fixed_dtype = dtype
        self._fixed_device = torch.device(device)

    @classmethod
    def from_module(cls, transformer: torch.nn.Module) -> DenoiserTransformer:
        """A torch-backed adapter over a stock FluxTransformer2DModel (our eager torch denoiser over it)."""
        dtype = next(transformer.parameters()).dtype
        denoiser = TorchDenoiser(transformer, name=f"torch-eager-{dtype_name(dtype)}")
        return cls(denoiser, transformer.config, transformer=transformer)

    @classmethod
    def from_pretrained(  # type: ignore[override]
        cls, pretrained_model_name_or_path: str | os.PathLike[str], **kwargs: Any
    ) -> DenoiserTransformer:
        """FluxTransformer2DModel.from_pretrained(...) (every keyword passed on), as an adapter.

        A pipeline saved with the adapter names this class in its model_index.json; diffusers picks the
        loader by looking `ModelMixin` up in this class's module, hence that name's import above."""
        model = FluxTransformer2DModel.from_pretrained(pretrained_model_name_or_path, **kwargs)
        return cls.from_module(model)

    # ------------------------------------------------------------------ what diffusers reads

    @property
    def stock(self) -> bool:
        """True: a stock torch module runs (diffusers may change it); False: a built engine."""
        return self.transformer is not None

    @property
    def dtype(self) -> torch.dtype:
        return super().dtype if self.stock else self._fixed_dtype  # type: ignore[no-any-return]

    @property
    def device(self) -> torch.device:
        return super().device if self.stock else self._fixed_device  # type: ignore[no-any-return]

    def refusal(self, what: str) -> BackendUnavailableError:
        """The one-line error of a built adapter asked for what only a torch module allows."""
        name = self.denoiser.name
        return BackendUnavailableError(f"the diffusers adapter over {name} cannot {what}; {STOCK_HINT}")

    def _need_stock(self, what: str) -> Any:
        """The stock module (a FluxTransformer2DModel), or the refusal to do `what` without one."""
        if self.transformer is None:
            raise self.refusal(what)
        return self.transformer

    # -------------------------------------------------------------- ModelMixin, CacheMixin, AttentionMixin

    def save_pretrained(  # type: ignore[override]
        self,
        save_directory: str | os.PathLike[str],
        is_main_process: bool = True,
        save_function: Any = None,
        safe_serialization: bool = True,
        variant: str | None = None,
        max_shard_size: int | str = "10GB",
        push_to_hub: bool = False,
        **kwargs: Any,
    ) -> None:
        """The stock module's save_pretrained: a FluxTransformer2DModel folder (its config names that
        class, its weights have its names), loadable without this package. Pipelines pass the keywords
        their save_pretrained finds in this signature (safe_serialization, variant, max_shard_size)."""
        module = self._need_stock("save_pretrained (a built engine has no diffusers weights to write)")
        module.save_pretrained(
            save_directory,
            is_main_process=is_main_process,
            save_function=save_function,
            safe_serialization=safe_serialization,
            variant=variant,
            max_shard_size=max_shard_size,
            push_to_hub=push_to_hub,
            **kwargs,
        )

    def to(self, *args: Any, **kwargs: Any) -> DenoiserTransformer:  # type: ignore[override]
        """Moves and casts the stock module's weights; a built adapter takes only its own device and dtype."""
        if self.stock:
            return super().to(*args, **kwargs)  # type: ignore[no-any-return]
        device, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
        if dtype is not None and dtype != self._fixed_dtype:
            raise self.refusal(f"change its dtype ({dtype_name(self._fixed_dtype)} to {dtype_name(dtype)})")
        if device is not None and not same_device(torch.device(device), self._fixed_device):
            raise self.refusal(f"move from {self._fixed_device} to {device}")
        return self

    def enable_cache(self, config: Any) -> None:
        """diffusers' caches (PyramidAttentionBroadcastConfig, FasterCacheConfig, FirstBlockCacheConfig,
        MagCacheConfig, TaylorSeerCacheConfig, ...), by diffusers' own hooks: the denoiser-level hook on
        this adapter, the block hooks on the blocks the eager denoiser runs."""
        self._need_stock("enable_cache (diffusers' cache hooks need the torch module's blocks)")
        super().enable_cache(config)

    def enable_layerwise_casting(self, *args: Any, **kwargs: Any) -> None:
        self._need_stock("enable_layerwise_casting")
        super().enable_layerwise_casting(*args, **kwargs)

    def enable_group_offload(self, *args: Any, **kwargs: Any) -> None:
        self._need_stock("enable_group_offload")
        super().enable_group_offload(*args, **kwargs)

    @property
    def attn_processors(self) -> dict[str, Any]:
        """The stock module's processors, under its names (transformer_blocks.0.attn.processor, ...)."""
        self._need_stock("expose attention processors")
        return super().attn_processors  # type: ignore[no-any-return]

    def set_attn_processor(self, processor: Any) -> None:
        self._need_stock("set_attn_processor")
        super().set_attn_processor(processor)

    def fuse_qkv_projections(self) -> None:
        self._need_stock("fuse_qkv_projections")
        super().fuse_qkv_projections()

    def _load_ip_adapter_weights(self, *args: Any, **kwargs: Any) -> None:
        """What FluxIPAdapterMixin.load_ip_adapter calls on the transformer: refused."""
        raise BackendUnavailableError(IP_ADAPTER_REFUSAL)

    # ------------------------------------------------------------------ forward

    def forward(
        self,
        hidden_states: torch.Tensor,  # [B, N + M, C]
        encoder_hidden_states: torch.Tensor | None = None,  # [B, L, D_txt]
        pooled_projections: torch.Tensor | None = None,  # [B, D_pooled]
        timestep: torch.Tensor | None = None,  # [B], sigma in [0, 1]
        img_ids: torch.Tensor | None = None,  # [N + M, 3]
        txt_ids: torch.Tensor | None = None,  # [L, 3]
        guidance: torch.Tensor | None = None,  # [B]; None when the model does not embed guidance
        joint_attention_kwargs: dict[str, Any] | None = None,
        controlnet_block_samples: Any = None,
        controlnet_single_block_samples: Any = None,
        return_dict: bool = True,
        controlnet_blocks_repeat: bool = False,
    ) -> Any:
        if joint_attention_kwargs and "ip_adapter_image_embeds" in joint_attention_kwargs:
            raise BackendUnavailableError(IP_ADAPTER_REFUSAL)
        if encoder_hidden_states is None or pooled_projections is None or timestep is None:
            raise ConfigError("encoder_hidden_states, pooled_projections and timestep are required")
        if img_ids is None or txt_ids is None:
            raise ConfigError("img_ids and txt_ids are required")
        if joint_attention_kwargs or controlnet_block_samples is not None or controlnet_single_block_samples:
            module = self._need_stock("take joint_attention_kwargs (LoRA scale) or ControlNet residuals")
            return module(  # inputs the Denoiser contract does not have: diffusers' own forward
                hidden_states=hidden_states,
                encoder_hidden_states=encoder_hidden_states,
                pooled_projections=pooled_projections,
                timestep=timestep,
                img_ids=img_ids,
                txt_ids=txt_ids,
                guidance=guidance,
                joint_attention_kwargs=joint_attention_kwargs,
                controlnet_block_samples=controlnet_block_samples,
                controlnet_single_block_samples=controlnet_single_block_samples,
                return_dict=return_dict,
                controlnet_blocks_repeat=controlnet_blocks_repeat,
            )
        if img_ids.ndim == 3:  # diffusers' deprecated batched ids: every row is the same
            img_ids = img_ids[0]
        if txt_ids.ndim == 3:
            txt_ids = txt_ids[0]
        if guidance is None:
            if self.config["guidance_embeds"]:
                raise ConfigError("this transformer embeds guidance: pass guidance ([B] float32)")
            # the Denoiser contract always has a guidance input; a model without the embedding ignores it
            guidance = torch.zeros(hidden_states.shape[0], dtype=torch.float32, device=hidden_states.device)
        out = self.denoiser(
            hidden_states,
            img_ids,
            encoder_hidden_states,
            txt_ids,
            pooled_projections,
            timestep,
            guidance.to(torch.float32),
        )  # [B, N + M, C]
        out = out.to(hidden_states.dtype)
        return Transformer2DModelOutput(sample=out) if return_dict else (out,)


def same_device(a: torch.device, b: torch.device) -> bool:
    """cuda and cuda:0 are one device here (an index only counts when both name one)."""
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)
