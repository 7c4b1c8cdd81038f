"""Random weights made on the target device: meta-built modules materialized there and filled by a
scaled initialisation that keeps bf16 activations sane through all 57 Flux blocks.

The rule (see docs/DESIGN-NOTES.md, "Weights and checkpoints"):
- Linear and Conv2d weights ~ N(0, gain / sqrt(fan_in)): a unit-variance input gives a unit-variance
  output, whatever the width. gain is 1, except the AdaLN modulation linears (MODULATION_GAIN: their
  outputs are residual gates, shifts and scales, kept small so 57 residual blocks add up slowly) and
  T5's query projection (1 / sqrt(d_kv): T5 does not scale its attention logits).
- biases ~ N(0, BIAS_STD); embeddings ~ N(0, 1); normalization weights 1 and biases 0.
- any other parameter is an error, so a library upgrade that adds one is noticed.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import cast

import torch
from torch import nn

from ..errors import BackendUnavailableError, WeightsError

MODULATION_GAIN = 0.5
BIAS_STD = 0.02
# An estimate, not yet measured (tests/test_full_preset.py logs the peak on a GPU): a 1024^2 VAE decode
# holds a few [1, 128, 1024, 1024] maps, the transformer 8,704 tokens x 3072 x a few.
WORKING_MEMORY_BYTES = 6 << 30
CPU_LIMIT_BYTES = 16 << 30  # bigger presets are for GPUs (a 12B edit on a CPU: hours, by FLOP count)

# Buffers that meta construction loses and `to_empty` leaves uninitialised, with how to remake them.
# Any other buffer is an error (see materialize_).
_BUFFER_RULES = {
    "embeddings.position_ids": lambda b: torch.arange(b.shape[-1], device=b.device).expand_as(b),  # CLIP
}


def parameter_bytes(modules: Iterable[nn.Module], dtype: torch.dtype) -> int:
    """Bytes the modules' parameters take in `dtype` (floating ones; ties counted once). Works on meta."""
    seen: set[int] = set()
    total = 0
    for m in modules:
        for p in m.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                size = dtype.itemsize if p.is_floating_point() else p.element_size()
                total += p.numel() * size
    return total


def require_room(what: str, need: int, device: torch.device) -> None:
    """Refuse, before anything is allocated, a device that cannot hold `need` bytes of weights plus the
    working memory of an edit. CUDA: the driver's free memory. CPU: a fixed cap (CPU_LIMIT_BYTES).
    what: a preset's name, or a sentence naming a checkpoint ("the checkpoint models/kontext-dev")."""
    gb = 1e9
    name = what if " " in what else f"the {what} preset"
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise BackendUnavailableError(f"{name} asks for {device}, but this machine has no CUDA GPU")
        free, _total = torch.cuda.mem_get_info(device)
        want = need + WORKING_MEMORY_BYTES
        if free < want:
            raise BackendUnavailableError(
                f"{name} needs {want / gb:.1f} GB free on {device} ({need / gb:.1f} GB of weights "
                f"+ {WORKING_MEMORY_BYTES / gb:.1f} GB to run an edit); it has {free / gb:.1f} GB free. "
                "Free the GPU, use a larger one, or pick --model small"
            )
    elif need > CPU_LIMIT_BYTES:
        raise BackendUnavailableError(
            f"{name} ({need / gb:.1f} GB of weights) runs on a CUDA GPU with "
            f"{(need + WORKING_MEMORY_BYTES) / gb:.0f} GB free, not on {device}; on a CPU use --model small"
        )


def materialize_(module: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """A meta-built module -> uninitialised storage on `device`, floating tensors in `dtype`.

    The cast happens on meta (free), so storage is allocated once, in its final dtype. Tied parameters
    stay tied (to_empty keeps Parameter objects). Buffers are remade by _BUFFER_RULES.
    """
    nn.Module.to(module, dtype=dtype)  # not diffusers' override, which warns about fp32 modules
    module.to_empty(device=device)
    remake_buffers_(module, device)
    return module


@torch.no_grad()
def remake_buffers_(module: nn.Module, device: torch.device) -> nn.Module:
    """Every buffer of a module whose parameters are already on `device` (materialized, or assigned from
    a checkpoint, where meta buffers remain) remade by _BUFFER_RULES."""
    for name, buf in list(module.named_buffers()):
        rule = next((r for suffix, r in _BUFFER_RULES.items() if name.endswith(suffix)), None)
        if rule is None:
            raise WeightsError(
                f"{type(module).__name__}.{name}: no rule to remake this buffer after meta init"
            )
        owner_name, _, attr = name.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        fresh = torch.empty(buf.shape, dtype=buf.dtype, device=device)
        owner._buffers[attr] = rule(fresh).contiguous() if buf.is_meta else buf.copy_(rule(buf))
    return module


@torch.no_grad()
def scaled_init_(model: nn.Module, generator: torch.Generator) -> nn.Module:
    """Fill every parameter of `model` in place by the rule above, one kernel per tensor, on its device."""
    filled: set[int] = set()
    for name, module in model.named_modules():
        own = [p for p in module.parameters(recurse=False) if id(p) not in filled]
        if not own:
            continue
        filled.update(id(p) for p in own)
        if isinstance(module, nn.Linear | nn.Conv2d):
            weight, bias = cast(torch.Tensor, module.weight), cast(torch.Tensor | None, module.bias)
            fan_in = weight.shape[1:].numel()  # in_features (x kernel size)
            weight.normal_(0.0, _gain(name, model) / math.sqrt(fan_in), generator=generator)
            if bias is not None:
                bias.normal_(0.0, BIAS_STD, generator=generator)
        elif isinstance(module, nn.Embedding):
            module.weight.normal_(0.0, 1.0, generator=generator)
        elif all(p.ndim == 1 for p in own):  # LayerNorm, GroupNorm, RMSNorm, T5LayerNorm: identity
            for pname, p in module.named_parameters(recurse=False):
                p.fill_(0.0 if pname == "bias" else 1.0)
        else:
            raise WeightsError(f"no initialisation rule for {type(module).__name__} {name!r}")
    return model


def _gain(name: str, model: nn.Module) -> float:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if type(parent).__name__.startswith("AdaLayerNorm"):  # diffusers' AdaLN-Zero / -Single / -Continuous
        return MODULATION_GAIN
    if type(parent).__name__ == "T5Attention" and child == "q":
        return 1.0 / math.sqrt(cast(int, parent.key_value_proj_dim))
    return 1.0
