"""KontextPipeline: text encoders + VAE + the sampling loop + a Denoiser. No backend branches here.

One edit: the input image (pixels, or latents a previous edit produced), up to 3 reference images,
one prompt, and one or more seeds (a batch through the denoiser).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch
from PIL import Image
from tqdm.auto import tqdm

from . import sampling
from .backends import Denoiser
from .buckets import ShapeKey, buckets, nearest_bucket, reference_bucket
from .caching import StepCache, new_step_cache
from .clock import synchronize, timed
from .config import ModelPreset
from .errors import BucketError, ConfigError
from .images import resize_to, to_pil, to_tensor
from .model.components import CLIP_MAX_LENGTH, Components
from .prompt_cache import PromptCache, weights_fingerprint
from .references import DEFAULT_PLACEMENT, context_ids
from .request import EditRequest, EncodedImage

log = logging.getLogger(__name__)


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
    request: EditRequest | None = None  # what was asked (steps resolved); output metadata reads it
    steps_computed: int = 0  # full transformer passes per image (steps, less what a step cache skipped)
    cache: str = ""  # the step cache that ran and its form, e.g. "magcache-kontext (residual)"; "": none

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
    computed = round(sum(r.steps_computed for r in results) / len(results))  # per image
    if "steps_computed" in timings:
        timings["steps_computed"] = float(computed)
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
        request=first.request if first.request is None else replace(first.request, num_images=len(results)),
        steps_computed=computed,
        cache=first.cache,
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
    guidance: float
    bucket: tuple[int, int]
    size: tuple[int, int]
    shape_key: ShapeKey  # plan_edit's: the key the dispatcher chose the denoiser for
    seeds: tuple[int, ...] = (0,)
    references: tuple[tuple[int, int], ...] = ()  # (w, h) bucket of each reference image

    def denoise(
        self,
        denoiser: sampling.DenoiseFn,
        callback: sampling.StepCallback | None = None,
        cache: StepCache | None = None,
    ) -> torch.Tensor:
        """Run the sampling loop over this edit with `denoiser` (and this edit's step cache, if any)
        -> final latents [B, N, 64]."""
        return sampling.denoise(
            denoiser,
            img=self.img,
            img_ids=self.img_ids,
            ctx=self.ctx,
            ctx_ids=self.ctx_ids,
            txt=self.txt,
            txt_ids=self.txt_ids,
            vec=self.vec,
            schedule=self.schedule,
            guidance=self.guidance,
            callback=callback,
            cache=cache,
        )


def plan_edit(request: EditRequest, preset: ModelPreset, family: str) -> tuple[EditRequest, ShapeKey]:
    """The one rule for what an edit runs: `request` with its steps filled in (the preset's default when
    None) and the shape key it runs at in bucket `family`, with the preset's max_sequence_length text
    tokens (T5 pads every prompt to it). KontextEngine.edit dispatches on this key and passes both down,
    so the result reports the key the denoiser was chosen for."""
    request = request.resolved(preset.default_steps)
    return request, request.shape_key(family, preset.max_sequence_length)


class KontextPipeline:
    """One edit = encode prompt, encode context image, denoise with `denoiser`, decode.

    The denoiser is any callable of the Denoiser contract (torch, ONNX Runtime, TensorRT...), given
    per call (`edit(request, denoiser=...)`, as BFL passes the model to `denoise`) or, for a pipeline
    that always runs one, at construction. Thread safety: the pipeline holds no per-edit state; the
    encoders run under inference_mode and the denoiser decides its own model (see backends). Its
    tokenizers are not safe to share: KontextEngine keeps one pipeline per worker.
    """

    def __init__(
        self,
        components: Components,
        denoiser: Denoiser | None = None,
        *,
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
        bucket_family: str | None = None,
        prompt_cache: PromptCache | None = None,
    ) -> None:
        """bucket_family: where input images are bucketed (default: the preset's). An engine built for
        another family (say 0.25 MP edits of the 1 MP model) passes its own.
        denoiser: the one edit() runs when it is given none.
        prompt_cache: shared across pipelines (an engine has one pipeline per worker); None: no cache."""
        self.components = components
        self.prompt_cache = prompt_cache
        self._bucket_family = bucket_family or components.preset.bucket_family
        self.denoiser = denoiser
        self.device = torch.device(device)
        self.dtype = dtype

    @property
    def bucket_family(self) -> str:
        return self._bucket_family

    def plan(self, request: EditRequest) -> tuple[EditRequest, ShapeKey]:
        """`request` with its steps filled in, and its shape key here (plan_edit)."""
        return plan_edit(request, self.components.preset, self.bucket_family)

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

    # Mirrors diffusers pipelines/flux/pipeline_flux_kontext.py::FluxKontextPipeline._get_clip_prompt_embeds (v0.42)  # noqa: E501
    # Mirrors diffusers pipelines/flux/pipeline_flux_kontext.py::FluxKontextPipeline._get_t5_prompt_embeds (v0.42)  # noqa: E501
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

    # Mirrors diffusers pipelines/flux/pipeline_flux_kontext.py::FluxKontextPipeline._encode_vae_image (v0.42)
    # (argmax latents, shifted and scaled), then packed
    @torch.inference_mode()
    def encode_image(self, image: Image.Image, batch: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """RGB image already at its bucket size -> context tokens [B, M, 64] and ids [M, 3] (index 1)."""
        vae = self.components.vae
        pixels = to_tensor(image).to(self.device, self.dtype)  # [1, 3, H, W] in [-1, 1]
        latents = vae.encode(pixels).latent_dist.mode()  # [1, 16, H/8, W/8]
        latents = (latents - vae.config.shift_factor) * vae.config.scaling_factor
        ctx = sampling.pack(latents).repeat(batch, 1, 1)
        return ctx, sampling.image_ids(image.height, image.width, index=1, device=self.device)

    # Mirrors diffusers pipelines/flux/pipeline_flux_kontext.py::FluxKontextPipeline.__call__ (v0.42)
    # (its output_type="pil" tail: unpack, unscale, unshift, VAE decode)
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
        self, request: EditRequest, timings: dict[str, float] | None = None, *, key: ShapeKey | None = None
    ) -> PreparedEdit:
        """Bucket and encode the images and prompt, draw noise (seed, seed + 1, ...), make the schedule.
        key: the edit's shape key, passed with its steps filled in by a caller that planned the edit
        (KontextEngine.edit); None: `plan` decides both (steps None: the preset's default)."""
        if key is None:
            request, key = self.plan(request)
        steps = request.steps
        if steps is None:
            raise ConfigError("a request passed with its shape key needs its steps filled in (plan_edit)")
        r = request
        timings = {} if timings is None else timings
        bucket = self.context_bucket(r.image)
        size = r.size or bucket
        with timed(self.device, timings, "text_encode"):
            txt, vec, txt_ids = self.encode_prompt(r.prompt, r.num_images)
        with timed(self.device, timings, "vae_encode"):
            ctx, ctx_ids, ref_buckets = self.encode_context(
                r.image, bucket, r.references, r.placement, r.num_images
            )
        if r.num_images == 1:
            img = sampling.get_noise(1, size[1], size[0], r.seed, self.dtype, self.device)
        else:
            img = sampling.get_noise_for_seeds(r.seeds, size[1], size[0], self.dtype, self.device)
        return PreparedEdit(
            img=img,  # [B, N, 64]
            img_ids=sampling.image_ids(size[1], size[0], index=0, device=self.device),
            ctx=ctx,
            ctx_ids=ctx_ids,
            txt=txt,
            txt_ids=txt_ids,
            vec=vec,
            schedule=sampling.get_schedule(steps, img.shape[1], self.device),
            guidance=r.guidance,
            bucket=bucket,
            size=size,
            shape_key=key,
            seeds=r.seeds,
            references=ref_buckets,
        )

    def edit(
        self,
        request: EditRequest,
        *,
        denoiser: Denoiser | None = None,
        key: ShapeKey | None = None,
        progress: bool = True,
        callback: sampling.StepCallback | None = None,
    ) -> EditResult:
        """Run `request` (validated where it was made) in one batch through `denoiser` (None: this
        pipeline's own): seeds seed .. seed + num_images - 1; output size: the input's bucket unless
        request.size is set. key: as in prepare (KontextEngine.edit passes the key it dispatched on).
        No safety policy and no output metadata here: KontextEngine.edit adds them."""
        denoiser = denoiser if denoiser is not None else self.denoiser
        if denoiser is None:
            raise ConfigError("this pipeline has no denoiser: pass edit(request, denoiser=...)")
        if key is None:
            request, key = self.plan(request)
        timings: dict[str, float] = {}
        t_start = time.perf_counter()
        p = self.prepare(request, timings, key=key)
        cache = new_step_cache(request.cache, denoiser, p.schedule.steps)  # this edit's alone
        with timed(self.device, timings, "denoise"), torch.inference_mode():
            latents, step_times = self._denoise(p, denoiser, progress, callback, cache)  # [B, N, 64]
        computed = p.schedule.steps if cache is None else cache.computed
        with timed(self.device, timings, "vae_decode"):
            images = [self.decode(latents[i : i + 1], p.size) for i in range(latents.shape[0])]
        timings["total"] = time.perf_counter() - t_start
        timings["steps_computed"] = float(computed)  # a count beside the seconds (bench and server read it)
        log.info(
            "edit %dx%d, %d image(s), %d reference(s), %d steps, %d computed, %.2fs (%s)",
            *p.size,
            len(images),
            len(p.references),
            p.schedule.steps,
            computed,
            timings["total"],
            denoiser.name,
        )
        return EditResult(
            images[0],
            latents,
            p.bucket,
            p.size,
            p.shape_key,
            timings,
            step_times,
            denoiser.name,
            images=images,
            seeds=list(p.seeds),
            references=list(p.references),
            request=request,
            steps_computed=computed,
            cache="" if cache is None else cache.label,
        )

    def _denoise(
        self,
        p: PreparedEdit,
        denoiser: Denoiser,
        progress: bool,
        callback: sampling.StepCallback | None,
        cache: StepCache | None = None,
    ) -> tuple[torch.Tensor, list[float]]:
        """The sampling loop with a progress bar and the seconds of each step (synchronized)."""
        step_times: list[float] = []
        desc = f"denoise {p.size[0]}x{p.size[1]}"
        bar = tqdm(total=p.schedule.steps, desc=desc, disable=not progress, leave=False)
        last = [time.perf_counter()]

        def on_step(i: int, n: int, latents: torch.Tensor) -> None:
            synchronize(self.device)
            now = time.perf_counter()
            step_times.append(now - last[0])
            last[0] = now
            bar.update()
            if callback is not None:
                callback(i, n, latents)

        try:
            return p.denoise(denoiser, on_step, cache), step_times
        finally:
            bar.close()
