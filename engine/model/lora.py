"""LoRA files fused into the model at load: diffusers (peft) or kohya format, safetensors only.

Loaded through diffusers' Flux LoRA loader (which converts kohya keys and applies alpha / rank), fused
at each file's scale, then unloaded, so the transformer holds plain weights again: the torch backend,
the ONNX export and every build stage see one ordinary model. weights_id becomes a fingerprint of the
base weights, each LoRA file's sha256 and its scale, so a build made without them refuses to load.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..errors import ConfigError, WeightsError
from .components import Components

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoraSpec:
    """One LoRA file and the scale it is fused at (1.0: as trained)."""

    path: Path
    scale: float = 1.0

    def __post_init__(self) -> None:
        if not math.isfinite(self.scale):
            raise ConfigError(f"LoRA scale must be a finite number, got {self.scale} for {self.path}")

    @classmethod
    def parse(cls, text: str) -> LoraSpec:
        """ "PATH" or "PATH:SCALE". Only a number after the last colon is a scale, so a path that
        contains colons (C:\\lora.safetensors) stays whole."""
        head, sep, tail = text.rpartition(":")
        if sep and head:
            try:
                return cls(Path(head), float(tail))
            except ValueError:
                pass
        return cls(Path(text))


def read_lora(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a LoRA safetensors file. Anything else (a pickle .bin/.pt/.ckpt, or a file named
    .safetensors that is not one) is refused before a byte of it is deserialized."""
    from safetensors.torch import load_file

    if not path.is_file():
        raise WeightsError(f"LoRA {path}: no such file")
    if path.suffix != ".safetensors":
        raise WeightsError(
            f"LoRA {path}: only .safetensors LoRAs are loaded (never pickle, which can run code); "
            "convert it with safetensors.torch.save_file on a machine you trust"
        )
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        try:
            if not 2 <= n <= path.stat().st_size - 8:
                raise ValueError(f"header length {n} does not fit the file")
            json.loads(f.read(n))
        except ValueError as e:
            raise WeightsError(f"LoRA {path} is not a valid safetensors file ({e})") from e
    return load_file(str(path))


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def lora_weights_id(base_weights_id: str, specs: Sequence[LoraSpec], hashes: Sequence[str]) -> str:
    """Fingerprint of the fused weights: the base's, then each LoRA's file hash and scale, in order."""
    h = hashlib.sha256(base_weights_id.encode())
    for spec, digest in zip(specs, hashes, strict=True):
        h.update(f"|lora {digest} x {spec.scale!r}".encode())
    return h.hexdigest()[:16]


def fuse_loras(components: Components, specs: Sequence[LoraSpec]) -> Components:
    """Fuse each LoRA into the components' transformer (and CLIP, if the file has text-encoder layers)
    at its scale, then drop the adapters. Modifies the modules in place; returns the components with
    the new weights_id."""
    if not specs:
        return components
    pipe = components.diffusers_pipeline()  # the same module objects: loading into it loads into ours
    names = [f"lora_{i}" for i in range(len(specs))]
    hashes = []
    for spec, name in zip(specs, names, strict=True):
        state = read_lora(spec.path)
        hashes.append(file_sha256(spec.path))
        try:
            pipe.load_lora_weights(state, adapter_name=name)
        except (ValueError, KeyError, RuntimeError) as e:
            raise WeightsError(
                f"LoRA {spec.path} does not fit {components.source}'s transformer ({e}); is it a FLUX.1 "
                "LoRA in diffusers or kohya format?"
            ) from e
    pipe.set_adapters(names, adapter_weights=[s.scale for s in specs])
    pipe.fuse_lora(adapter_names=names, lora_scale=1.0)
    pipe.unload_lora_weights()  # fused weights stay; the peft layers go
    weights_id = lora_weights_id(components.weights_id, specs, hashes)
    log.info("fused %d LoRA(s) into %s: weights %s", len(specs), components.source, weights_id)
    return replace(components, weights_id=weights_id)
