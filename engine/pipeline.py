"""KontextPipeline: text encoders + VAE + the sampling loop + a Denoiser. No backend branches here."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from PIL import Image
from tqdm.auto import tqdm

from . import sampling
from .backends import Denoiser
from .buckets import ShapeKey, nearest_bucket, shape_key
from .config import EditSettings
from .images import resize_to, to_pil, to_tensor
from .prompt_cache import PromptCache, weights_fingerprint
from .weights import CLIP_MAX_LENGTH, Components

log = logging.getLogger(__name__)


@dataclass
class EditResult:
    """The edited image and what it took."""

    image: Image.Image
    latents: torch.Tensor  # [B, N, 64] final packed latents (before VAE decode)
    bucket: tuple[int, int]  # (w, h) the context image was resized to
    size: tuple[int, int]  # (w, h) of the output
    shape_key: ShapeKey
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage
    step_times: list[float] = field(default_factory=list)  # seconds per denoising step
    backend: str = ""  # name of the denoiser that ran (an engine, or the torch fallback of a miss)


@dataclass(frozen=True)
class PreparedEdit:
    """Everything the denoising loop needs for one edit (the output of `prepare`)."""

    img: torch.Tensor  # [B, N, 64] noise
    img_ids: torch.Tensor  # [N, 3], index 0
    ctx: torch.Tensor  # [B, M, 64] context latents
    ctx_ids: torch.Tensor  # [M, 3], index 1
    txt: torch.Tensor  # [B, L, D_txt]
    txt_ids: torch.Tensor  # [L, 3]
    vec: torch.Tensor  # [B, D_pooled]
    schedule: sampling.Schedule
    bucket: tuple[int, int]
    size: tuple[int, int]

    @property
    def shape_key(self) -> ShapeKey:
        return ShapeKey(self.img.shape[0], self.img.shape[1], self.ctx.shape[1], self.txt.shape[1])


class KontextPipeline:
    """One edit = encode prompt, encode context image, denoise with `denoiser`, decode.

    The denoiser is any callable of the Denoiser contract (torch, ONNX Runtime, TensorRT...).
    Thread safety: the pipeline holds no per-edit state; the encoders run under inference_mode
    and the denoiser decides its own model (see backends).
    """

    def __init__(
        self,
        components: Components,
        denoiser: Denoiser,
        *,
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
        bucket_family: str | None = None,
        prompt_cache: PromptCache | None = None,
    ) -> None:
        """bucket_family: where input images are bucketed (default: the preset's). An engine built for
        another family (say 0.25 MP edits of the 1 MP model) passes its own.
        prompt_cache: shared across pipelines (an engine makes one pipeline per edit); None: no cache."""
        self.components = components
        self.prompt_cache = prompt_cache
        self._bucket_family = bucket_family or components.preset.bucket_family
        self.denoiser = denoiser
        self.device = torch.device(device)
        self.dtype = dtype

    @property
    def bucket_family(self) -> str:
        return self._bucket_family

    # ------------------------------------------------------------------ encoders

    @torch.inference_mode()
    def encode_prompt(self, prompt: str, batch: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """prompt -> T5 states [B, L, D_txt], CLIP pooled [B, D_pooled], text ids [L, 3].

        With a prompt cache, a prompt already encoded by the same text-encoder weights (same tokens,
        dtype and device) skips T5 and CLIP and gets the same tensors back.
        """
        c = self.components
        if self.prompt_cache is None:
            txt, vec = self._encode(prompt)
        else:
            fingerprint = weights_fingerprint(c.text_encoder, c.text_encoder_2)
            key = (prompt, fingerprint, c.preset.max_sequence_length, self.dtype, str(self.device))
            txt, vec = self.prompt_cache.get_or_compute(key, lambda: self._encode(prompt))
        txt = txt.repeat(batch, 1, 1)  # [B, L, D_txt]
        vec = vec.repeat(batch, 1)  # [B, D_pooled]
        return txt, vec, sampling.text_ids(txt.shape[1], self.device)

    def _encode(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Run CLIP and T5 -> T5 states [1, L, D_txt], CLIP pooled [1, D_pooled], in the pipeline's dtype."""
        c = self.components
        clip_ids = c.tokenizer(
            [prompt], padding="max_length", max_length=CLIP_MAX_LENGTH, truncation=True, return_tensors="pt"
        ).input_ids
        vec = c.text_encoder(clip_ids.to(self.device), output_hidden_states=False).pooler_output
        t5_ids = c.tokenizer_2(
            [prompt],
            padding="max_length",
            max_length=c.preset.max_sequence_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        txt = c.text_encoder_2(t5_ids.to(self.device), output_hidden_states=False)[0]
        return txt.to(self.dtype), vec.to(self.dtype)

    @torch.inference_mode()
    def encode_image(self, image: Image.Image, batch: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """RGB image already at its bucket size -> context tokens [B, M, 64] and ids [M, 3] (index 1)."""
        vae = self.components.vae
        pixels = to_tensor(image).to(self.device, self.dtype)  # [1, 3, H, W] in [-1, 1]
        latents = vae.encode(pixels).latent_dist.mode()  # [1, 16, H/8, W/8]
        latents = (latents - vae.config.shift_factor) * vae.config.scaling_factor
        ctx = sampling.pack(latents).repeat(batch, 1, 1)
        return ctx, sampling.image_ids(image.height, image.width, index=1, device=self.device)

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor, size: tuple[int, int]) -> Image.Image:
        """Packed latents [1, N, 64] of an image of `size` (w, h) -> PIL image."""
        vae = self.components.vae
        x = sampling.unpack(latents, height=size[1], width=size[0])
        x = x / vae.config.scaling_factor + vae.config.shift_factor
        return to_pil(vae.decode(x.to(self.dtype), return_dict=False)[0])

    # ------------------------------------------------------------------ the edit

    def prepare(
        self, image: Image.Image, prompt: str, settings: EditSettings, timings: dict[str, float] | None = None
    ) -> PreparedEdit:
        """Bucket the image, encode prompt and image, draw noise, build the schedule."""
        timings = {} if timings is None else timings
        bucket = nearest_bucket(image.width, image.height, self.bucket_family)
        size = settings.size or bucket
        with self._timed(timings, "text_encode"):
            txt, vec, txt_ids = self.encode_prompt(prompt)
        with self._timed(timings, "vae_encode"):
            ctx, ctx_ids = self.encode_image(resize_to(image, bucket))
        img = sampling.get_noise(1, size[1], size[0], settings.seed, self.dtype, self.device)
        img_ids = sampling.image_ids(size[1], size[0], index=0, device=self.device)
        schedule = sampling.get_schedule(settings.steps, img.shape[1], self.device)
        return PreparedEdit(img, img_ids, ctx, ctx_ids, txt, txt_ids, vec, schedule, bucket, size)

    def edit(
        self,
        image: Image.Image,
        prompt: str,
        settings: EditSettings | None = None,
        *,
        progress: bool = True,
        callback: sampling.StepCallback | None = None,
    ) -> EditResult:
        """Edit `image` as `prompt` says. Output size: the input's bucket unless settings.size is set."""
        settings = settings or EditSettings()
        timings: dict[str, float] = {}
        t_start = time.perf_counter()
        p = self.prepare(image, prompt, settings, timings)
        key = shape_key(p.size, p.bucket, p.txt.shape[1])
        step_times: list[float] = []
        bar = tqdm(
            total=settings.steps, desc=f"denoise {p.size[0]}x{p.size[1]}", disable=not progress, leave=False
        )
        last = [time.perf_counter()]

        def on_step(i: int, n: int, latents: torch.Tensor) -> None:
            self._sync()
            now = time.perf_counter()
            step_times.append(now - last[0])
            last[0] = now
            bar.update()
            if callback is not None:
                callback(i, n, latents)

        with self._timed(timings, "denoise"), torch.inference_mode():
            latents = sampling.denoise(
                self.denoiser,
                p.img,
                p.img_ids,
                p.ctx,
                p.ctx_ids,
                p.txt,
                p.txt_ids,
                p.vec,
                p.schedule,
                settings.guidance,
                on_step,
            )
        bar.close()
        with self._timed(timings, "vae_decode"):
            out = self.decode(latents, p.size)
        timings["total"] = time.perf_counter() - t_start
        log.info(
            "edit %dx%d, %d steps, %.2fs (%s)", *p.size, settings.steps, timings["total"], self.denoiser.name
        )
        return EditResult(out, latents, p.bucket, p.size, key, timings, step_times, self.denoiser.name)

    # ------------------------------------------------------------------ timing

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextmanager
    def _timed(self, timings: dict[str, float], stage: str) -> Iterator[None]:
        self._sync()
        t0 = time.perf_counter()
        yield
        self._sync()
        timings[stage] = time.perf_counter() - t0
