"""KontextPipeline: text encoders + VAE + the sampling loop + a Denoiser. No backend branches here.

One edit: the input image (pixels, or latents a previous edit produced), up to 3 reference images,
one prompt, and one or more seeds (a batch through the denoiser).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from PIL import Image
from tqdm.auto import tqdm

from . import sampling
from .backends import Denoiser
from .buckets import MAX_REFERENCES, ShapeKey, buckets, nearest_bucket, reference_bucket
from .config import EditSettings
from .errors import BucketError, ConfigError
from .images import resize_to, to_pil, to_tensor
from .model.components import CLIP_MAX_LENGTH, Components
from .prompt_cache import PromptCache, weights_fingerprint
from .references import DEFAULT_PLACEMENT, check_placement, context_ids

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EncodedImage:
    """An input image already in the context's space: packed VAE latents, shifted and scaled, at a
    bucket of the pipeline's family. A previous edit's `EditResult.encoded()` is one; feeding it back
    skips the VAE decode, the 8-bit rounding and the VAE encode of a re-encoded output."""

    tokens: torch.Tensor  # [1, N, 64]
    size: tuple[int, int]  # (w, h) in pixels

    @property
    def width(self) -> int:
        return self.size[0]

    @property
    def height(self) -> int:
        return self.size[1]


@dataclass
class EditResult:
    """The edited image(s) and what it took. One seed: `image`; several: `images`, one per seed."""

    image: Image.Image  # images[0]
    latents: torch.Tensor  # [B, N, 64] final packed latents (before VAE decode), one row per seed
    bucket: tuple[int, int]  # (w, h) the context image was resized to
    size: tuple[int, int]  # (w, h) of the output
    shape_key: ShapeKey
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage
    step_times: list[float] = field(default_factory=list)  # seconds per denoising step
    backend: str = ""  # name of the denoiser that ran (an engine, or the torch fallback of a miss)
    images: list[Image.Image] = field(default_factory=list)  # one per seed; [image] when not given
    seeds: list[int] = field(default_factory=list)  # the seed of each image
    references: list[tuple[int, int]] = field(default_factory=list)  # (w, h) bucket of each reference

    def __post_init__(self) -> None:
        if not self.images:
            self.images = [self.image]

    def encoded(self, index: int = 0) -> EncodedImage:
        """Image `index`'s final latents as the next edit's input (see EncodedImage)."""
        return EncodedImage(self.latents[index : index + 1], self.size)


def combine_results(results: Sequence[EditResult]) -> EditResult:
    """Single-seed results of the same edit run one after another -> one result with every image."""
    first = results[0]
    timings: dict[str, float] = {}
    for r in results:
        for stage, seconds in r.timings.items():
            timings[stage] = timings.get(stage, 0.0) + seconds
    return EditResult(
        first.image,
        torch.cat([r.latents for r in results], dim=0),
        first.bucket,
        first.size,
        first.shape_key,
        timings,
        [t for r in results for t in r.step_times],
        first.backend,
        images=[im for r in results for im in r.images],
        seeds=[s for r in results for s in r.seeds],
        references=first.references,
    )


@dataclass(frozen=True)
class PreparedEdit:
    """Everything the denoising loop needs for one edit (the output of `prepare`)."""

    img: torch.Tensor  # [B, N, 64] noise
    img_ids: torch.Tensor  # [N, 3], index 0
    ctx: torch.Tensor  # [B, M, 64] context latents: the input image, then each reference
    ctx_ids: torch.Tensor  # [M, 3], index >= 1 (see references.py)
    txt: torch.Tensor  # [B, L, D_txt]
    txt_ids: torch.Tensor  # [L, 3]
    vec: torch.Tensor  # [B, D_pooled]
    schedule: sampling.Schedule
    bucket: tuple[int, int]
    size: tuple[int, int]
    seeds: tuple[int, ...] = (0,)
    references: tuple[tuple[int, int], ...] = ()  # (w, h) bucket of each reference image

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

    def context_bucket(self, image: Image.Image | EncodedImage) -> tuple[int, int]:
        """The bucket of the input image: its nearest in the family; an EncodedImage's own size, which
        must be one of the family's buckets (an edit's output at size=None is)."""
        if isinstance(image, EncodedImage):
            if image.size not in buckets(self.bucket_family):
                raise BucketError(
                    f"encoded input {image.width}x{image.height} is not a bucket of family "
                    f"{self.bucket_family}; edit at size=None (the input's bucket) to chain latents"
                )
            return image.size
        return nearest_bucket(image.width, image.height, self.bucket_family)

    @torch.inference_mode()
    def encode_context(
        self,
        image: Image.Image | EncodedImage,
        bucket: tuple[int, int],
        references: Sequence[Image.Image] = (),
        placement: str = DEFAULT_PLACEMENT,
        batch: int = 1,
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[tuple[int, int], ...]]:
        """The input image at `bucket`, then each reference at its reference bucket -> context tokens
        [B, M, 64], their ids [M, 3] and the references' buckets. No references: encode_image's path."""
        if isinstance(image, EncodedImage):
            ctx = image.tokens.to(self.device, self.dtype).repeat(batch, 1, 1)  # [B, N_ctx, 64]
            ids = sampling.image_ids(image.height, image.width, index=1, device=self.device)
        else:
            ctx, ids = self.encode_image(resize_to(image, bucket), batch)
        if not references:
            return ctx, ids, ()
        ref_buckets = tuple(
            reference_bucket(r.width, r.height, self.bucket_family, len(references)) for r in references
        )
        parts = [ctx]
        for ref, ref_bucket in zip(references, ref_buckets, strict=True):
            parts.append(self.encode_image(resize_to(ref, ref_bucket), batch)[0])  # [B, M_ref, 64]
        ids = context_ids([bucket, *ref_buckets], placement, self.device)
        return torch.cat(parts, dim=1), ids, ref_buckets

    def prepare(
        self,
        image: Image.Image | EncodedImage,
        prompt: str,
        settings: EditSettings,
        timings: dict[str, float] | None = None,
        *,
        references: Sequence[Image.Image] = (),
        placement: str = DEFAULT_PLACEMENT,
        num_images: int = 1,
    ) -> PreparedEdit:
        """Bucket and encode the images and prompt, draw noise (seed, seed + 1, ...), make the schedule."""
        timings = {} if timings is None else timings
        check_edit_inputs(references, placement, num_images)
        bucket = self.context_bucket(image)
        size = settings.size or bucket
        with self._timed(timings, "text_encode"):
            txt, vec, txt_ids = self.encode_prompt(prompt, num_images)
        with self._timed(timings, "vae_encode"):
            ctx, ctx_ids, ref_buckets = self.encode_context(image, bucket, references, placement, num_images)
        seeds = tuple(settings.seed + i for i in range(num_images))
        if num_images == 1:
            img = sampling.get_noise(1, size[1], size[0], settings.seed, self.dtype, self.device)
        else:
            img = sampling.get_noise_for_seeds(seeds, size[1], size[0], self.dtype, self.device)
        img_ids = sampling.image_ids(size[1], size[0], index=0, device=self.device)
        schedule = sampling.get_schedule(settings.steps, img.shape[1], self.device)
        return PreparedEdit(
            img, img_ids, ctx, ctx_ids, txt, txt_ids, vec, schedule, bucket, size, seeds, ref_buckets
        )

    def edit(
        self,
        image: Image.Image | EncodedImage,
        prompt: str,
        settings: EditSettings | None = None,
        *,
        references: Sequence[Image.Image] = (),
        placement: str = DEFAULT_PLACEMENT,
        num_images: int = 1,
        progress: bool = True,
        callback: sampling.StepCallback | None = None,
    ) -> EditResult:
        """Edit `image` as `prompt` says, with `references` beside it, for seeds seed .. seed + num_images - 1
        in one batch. Output size: the input's bucket unless settings.size is set."""
        settings = settings or EditSettings()
        timings: dict[str, float] = {}
        t_start = time.perf_counter()
        p = self.prepare(
            image,
            prompt,
            settings,
            timings,
            references=references,
            placement=placement,
            num_images=num_images,
        )
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
            )  # [B, N, 64]
        bar.close()
        with self._timed(timings, "vae_decode"):
            images = [self.decode(latents[i : i + 1], p.size) for i in range(latents.shape[0])]
        timings["total"] = time.perf_counter() - t_start
        log.info(
            "edit %dx%d, %d image(s), %d reference(s), %d steps, %.2fs (%s)",
            *p.size,
            len(images),
            len(p.references),
            settings.steps,
            timings["total"],
            self.denoiser.name,
        )
        return EditResult(
            images[0],
            latents,
            p.bucket,
            p.size,
            p.shape_key,
            timings,
            step_times,
            self.denoiser.name,
            images=images,
            seeds=list(p.seeds),
            references=list(p.references),
        )

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


def check_edit_inputs(references: Sequence[object], placement: str, num_images: int) -> None:
    """The edit's knobs beyond EditSettings: at most MAX_REFERENCES references, a known placement,
    num_images from 1 to 64."""
    if len(references) > MAX_REFERENCES:
        raise ConfigError(
            f"an edit takes at most {MAX_REFERENCES} reference images beside the input, got {len(references)}"
        )
    check_placement(placement)
    if not 1 <= num_images <= 64:
        raise ConfigError(f"num_images must be between 1 and 64, got {num_images}")
