"""What an edit is made of (Components), the facts every loader shares (the Hugging Face repository,
the download command, the scheduler config), and fingerprints of weights.

The bottom of engine/model: it imports nothing else of the package. synthetic.py makes the presets'
random weights, checkpoints.py and bfl.py read and write files on disk, load.py picks between them.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import ModelPreset
from .safetensors_files import read_header

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
    f"`hf download {HF_REPO} --local-dir models/kontext-dev --exclude flux1-kontext-dev.safetensors "
    "--exclude ae.safetensors` and pass --model models/kontext-dev"
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


# --------------------------------------------------------------------------- fingerprints


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
        _, data_start = read_header(f)  # complete, or a WeightsError naming it
        h.update(f"{f.name}:{f.stat().st_size}".encode())
        with open(f, "rb") as fh:
            fh.seek(8)
            h.update(fh.read(data_start - 8))  # the header's bytes as stored
            h.update(fh.read(_SAMPLE_BYTES))
    return h.hexdigest()[:16]
