"""Model components: the seeded random synthetic presets, and the real model from a local path.

Synthetic presets are built offline from configs, tokenizers included. tiny and small draw their
weights on the CPU from a seeded generator (the same bytes on every run and machine); full is built
on the meta device and filled on the GPU (random_weights.py). The real FLUX.1 Kontext [dev] is
licence-gated, so it is only ever loaded from disk, safetensors only (checkpoints.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
import string
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch

from .config import PRESETS, ModelPreset
from .errors import WeightsError
from .random_weights import materialize_, parameter_bytes, require_room, scaled_init_

log = logging.getLogger(__name__)

HF_REPO = "black-forest-labs/FLUX.1-Kontext-dev"
CLIP_MAX_LENGTH = 77

# FlowMatchEulerDiscreteScheduler config of FLUX.1 Kontext [dev] (scheduler/scheduler_config.json).
SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}

DOWNLOAD_HINT = (
    f"The weights are licence-gated: accept the licence at https://huggingface.co/{HF_REPO}, then run "
    f"`huggingface-cli download {HF_REPO} --local-dir models/kontext-dev` and pass --model models/kontext-dev"
)


@dataclass
class Components:
    """Everything an edit needs besides the denoiser backend. Modules are in eval mode."""

    preset: ModelPreset
    transformer: Any  # diffusers FluxTransformer2DModel
    vae: Any  # diffusers AutoencoderKL
    text_encoder: Any  # transformers CLIPTextModel
    tokenizer: Any  # CLIPTokenizer
    text_encoder_2: Any  # transformers T5EncoderModel
    tokenizer_2: Any  # T5TokenizerFast
    weights_id: str  # fingerprint of the transformer weights (manifests refer to it)
    source: str  # preset name or local path

    def modules(self) -> Iterator[torch.nn.Module]:
        """The four weighted modules: transformer, VAE, CLIP, T5."""
        yield from (self.transformer, self.vae, self.text_encoder, self.text_encoder_2)

    def scheduler(self) -> Any:
        """A fresh diffusers scheduler with the Kontext config (only diffusers' own pipeline needs one)."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG)

    def diffusers_pipeline(self) -> Any:
        """diffusers' FluxKontextPipeline over these same modules (the parity peer and benchmark baseline)."""
        from diffusers import FluxKontextPipeline

        return FluxKontextPipeline(
            scheduler=self.scheduler(),
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            text_encoder_2=self.text_encoder_2,
            tokenizer_2=self.tokenizer_2,
            transformer=self.transformer,
        )


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
        from .checkpoints import load_local

        return load_local(path, dtype=dtype, device=dev)
    synthetic = ", ".join(n for n, p in PRESETS.items() if p.synthetic)
    raise WeightsError(f"{name!r} is neither a preset ({synthetic}) nor an existing path. {DOWNLOAD_HINT}")


# --------------------------------------------------------------------------- synthetic presets


def build_synthetic(preset: ModelPreset) -> Components:
    """All components of a "module"-init preset on the CPU in fp32, weights drawn from `preset.seed`.

    Deterministic, and the global RNG is left untouched.
    """
    if preset.init != "module":
        raise WeightsError(f"preset {preset.name!r} is built on its device: use load_components")
    tokenizer, tokenizer_2 = _preset_tokenizers(preset)
    with torch.random.fork_rng(devices=[]):
        modules = build_modules(preset, tokenizer, tokenizer_2, seed=preset.seed)
    for m in modules:
        m.eval().requires_grad_(False)
    return assemble(preset, modules, tokenizer, tokenizer_2, fingerprint_module(modules[0]))


def build_on_device(
    preset: ModelPreset, *, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cuda"
) -> Components:
    """All components of a synthetic preset built on the meta device, then materialized on `device` in
    `dtype` and filled there by random_weights.scaled_init_ (component i from seed + i). Nothing passes
    through host memory. Refuses, before allocating, a device that cannot hold it."""
    dev = torch.device(device)
    tokenizer, tokenizer_2 = _preset_tokenizers(preset)
    with torch.device("meta"):
        modules = build_modules(preset, tokenizer, tokenizer_2, seed=None)
    require_room(preset.name, parameter_bytes(modules, dtype), dev)
    for i, m in enumerate(modules):
        generator = torch.Generator(device=dev).manual_seed(preset.seed + i)
        scaled_init_(materialize_(m, dev, dtype), generator)
        m.eval().requires_grad_(False)
    log.info("built preset %s on %s in %s", preset.name, dev, dtype)
    return assemble(preset, modules, tokenizer, tokenizer_2, fingerprint_module(modules[0], sample=1024))


def _preset_tokenizers(preset: ModelPreset) -> tuple[Any, Any]:
    if preset.text is None:
        raise WeightsError(f"preset {preset.name!r} has no synthetic configuration; load it from a path")
    return build_tokenizers(clip_vocab=preset.text.clip_vocab, t5_vocab=preset.text.t5_vocab)


def build_modules(
    preset: ModelPreset, tokenizer: Any, tokenizer_2: Any, seed: int | None
) -> tuple[torch.nn.Module, ...]:
    """Transformer, VAE, CLIP and T5 of `preset`. seed: reseed the global RNG before each (seed + i);
    None (meta construction) leaves it alone."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    if preset.vae is None or preset.text is None:
        raise WeightsError(f"preset {preset.name!r} has no synthetic configuration; load it from a path")
    tc, vc, t = preset.text, preset.vae, preset.transformer
    if tc.clip_hidden != t.pooled_projection_dim:
        raise WeightsError(f"preset {preset.name!r}: CLIP hidden size must equal pooled_projection_dim")
    if tc.t5_d_model != t.joint_attention_dim:
        raise WeightsError(f"preset {preset.name!r}: T5 d_model must equal joint_attention_dim")

    def seeded(i: int) -> None:
        if seed is not None:
            torch.manual_seed(seed + i)

    seeded(0)
    transformer = FluxTransformer2DModel(**t.to_diffusers())
    seeded(1)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(vc.block_out_channels),
        up_block_types=("UpDecoderBlock2D",) * len(vc.block_out_channels),
        block_out_channels=vc.block_out_channels,
        layers_per_block=vc.layers_per_block,
        norm_num_groups=vc.norm_num_groups,
        latent_channels=vc.latent_channels,
        scaling_factor=vc.scaling_factor,
        shift_factor=vc.shift_factor,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    seeded(2)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=tc.clip_vocab or len(tokenizer),
            hidden_size=tc.clip_hidden,
            intermediate_size=tc.clip_hidden * 4,
            num_hidden_layers=tc.clip_layers,
            num_attention_heads=tc.clip_heads,
            max_position_embeddings=CLIP_MAX_LENGTH,
            projection_dim=t.pooled_projection_dim,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    seeded(3)
    text_encoder_2 = T5EncoderModel(
        T5Config(
            vocab_size=tc.t5_vocab or len(tokenizer_2),
            d_model=tc.t5_d_model,
            d_kv=tc.t5_d_model // tc.t5_heads,
            d_ff=tc.t5_d_ff,
            num_layers=tc.t5_layers,
            num_heads=tc.t5_heads,
            feed_forward_proj="gated-gelu",
            dropout_rate=0.0,
            pad_token_id=tokenizer_2.pad_token_id,
            eos_token_id=tokenizer_2.eos_token_id,
        )
    )
    return cast(tuple[torch.nn.Module, ...], (transformer, vae, text_encoder, text_encoder_2))


def assemble(
    preset: ModelPreset,
    modules: tuple[torch.nn.Module, ...],
    tokenizer: Any,
    tokenizer_2: Any,
    weights_id: str,
    source: str | None = None,
) -> Components:
    """Components from (transformer, VAE, CLIP, T5) and the two tokenizers; source: the preset's name
    unless given (a local path)."""
    transformer, vae, text_encoder, text_encoder_2 = modules
    return Components(
        preset=preset,
        transformer=transformer,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        weights_id=weights_id,
        source=source or preset.name,
    )


def build_tokenizers(clip_vocab: int | None = None, t5_vocab: int | None = None) -> tuple[Any, Any]:
    """Character-level CLIP (byte-level BPE, no merges) and T5 (unigram) tokenizers, built in memory.

    clip_vocab / t5_vocab: pad each vocabulary with never-produced `<|unusedN|>` / `<unusedN>` entries
    to that size (CLIP's start and end tokens stay last, at 49406 and 49407 for 49408, as in CLIP-L).
    The real T5 tokenizer has 32100 entries for 32128 embedding rows; ours fills all 32128.
    """
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer, T5Tokenizer  # T5Tokenizer is the fast (tokenizers) one in 5.x

    chars = sorted(ByteLevel.alphabet())  # GPT-2/CLIP byte-level alphabet: 256 printable characters
    vocab: dict[str, int] = {}
    for suffix in ("", "</w>"):
        for c in chars:
            vocab[c + suffix] = len(vocab)
    specials = ("<|startoftext|>", "<|endoftext|>")
    for i in range(_padding(len(vocab) + len(specials), clip_vocab, "CLIP")):
        vocab[f"<|unused{i}|>"] = len(vocab)
    for s in specials:
        vocab[s] = len(vocab)
    clip = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=CLIP_MAX_LENGTH)

    alphabet = string.ascii_letters + string.digits + string.punctuation
    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("▁" + c, -2.0) for c in alphabet]
    pieces += [(c, -3.0) for c in alphabet]
    pieces.append(("▁", -4.0))
    pieces += [(f"<unused{i}>", -1000.0) for i in range(_padding(len(pieces), t5_vocab, "T5"))]
    t5 = T5Tokenizer(vocab=pieces, extra_ids=0)
    return clip, t5


def _padding(have: int, want: int | None, which: str) -> int:
    if want is None:
        return 0
    if want < have:
        raise WeightsError(f"a {which} vocabulary of {want} is smaller than the {have} entries it needs")
    return want - have


# --------------------------------------------------------------------------- fingerprints


def source_signature(model: str | Path) -> str:
    """A cheap identity of what `load_components(model)` would load, without loading it.

    Synthetic presets: their configuration and seed plus the torch version (the weights are a pure
    function of those). Local paths: name, size and mtime of every file under the path. Used to skip a
    build that has nothing to do without importing diffusers or hashing weights.
    """
    name = str(model)
    if name in PRESETS and PRESETS[name].synthetic:
        return hashlib.sha256(f"{PRESETS[name]!r}|torch {torch.__version__}".encode()).hexdigest()[:16]
    path = Path(name).expanduser()
    if not path.exists():
        return "missing:" + name
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f.relative_to(path.parent)}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()[:16]


def fingerprint_module(module: torch.nn.Module, sample: int | None = None) -> str:
    """sha256 over every parameter and buffer: names, dtypes, shapes and bytes.

    sample None: all bytes (exact; for small models on the CPU). sample n: the first n elements of
    each tensor, gathered on its device and copied to the host once (a 12B model on a GPU: a second,
    not 24 GB through host memory).
    """
    items = sorted(module.state_dict().items())
    chunks = [
        (t.detach().reshape(-1) if sample is None else t.detach().reshape(-1)[:sample])
        .contiguous()
        .view(torch.uint8)
        for _, t in items
    ]
    data = torch.cat([c.to(chunks[0].device) for c in chunks]).cpu().numpy().tobytes() if chunks else b""
    h = hashlib.sha256()
    offset = 0
    for (name, t), c in zip(items, chunks, strict=True):
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(data[offset : offset + c.numel()])
        offset += c.numel()
    return h.hexdigest()[:16]


_SAMPLE_BYTES = 64 << 20


def fingerprint_files(files: list[Path]) -> str:
    """sha256 over each safetensors file's header (names, shapes, offsets), size and first 64 MiB.

    Hashing all 24 GB of a 12B checkpoint would cost a minute per load; the header, size and a
    leading sample change with any re-export, re-quantization or different checkpoint.
    """
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}".encode())
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = fh.read(min(n, 100 << 20))
            try:
                json.loads(header)
            except ValueError as e:
                raise WeightsError(f"{f} is not a valid safetensors file: {e}") from e
            h.update(header)
            h.update(fh.read(_SAMPLE_BYTES))
    return h.hexdigest()[:16]
