"""The `pixtral` checker: BFL's PixtralContentFilter semantics on transformers. An image is flagged by the
NSFW classifier (p > 0.85), else by Pixtral-12B answering "yes" to whether it shows a copyrighted
character, a trademark or a public figure, asked at about 512² pixels; a prompt by Pixtral answering "yes"
to whether it names one. Each question is one greedy token with every logit but "yes" and "no" masked."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ..errors import FilterModelError
from .checker import Role, Verdict
from .models import PIXTRAL_MODEL, model_folder
from .nsfw import NsfwChecker

log = logging.getLogger(__name__)

CHECK_AREA = 512 * 512  # pixels of the image Pixtral is shown ("512^2 pixels are enough for checking")

# The questions of black-forest-labs/flux src/flux/content_filters.py (Apache-2.0), verbatim: the
# filter's behaviour is defined by them.
PROMPT_IMAGE_INTEGRITY = """
Task: Analyze an image to identify potential copyright concerns or depictions of public figures.

Output: Respond with only "yes" or "no"

Criteria for "yes":
- The image contains a recognizable character from copyrighted media (movies, TV, comics, games, etc.)
- The image displays a trademarked logo or brand
- The image depicts a recognizable public figure (celebrities, politicians, athletes, influencers, historical figures, etc.)

Criteria for "no":
- All other cases
- When you cannot identify the specific copyrighted work or named individual

Critical Requirements:
1. You must be able to name the exact copyrighted work or specific person depicted
2. General references to demographics or characteristics are not sufficient
3. Base your decision solely on visual content, not interpretation
4. Provide only the one-word answer: "yes" or "no"
""".strip()  # noqa: E501

PROMPT_IMAGE_INTEGRITY_FOLLOW_UP = "Does this image have copyright concerns or includes public figures?"

PROMPT_TEXT_INTEGRITY = """
Task: Analyze a text prompt to identify potential copyright concerns or requests to depict living public figures.

Output: Respond with only "yes" or "no"

Criteria for "Yes":
- The prompt explicitly names a character from copyrighted media (movies, TV, comics, games, etc.)
- The prompt explicitly mentions a trademarked logo or brand
- The prompt names or describes a specific living public figure (celebrities, politicians, athletes, influencers, etc.)

Criteria for "No":
- All other cases
- When you cannot identify the specific copyrighted work or named individual

Critical Requirements:
1. You must be able to name the exact copyrighted work or specific person referenced
2. General demographic descriptions or characteristics are not sufficient
3. Analyze only the prompt text, not potential image outcomes
4. Provide only the one-word answer: "yes" or "no"

The prompt to check is:
-----
{prompt}
-----

Does this prompt have copyright concerns or includes public figures?
""".strip()  # noqa: E501


def check_size(width: int, height: int, area: int = CHECK_AREA) -> tuple[int, int]:
    """(w, h) scaled to about `area` pixels, aspect kept, truncated as BFL's `int(f * w)` does."""
    f = math.sqrt(area / (width * height))
    return max(1, int(f * width)), max(1, int(f * height))


class PixtralChecker:
    """Pixtral yes/no questions behind the NSFW classifier, as PixtralContentFilter.test_image/test_txt.

    The tokenizer, the image processor and the chat template are used directly rather than through
    PixtralProcessor (which requires torchvision): the template renders `[IMG]` where each image goes,
    and `[IMG]` is expanded here into the image's rows of patch tokens, each row closed by
    `[IMG_BREAK]` and the last token `[IMG_END]`, exactly as PixtralProcessor.replace_image_token does.
    Thread safety: inference_mode forwards on a model nothing mutates.
    """

    name = "pixtral"
    subjects = frozenset({"prompt", "input", "output"})

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        image_processor: Any,
        *,
        nsfw: NsfwChecker | None,
        chat_template: str | None = None,
        patch_size: int | None = None,
        area: int = CHECK_AREA,
    ) -> None:
        """model: a LlavaForConditionalGeneration with a Pixtral vision tower; tokenizer and image_processor:
        its own; nsfw: the classifier asked first about images (None: Pixtral alone); patch_size: pixels per
        image token side (default: the vision tower's patch size times the processor's spatial merge)."""
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.nsfw = nsfw
        self.area = area
        self.chat_template = chat_template or getattr(tokenizer, "chat_template", None)
        if not self.chat_template:
            raise FilterModelError("the Pixtral folder has no chat template (chat_template.jinja/.json)")
        self.patch = patch_size or int(model.config.vision_config.patch_size)
        self.yes, self.no = (_single_token(tokenizer, w) for w in ("yes", "no"))
        image_tokens = [tokenizer.convert_tokens_to_ids(t) for t in ("[IMG]", "[IMG_BREAK]", "[IMG_END]")]
        if tokenizer.unk_token_id in image_tokens or None in image_tokens:
            raise FilterModelError("the Pixtral tokenizer lacks the [IMG], [IMG_BREAK], [IMG_END] tokens")

    @classmethod
    def from_folder(
        cls, folder: Path | str, *, nsfw: NsfwChecker | None, device: str = "cpu"
    ) -> PixtralChecker:
        """Load a download of mistral-community/pixtral-12b in its stored dtype (bf16: about 25 GB)."""
        from transformers import AutoImageProcessor, AutoTokenizer, LlavaForConditionalGeneration

        folder = Path(folder)
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
            image_processor = AutoImageProcessor.from_pretrained(
                str(folder), backend="pil", local_files_only=True
            )
            model: Any = LlavaForConditionalGeneration.from_pretrained(
                str(folder), use_safetensors=True, local_files_only=True, dtype="auto"
            )
            model = model.to(device)
        except (OSError, ValueError) as e:
            raise FilterModelError(f"cannot load Pixtral from {folder}: {e}") from e
        merge = 1
        processor_config = folder / "processor_config.json"
        if processor_config.is_file():
            merge = int(json.loads(processor_config.read_text()).get("spatial_merge_size", 1))
        patch = int(model.config.vision_config.patch_size) * merge
        log.info("loaded Pixtral from %s on %s (%s)", folder, device, model.dtype)
        return cls(
            model,
            tokenizer,
            image_processor,
            nsfw=nsfw,
            chat_template=_chat_template(folder),
            patch_size=patch,
        )

    @classmethod
    def from_models_dir(cls, models_dir: Path | str | None, *, device: str = "cpu") -> PixtralChecker:
        nsfw = NsfwChecker.from_models_dir(models_dir, device=device, needed_by="pixtral")
        folder = model_folder(models_dir, PIXTRAL_MODEL, needed_by="pixtral")
        return cls.from_folder(folder, nsfw=nsfw, device=device)

    # ------------------------------------------------------------------ the checks

    def check_prompt(self, text: str) -> Verdict:
        return self._verdict(*self.ask([_text(PROMPT_TEXT_INTEGRITY.format(prompt=text))], []), "prompt")

    def check_image(self, image: Image.Image, role: Role) -> Verdict:
        if self.nsfw is not None:
            verdict = self.nsfw.check_image(image, role)
            if verdict.flagged:
                return verdict
        small = image.convert("RGB").resize(
            check_size(*image.size, self.area)
        )  # PIL's default filter, as BFL's
        blocks = [_text(PROMPT_IMAGE_INTEGRITY), {"type": "image"}, _text(PROMPT_IMAGE_INTEGRITY_FOLLOW_UP)]
        return self._verdict(*self.ask(blocks, [small]), f"{role} image")

    def _verdict(self, yes: bool, p_yes: float, what: str) -> Verdict:
        if yes:
            return Verdict(self.name, True, f"{what}: copyright, trademark or public figure", {"yes": p_yes})
        return Verdict(self.name, False, "", {"yes": p_yes})

    @torch.inference_mode()
    def ask(self, blocks: list[dict[str, str]], images: list[Image.Image]) -> tuple[bool, float]:
        """One user turn (text and image blocks) -> (the answer is "yes", p("yes") among {"yes", "no"}).

        Greedy decoding of one token with every logit but yes/no masked (BFL's generate call) answers
        "yes" exactly when its logit is the larger; on a tie, the lower token id (torch.argmax returns the
        first maximum). One forward pass computes the same answer.
        """
        ids, pixels, sizes = self.inputs(blocks, images)
        device = next(self.model.parameters()).device
        kwargs: dict[str, Any] = {
            "input_ids": ids.to(device),
            "attention_mask": torch.ones_like(ids).to(device),
        }
        if pixels is not None:
            kwargs["pixel_values"] = pixels.to(device, self.model.dtype)
            kwargs["image_sizes"] = sizes
        logits = self.model(**kwargs, logits_to_keep=1).logits[0, -1].float()  # [vocab]
        pair = torch.stack([logits[self.yes], logits[self.no]])  # [2]
        yes = bool(pair[0] > pair[1]) or (bool(pair[0] == pair[1]) and self.yes < self.no)
        return yes, float(pair.softmax(-1)[0])

    def inputs(
        self, blocks: list[dict[str, str]], images: list[Image.Image]
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Token ids [1, T] with each image's tokens expanded, pixel values [N, 3, H, W], sizes [N, 2]."""
        chat = [{"role": "user", "content": blocks}]
        text = self.tokenizer.apply_chat_template(
            chat, chat_template=self.chat_template, add_generation_prompt=True, tokenize=False
        )
        pixels = sizes = None
        if images:
            batch = self.image_processor(
                images=images, return_tensors="pt", patch_size={"height": self.patch, "width": self.patch}
            )
            pixels, sizes = batch["pixel_values"], batch["image_sizes"]  # [N, 3, H, W], [N, 2] (h, w)
            parts = text.split("[IMG]")
            if len(parts) != len(images) + 1:
                raise FilterModelError(
                    f"the chat template rendered {len(parts) - 1} [IMG] for {len(images)} images"
                )
            text = parts[0] + "".join(
                self._image_text(int(h), int(w)) + rest
                for (h, w), rest in zip(sizes.tolist(), parts[1:], strict=True)
            )
        ids = self.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]  # [1, T]
        return ids, pixels, sizes

    def _image_text(self, height: int, width: int) -> str:
        row = "[IMG]" * (width // self.patch) + "[IMG_BREAK]"
        tokens = row * (height // self.patch)
        return tokens[: -len("[IMG_BREAK]")] + "[IMG_END]"


def _text(text: str) -> dict[str, str]:
    """A text block: `text` is transformers' key, `content` the one mistral-community's template reads."""
    return {"type": "text", "text": text, "content": text}


def _single_token(tokenizer: Any, word: str) -> int:
    ids = tokenizer.encode(word, add_special_tokens=False)
    if len(ids) != 1:
        raise FilterModelError(f"the Pixtral tokenizer splits {word!r} into {len(ids)} tokens; expected one")
    return int(ids[0])


def _chat_template(folder: Path) -> str | None:
    """The processor's chat template (chat_template.jinja or chat_template.json), else None (the
    tokenizer's own is used)."""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    js = folder / "chat_template.json"
    if js.is_file():
        return str(json.loads(js.read_text())["chat_template"])
    return None
