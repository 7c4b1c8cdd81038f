"""Model components: the seeded random synthetic presets, and the real model from a local path.

Synthetic presets (tiny, small) are built offline from configs, tokenizers included, with
weights drawn from a seeded generator: the same bytes on every run and machine. The real
FLUX.1 Kontext [dev] is licence-gated, so it is only ever loaded from disk (safetensors only).
"""

from __future__ import annotations

import hashlib
import json
import logging
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch

from .config import PRESETS, ModelPreset, get_preset
from .errors import WeightsError

log = logging.getLogger(__name__)

HF_REPO = "black-forest-labs/FLUX.1-Kontext-dev"
BFL_FILE = "flux1-kontext-dev.safetensors"
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

_DOWNLOAD_HINT = (
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
    """A preset name (tiny, small) or a local path to FLUX.1 Kontext [dev] -> Components.

    A path may be a diffusers-format folder, or BFL's single `flux1-kontext-dev.safetensors`
    lying inside (or beside) a diffusers folder that provides the VAE and text encoders.
    """
    name = str(model)
    path = Path(name).expanduser()
    if name in ("tiny", "small"):
        comps = build_synthetic(get_preset(name))
    elif name == "kontext-dev":
        raise WeightsError(f"the kontext-dev preset needs a local path to its weights. {_DOWNLOAD_HINT}")
    elif path.exists():
        comps = _load_local(path, dtype)
    else:
        raise WeightsError(
            f"{name!r} is neither a preset (tiny, small) nor an existing path. {_DOWNLOAD_HINT}"
        )
    for m in (comps.transformer, comps.vae, comps.text_encoder, comps.text_encoder_2):
        m.to(device=device)
        if comps.preset.synthetic and dtype != torch.float32:
            m.to(dtype=dtype)
    return comps


# --------------------------------------------------------------------------- synthetic presets


def build_synthetic(preset: ModelPreset) -> Components:
    """All components of a synthetic preset, weights drawn from `preset.seed`. Deterministic."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    if preset.vae is None or preset.text is None:
        raise WeightsError(f"preset {preset.name!r} has no synthetic configuration; load it from a path")
    tc, vc = preset.text, preset.vae
    tokenizer, tokenizer_2 = build_tokenizers()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(preset.seed)
        transformer = FluxTransformer2DModel(**preset.transformer.to_diffusers())
        torch.manual_seed(preset.seed + 1)
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
        torch.manual_seed(preset.seed + 2)
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                hidden_size=tc.clip_hidden,
                intermediate_size=tc.clip_hidden * 4,
                num_hidden_layers=tc.clip_layers,
                num_attention_heads=tc.clip_heads,
                max_position_embeddings=CLIP_MAX_LENGTH,
                projection_dim=preset.transformer.pooled_projection_dim,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
        torch.manual_seed(preset.seed + 3)
        text_encoder_2 = T5EncoderModel(
            T5Config(
                vocab_size=len(tokenizer_2),
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
    if tc.clip_hidden != preset.transformer.pooled_projection_dim:
        raise WeightsError(f"preset {preset.name!r}: CLIP hidden size must equal pooled_projection_dim")
    if tc.t5_d_model != preset.transformer.joint_attention_dim:
        raise WeightsError(f"preset {preset.name!r}: T5 d_model must equal joint_attention_dim")
    modules = cast(tuple[torch.nn.Module, ...], (transformer, vae, text_encoder, text_encoder_2))
    for m in modules:
        m.eval().requires_grad_(False)
    return Components(
        preset=preset,
        transformer=transformer,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        weights_id=fingerprint_module(modules[0]),
        source=preset.name,
    )


def _bytes_to_unicode() -> list[str]:
    """GPT-2/CLIP byte-level alphabet: 256 printable characters, one per byte."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    extra = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return [chr(c) for c in cs]


def build_tokenizers() -> tuple[Any, Any]:
    """Character-level CLIP (byte-level BPE, no merges) and T5 (unigram) tokenizers, built in memory."""
    from transformers import CLIPTokenizer, T5Tokenizer  # T5Tokenizer is the fast (tokenizers) one in 5.x

    chars = _bytes_to_unicode()
    vocab: dict[str, int] = {}
    for suffix in ("", "</w>"):
        for c in chars:
            vocab[c + suffix] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    clip = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=CLIP_MAX_LENGTH)

    alphabet = string.ascii_letters + string.digits + string.punctuation
    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("▁" + c, -2.0) for c in alphabet]
    pieces += [(c, -3.0) for c in alphabet]
    pieces.append(("▁", -4.0))
    t5 = T5Tokenizer(vocab=pieces, extra_ids=0)
    return clip, t5


# --------------------------------------------------------------------------- real model


def _load_local(path: Path, dtype: torch.dtype) -> Components:
    from diffusers import FluxKontextPipeline, FluxTransformer2DModel

    preset = get_preset("kontext-dev")
    if path.is_file():
        if path.suffix != ".safetensors":
            raise WeightsError(
                f"{path}: only .safetensors checkpoints are loaded (never pickle). {_DOWNLOAD_HINT}"
            )
        folder = path.parent
        if not (folder / "model_index.json").exists():
            raise WeightsError(
                f"{path} holds only the transformer; put it inside the diffusers folder of {HF_REPO} "
                f"(which provides the VAE and text encoders). {_DOWNLOAD_HINT}"
            )
        transformer = FluxTransformer2DModel.from_single_file(
            str(path), config=str(folder), subfolder="transformer", torch_dtype=dtype, local_files_only=True
        )
        files = [path]
    else:
        folder = path
        if not (folder / "model_index.json").exists():
            raise WeightsError(
                f"{folder} is not a diffusers model folder (no model_index.json). {_DOWNLOAD_HINT}"
            )
        transformer = None
        files = sorted((folder / "transformer").glob("*.safetensors"))
        if not files:
            raise WeightsError(f"{folder}/transformer has no .safetensors files. {_DOWNLOAD_HINT}")
    kwargs: dict[str, Any] = {"torch_dtype": dtype, "local_files_only": True, "use_safetensors": True}
    if transformer is not None:
        kwargs["transformer"] = transformer
    try:
        pipe = FluxKontextPipeline.from_pretrained(str(folder), **kwargs)
    except (OSError, ValueError) as e:
        raise WeightsError(f"could not load {folder}: {e}. {_DOWNLOAD_HINT}") from e
    for m in (pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
        m.eval().requires_grad_(False)
    return Components(
        preset=preset,
        transformer=pipe.transformer,
        vae=pipe.vae,
        text_encoder=pipe.text_encoder,
        tokenizer=pipe.tokenizer,
        text_encoder_2=pipe.text_encoder_2,
        tokenizer_2=pipe.tokenizer_2,
        weights_id=fingerprint_files(files),
        source=str(path.resolve()),
    )


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


def fingerprint_module(module: torch.nn.Module) -> str:
    """sha256 over every parameter and buffer (names, dtypes, shapes, bytes). Exact, for small models."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
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
