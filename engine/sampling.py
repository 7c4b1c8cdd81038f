"""The Kontext sampling loop as plain functions: ids, packing, noise, schedule, denoise, unpack.

Names follow BFL's flux/sampling.py (get_noise, get_schedule, denoise, unpack) so a reader can
diff against the reference; numerics follow diffusers' FluxKontextPipeline exactly (a parity
test holds them together). Only the `denoiser` callable changes between backends.

Each function that mirrors diffusers says which in a `# Mirrors diffusers FILE::NAME (v0.42)` line;
tests/test_parity.py calls each named diffusers function and compares.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from .buckets import MULTIPLE

if TYPE_CHECKING:
    from .caching import StepCache

LATENT_CHANNELS = 16

# Called like backends.Denoiser (keyword tensors in, velocity out); that protocol is in a layer above.
DenoiseFn = Callable[..., torch.Tensor]
StepCallback = Callable[[int, int, torch.Tensor], None]  # (step index, steps, latents)


@dataclass(frozen=True)
class Schedule:
    """Sigmas from 1 down to 0 (steps + 1 values) and the timesteps the transformer sees."""

    sigmas: torch.Tensor  # [steps + 1] float32, last = 0
    timesteps: torch.Tensor  # [steps] float32, sigma * 1000 (diffusers' scheduler.timesteps)
    mu: float

    @property
    def steps(self) -> int:
        return int(self.timesteps.shape[0])


# Mirrors diffusers pipelines/flux/pipeline_flux_kontext.py::FluxKontextPipeline._pack_latents (v0.42)
def pack(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] latents -> [B, H/2 * W/2, C * 4] tokens (2x2 patches, channel-major)."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2)
    x = x.permute(0, 2, 4, 1, 3, 5)  # [B, H/2, W/2, C, 2, 2]
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


# Mirrors diffusers pipelines/flux/pipeline_flux_kontext.py::FluxKontextPipeline._unpack_latents (v0.42)
def unpack(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[B, N, C * 4] tokens of an image of `height` x `width` pixels -> [B, C, H/8, W/8] latents."""
    b, _, c4 = x.shape
    h, w = height // MULTIPLE, width // MULTIPLE  # token grid
    x = x.view(b, h, w, c4 // 4, 2, 2)
    x = x.permute(0, 3, 1, 4, 2, 5)  # [B, C, h, 2, w, 2]
    return x.reshape(b, c4 // 4, h * 2, w * 2)


# Mirrors diffusers pipelines/flux/pipeline_flux_kontext.py::FluxKontextPipeline._prepare_latent_image_ids (v0.42)  # noqa: E501
# with the index set as FluxKontextPipeline.prepare_latents does (image_ids[..., 0] = 1 for the context)
def image_ids(height: int, width: int, index: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Position ids [h * w, 3] of an image of height x width pixels: (index, row, col) per token.

    index is 0 for the target image and 1 for the context image (Kontext's only change to Flux ids).
    """
    h, w = height // MULTIPLE, width // MULTIPLE
    ids = torch.zeros(h, w, 3)
    ids[..., 0] = index
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None, :]
    return ids.reshape(h * w, 3).to(device)


# Mirrors diffusers pipelines/flux/pipeline_flux_kontext.py::FluxKontextPipeline.encode_prompt (v0.42)
# (its text_ids: zeros)
def text_ids(tokens: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Text position ids [L, 3]: all zeros in Flux."""
    return torch.zeros(tokens, 3, device=device)


# Mirrors diffusers pipelines/flux/pipeline_flux_kontext.py::FluxKontextPipeline.prepare_latents (v0.42)
# (randn_tensor on a CPU generator, then _pack_latents)
def get_noise(
    batch: int, height: int, width: int, seed: int, dtype: torch.dtype, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Seeded starting noise, packed: [B, (H/16) * (W/16), 64].

    Drawn on the CPU generator as [B, 16, H/8, W/8] and then packed, as diffusers does with a
    CPU generator, so an edit is reproducible on any device.
    """
    g = torch.Generator("cpu").manual_seed(seed)
    shape = (batch, LATENT_CHANNELS, 2 * (height // MULTIPLE), 2 * (width // MULTIPLE))
    return pack(torch.randn(shape, generator=g, dtype=dtype)).to(device)


def get_noise_for_seeds(
    seeds: Sequence[int], height: int, width: int, dtype: torch.dtype, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Starting noise of a batch, one per seed: [len(seeds), N, 64], row i = get_noise(1, ..., seeds[i]).

    One generator per seed (as diffusers does with a list of generators): a single draw of batch B from
    one generator would continue seed's stream, so image i would not be the single edit with seed + i.
    """
    return torch.cat([get_noise(1, height, width, s, dtype, device) for s in seeds], dim=0)


# Mirrors diffusers pipelines/flux/pipeline_flux_kontext.py::calculate_shift (v0.42)
def calculate_shift(
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """mu of the resolution-dependent shift: linear in the TARGET token count (256 -> 0.5, 4096 -> 1.15)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * m + (base_shift - m * base_seq_len)


# Mirrors diffusers pipelines/flux/pipeline_flux_kontext.py::retrieve_timesteps (v0.42)
# with sigmas linspace(1, 1/steps, steps), i.e.
# schedulers/scheduling_flow_match_euler_discrete.py::FlowMatchEulerDiscreteScheduler.set_timesteps
def get_schedule(steps: int, target_tokens: int, device: torch.device | str = "cpu") -> Schedule:
    """Sigmas linspace(1, 1/steps, steps), time-shifted by mu(target tokens), then 0 appended.

    Computed in float32 numpy exactly as FlowMatchEulerDiscreteScheduler.set_timesteps does.
    """
    mu = calculate_shift(target_tokens)
    s = np.linspace(1.0, 1.0 / steps, steps).astype(np.float32)
    s = math.exp(mu) / (math.exp(mu) + (1.0 / s - 1.0) ** 1.0)
    sigmas = torch.from_numpy(np.asarray(s, dtype=np.float32)).to(device)
    timesteps = sigmas * 1000.0
    sigmas = torch.cat([sigmas, torch.zeros(1, device=device)])
    return Schedule(sigmas=sigmas, timesteps=timesteps, mu=mu)


def denoise(
    denoiser: DenoiseFn,
    img: torch.Tensor,
    img_ids: torch.Tensor,
    ctx: torch.Tensor,
    ctx_ids: torch.Tensor,
    txt: torch.Tensor,
    txt_ids: torch.Tensor,
    vec: torch.Tensor,
    schedule: Schedule,
    guidance: float,
    callback: StepCallback | None = None,
    cache: StepCache | None = None,
) -> torch.Tensor:
    """Euler integration of the rectified flow from noise (sigma 1) to the image (sigma 0).

    img: [B, N, 64] noise; ctx: [B, M, 64] context tokens; txt: [B, L, D]; vec: [B, P] pooled.
    Each step the transformer sees img (+) ctx and the velocity of the first N tokens is kept.
    cache: this edit's step cache (engine/caching), which decides each step whether the transformer
    runs; None: it runs every step (the same code as before caching existed).
    Returns the final latents [B, N, 64] in the dtype of the denoiser's output.
    """
    b, n = img.shape[0], img.shape[1]
    ids = torch.cat([img_ids, ctx_ids], dim=0)  # [N + M, 3]
    guidance_vec = torch.full((b,), guidance, dtype=torch.float32, device=img.device)  # [B]
    steps = schedule.steps
    for i in range(steps):
        t = schedule.timesteps[i]
        timestep = t.expand(b).to(img.dtype) / 1000  # [B]
        inputs = {
            "hidden_states": torch.cat([img, ctx], dim=1),  # [B, N + M, 64]
            "img_ids": ids,
            "encoder_hidden_states": txt,
            "txt_ids": txt_ids,
            "pooled_projections": vec,
            "timestep": timestep,
            "guidance": guidance_vec,
        }
        # [B, N, 64]
        v = denoiser(**inputs)[:, :n] if cache is None else cache.velocity(i, denoiser, inputs, n)
        dt = schedule.sigmas[i + 1] - schedule.sigmas[i]
        img = (img.to(torch.float32) + dt * v).to(v.dtype)
        if callback is not None:
            callback(i, steps, img)
    return img
