"""The `nsfw` checker: the Falconsai ViT image classifier (labels normal/nsfw), flagging an image whose
nsfw probability is above 0.85, as BFL's FLUX CLIs do. Images only; a prompt always passes."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ..errors import FilterModelError
from .checker import Role, Verdict
from .models import NSFW_MODEL, model_folder

log = logging.getLogger(__name__)

NSFW_THRESHOLD = 0.85  # BFL's PixtralContentFilter and NSFW_THRESHOLD in flux/cli.py


class NsfwChecker:
    """Softmax over the classifier's two logits; flagged when p(nsfw) > threshold.

    Thread safety: the model runs under inference_mode and is never mutated; the image processor
    keeps no state between calls.
    """

    name = "nsfw"
    subjects = frozenset({"input", "output"})

    def __init__(self, model: Any, processor: Any, *, threshold: float = NSFW_THRESHOLD) -> None:
        """model: a ViTForImageClassification (any image classifier with an `nsfw` label); processor:
        its image processor."""
        labels = {str(k).lower(): int(v) for k, v in model.config.label2id.items()}
        if "nsfw" not in labels:
            raise FilterModelError(
                f"the NSFW classifier has labels {sorted(labels)}, not 'nsfw': is it {NSFW_MODEL.repo}?"
            )
        if not 0.0 < threshold < 1.0:
            raise FilterModelError(f"the NSFW threshold must be in (0, 1), got {threshold}")
        self.model = model.eval()
        self.processor = processor
        self.threshold = threshold
        self._nsfw = labels["nsfw"]

    @classmethod
    def from_folder(
        cls, folder: Path | str, *, device: str = "cpu", threshold: float = NSFW_THRESHOLD
    ) -> NsfwChecker:
        """Load from a download of Falconsai/nsfw_image_detection (safetensors only). The PIL backend of
        the image processor is used everywhere, so scores do not depend on whether torchvision is there."""
        from transformers import AutoImageProcessor, AutoModelForImageClassification

        try:
            model = AutoModelForImageClassification.from_pretrained(
                str(folder), use_safetensors=True, local_files_only=True, dtype=torch.float32
            ).to(device)
            processor = AutoImageProcessor.from_pretrained(str(folder), backend="pil", local_files_only=True)
        except (OSError, ValueError) as e:
            raise FilterModelError(f"cannot load the NSFW classifier from {folder}: {e}") from e
        log.info("loaded the NSFW classifier from %s on %s", folder, device)
        return cls(model, processor, threshold=threshold)

    @classmethod
    def from_models_dir(
        cls, models_dir: Path | str | None, *, device: str = "cpu", needed_by: str = "nsfw"
    ) -> NsfwChecker:
        return cls.from_folder(model_folder(models_dir, NSFW_MODEL, needed_by=needed_by), device=device)

    @torch.inference_mode()
    def score(self, image: Image.Image) -> float:
        """p(nsfw) of `image` (any size; the processor resizes it to the classifier's input)."""
        device = next(self.model.parameters()).device
        pixels = self.processor(images=image.convert("RGB"), return_tensors="pt")["pixel_values"]
        logits = self.model(pixel_values=pixels.to(device, self.model.dtype)).logits  # [1, labels]
        return float(logits.float().softmax(-1)[0, self._nsfw])

    def check_prompt(self, text: str) -> Verdict:
        return Verdict(self.name, False, "checks images only")

    def check_image(self, image: Image.Image, role: Role) -> Verdict:
        p = self.score(image)
        if p > self.threshold:
            return Verdict(
                self.name, True, f"{role} image: nsfw score {p:.2f} > {self.threshold}", {"nsfw": p}
            )
        return Verdict(self.name, False, "", {"nsfw": p})
