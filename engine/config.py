"""Frozen configuration: the edit defaults, model presets (tiny, small, full, kontext-dev) and load options.

Nothing here reads the environment or argv; engine/cli/ turns user input into these objects.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, Literal

from .errors import ConfigError

# Each default of an edit, defined here once and used by the CLI, the server, the bench and engine.load.
DEFAULT_STEPS = 28  # diffusers' FluxKontextPipeline (BFL's CLI uses 30)
SYNTHETIC_STEPS = 8  # the random-weight presets gain nothing past 8
DEFAULT_GUIDANCE = 2.5  # the model card and BFL's CLI (diffusers defaults to 3.5)
DEFAULT_PROMPT = "add a small red hat"  # what `kontext edit` and `kontext bench` run when given none
DTYPES = ("fp32", "bf16")  # what the torch path's weights may be in (LoadOptions.dtype, --dtype)
# What LoadOptions takes; the backends, the torch path and the dispatcher import these names from here.
BACKENDS: tuple[str, ...] = ("torch", "onnxruntime", "tensorrt")
TORCH_MODES: tuple[str, ...] = ("eager", "compile", "fp8")
MISS_POLICIES: tuple[str, ...] = ("error", "torch")  # a shape no artifact serves: refuse, or run torch


@dataclass(frozen=True)
class TransformerConfig:
    """Arguments of diffusers' FluxTransformer2DModel (Kontext uses in_channels 64 and guidance embeds)."""

    num_layers: int  # double-stream blocks
    num_single_layers: int  # single-stream blocks
    attention_head_dim: int
    num_attention_heads: int
    joint_attention_dim: int  # T5 hidden size
    pooled_projection_dim: int  # CLIP pooled size
    axes_dims_rope: tuple[int, int, int]
    in_channels: int = 64
    patch_size: int = 1
    guidance_embeds: bool = True

    @property
    def hidden_size(self) -> int:
        return self.attention_head_dim * self.num_attention_heads

    def to_diffusers(self) -> dict[str, object]:
        return {
            "patch_size": self.patch_size,
            "in_channels": self.in_channels,
            "num_layers": self.num_layers,
            "num_single_layers": self.num_single_layers,
            "attention_head_dim": self.attention_head_dim,
            "num_attention_heads": self.num_attention_heads,
            "joint_attention_dim": self.joint_attention_dim,
            "pooled_projection_dim": self.pooled_projection_dim,
            "guidance_embeds": self.guidance_embeds,
            "axes_dims_rope": list(self.axes_dims_rope),
        }

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any]) -> TransformerConfig:
        """The inverse of to_diffusers: a diffusers transformer/config.json (other keys ignored).
        axes_dims_rope defaults to diffusers' (16, 56, 56): FLUX.1-dev's older config omits it."""
        names = [f.name for f in fields(cls)]  # the same names as diffusers' arguments
        config = {"axes_dims_rope": (16, 56, 56), **config}
        missing = [n for n in names if n not in config]
        if missing:
            raise ConfigError(f"a Flux transformer config needs {', '.join(missing)}")
        values = {n: config[n] for n in names}
        values["axes_dims_rope"] = tuple(values["axes_dims_rope"])
        return cls(**values)


@dataclass(frozen=True)
class VaeConfig:
    """A Flux-style AutoencoderKL: 16 latent channels, 8x downsampling, shift and scale factors."""

    block_out_channels: tuple[int, ...]
    layers_per_block: int
    norm_num_groups: int
    latent_channels: int = 16
    scaling_factor: float = 0.3611
    shift_factor: float = 0.1159


@dataclass(frozen=True)
class TextEncoderConfig:
    """Sizes of the random CLIP and T5 encoders of the synthetic presets.

    CLIP's MLP is 4x its width and T5's head size d_model / heads, as in CLIP-L and T5-v1.1-XXL.
    Vocabulary sizes None: the in-memory tokenizers' own (a few hundred characters); set, the
    tokenizers are padded to them (weights.build_tokenizers) and the embeddings sized to match.
    """

    clip_hidden: int
    clip_layers: int
    clip_heads: int
    t5_d_model: int
    t5_layers: int
    t5_heads: int
    t5_d_ff: int
    clip_vocab: int | None = None  # CLIP-L: 49408 (tokenizer and embedding)
    t5_vocab: int | None = None  # T5-v1.1: 32128 embedding rows, 32100 tokenizer pieces


@dataclass(frozen=True)
class ModelPreset:
    """A complete model: synthetic presets carry configs and a seed, real ones are loaded from disk.

    `init` says how a synthetic preset's random weights are made (model/synthetic.py):
    - "module": each module's own initialisation, run on the CPU in fp32 from `seed`, then moved
      and cast. Exact and portable (the same bytes on every machine); for small presets.
    - "scaled": built on the meta device, materialized on the target device in the target dtype,
      and filled there by the fan-in scaled rule of model/random_weights.py (a 12B model never touches
      host memory). The bytes depend on the device's random generator.
    """

    name: str
    transformer: TransformerConfig
    bucket_family: str  # the default family of buckets (see buckets.FAMILIES)
    max_sequence_length: int  # T5 tokens per prompt
    vae: VaeConfig | None = None  # None: loaded from disk
    text: TextEncoderConfig | None = None  # None: loaded from disk
    seed: int = 0  # seed of the random weights (synthetic presets)
    init: Literal["module", "scaled"] = "module"
    default_steps: int = DEFAULT_STEPS  # what an edit naming no steps runs (loading.default_steps)

    @property
    def synthetic(self) -> bool:
        return self.vae is not None


KONTEXT_DEV_TRANSFORMER = TransformerConfig(
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    axes_dims_rope=(16, 56, 56),
)

PRESETS: dict[str, ModelPreset] = {
    # Every component present, a few thousand parameters each: CI-sized.
    "tiny": ModelPreset(
        name="tiny",
        transformer=TransformerConfig(
            num_layers=1,
            num_single_layers=2,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=32,
            pooled_projection_dim=32,
            axes_dims_rope=(4, 6, 6),
        ),
        vae=VaeConfig(block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4),
        text=TextEncoderConfig(
            clip_hidden=32, clip_layers=2, clip_heads=2, t5_d_model=32, t5_layers=2, t5_heads=2, t5_d_ff=64
        ),
        bucket_family="tiny",
        max_sequence_length=32,
        seed=0,
        default_steps=SYNTHETIC_STEPS,
    ),
    # ~70M transformer parameters (hidden 512, 4 double + 8 single blocks): on a CPU the
    # transformer dominates the edit, so backend comparisons mean something.
    "small": ModelPreset(
        name="small",
        transformer=TransformerConfig(
            num_layers=4,
            num_single_layers=8,
            attention_head_dim=64,
            num_attention_heads=8,
            joint_attention_dim=256,
            pooled_projection_dim=64,
            axes_dims_rope=(8, 28, 28),
        ),
        vae=VaeConfig(block_out_channels=(16, 16, 32, 32), layers_per_block=1, norm_num_groups=8),
        text=TextEncoderConfig(
            clip_hidden=64, clip_layers=2, clip_heads=2, t5_d_model=256, t5_layers=2, t5_heads=4, t5_d_ff=512
        ),
        bucket_family="small",
        max_sequence_length=128,
        seed=0,
        default_steps=SYNTHETIC_STEPS,
    ),
    # Every component at the real FLUX.1 Kontext [dev] size (16.9B parameters, 33.7 GB in bf16),
    # seeded random weights built on the GPU: the real model's cost and numerics without the gated
    # weights. Its images are noise. Sizes: BFL's flux util.py "flux-dev-kontext" and ae_params,
    # google/t5-v1_1-xxl and openai/clip-vit-large-patch14 (tests/test_full_preset.py checks them).
    "full": ModelPreset(
        name="full",
        transformer=KONTEXT_DEV_TRANSFORMER,
        vae=VaeConfig(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32),
        text=TextEncoderConfig(
            clip_hidden=768,
            clip_layers=12,
            clip_heads=12,
            t5_d_model=4096,
            t5_layers=24,
            t5_heads=64,
            t5_d_ff=10240,
            clip_vocab=49408,
            t5_vocab=32128,
        ),
        bucket_family="1mp",
        max_sequence_length=512,
        seed=0,
        init="scaled",
    ),
    # The real 12B model, loaded from a local path (see model/load.py and model/checkpoints.py).
    "kontext-dev": ModelPreset(
        name="kontext-dev",
        transformer=KONTEXT_DEV_TRANSFORMER,
        bucket_family="1mp",
        max_sequence_length=512,
    ),
}


def is_synthetic(model: str) -> bool:
    """A random-weight preset (tiny, small, full): no licence duties, so safety is off by default."""
    return model in PRESETS and PRESETS[model].synthetic


def parse_vram(value: float | str | None) -> float | str | None:
    """The one rule for a card's memory: None, "auto", or a positive number of GiB (also as text: "24",
    "15.5"), as a float. LoadOptions, `--vram` and `kontext plan` all read it here."""
    if value is None or value == "auto":
        return value
    try:
        gib = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"vram must be a number of GiB or 'auto', got {value!r}") from None
    if isinstance(value, bool) or not gib > 0:
        raise ConfigError(f"vram must be a positive number of GiB, got {value!r}")
    return gib


@dataclass(frozen=True)
class LoadOptions:
    """How runtime.load builds an engine; passed down once, to the backend's loader.

    backend: torch | onnxruntime | tensorrt (None: the build's backend, or torch for a preset/path).
    precision: the build's artifact (None: the first listed). device: None: cuda for TensorRT or when
    torch sees a GPU, else cpu. miss_policy: error | torch. workers: concurrent edits. threads: ONNX
    Runtime intra-op threads. torch_mode: eager | compile | fp8. plan_memory_budget: bytes of TensorRT
    plans kept loaded (None: 80% of the GPU's memory); plans of other families are evicted LRU.
    dtype: fp32 | bf16 of the torch path's weights (None: bf16 on CUDA, fp32 on a CPU; bf16 pays on CPUs
    with AMX or AVX512-BF16). context_parallel: processes each torch forward is split over
    (engine/distributed; 1: off). vram: plan memory for a card of this many GiB (2^30 bytes), or "auto"
    (the device's own); None: no plan, everything on the device (engine/memory, docs/memory.md).
    cache: the step cache of every edit that names none (engine/caching; `NAME[:key=value,...]` or a
    preset; None or "off": no cache).
    """

    backend: str | None = None
    precision: str | None = None
    device: str | None = None
    miss_policy: str = "error"
    workers: int = 1
    threads: int | None = None
    torch_mode: str = "eager"
    plan_memory_budget: int | None = None
    dtype: str | None = None
    context_parallel: int = 1
    vram: float | str | None = None
    cache: str | None = None  # the engine's default step cache (engine/caching spec); None: off

    def __post_init__(self) -> None:
        """Every check of a load's options, here once: runtime.load, the engine and the dispatcher
        trust them."""
        if self.backend is not None and self.backend not in BACKENDS:
            raise ConfigError(f"backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.torch_mode not in TORCH_MODES:
            raise ConfigError(f"torch_mode must be one of {', '.join(TORCH_MODES)}, got {self.torch_mode!r}")
        if self.miss_policy not in MISS_POLICIES:
            raise ConfigError(
                f"miss_policy must be one of {', '.join(MISS_POLICIES)}, got {self.miss_policy!r}"
            )
        if self.cache is not None:
            from .caching import parse_cache_spec

            parse_cache_spec(self.cache)  # one line ConfigError on a bad spec, before any weights
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.context_parallel < 1:
            raise ConfigError(
                f"context_parallel must be 1 (off) or more processes, got {self.context_parallel}"
            )
        if self.workers < 1:
            raise ConfigError(f"workers must be at least 1, got {self.workers}")
        if self.threads is not None and self.threads < 0:
            raise ConfigError(f"threads must be >= 0 (0: ONNX Runtime's default), got {self.threads}")
        object.__setattr__(self, "vram", parse_vram(self.vram))  # GiB as a float, or "auto"
        if self.plan_memory_budget is not None and self.plan_memory_budget <= 0:
            raise ConfigError(f"plan_memory_budget must be positive bytes, got {self.plan_memory_budget}")
