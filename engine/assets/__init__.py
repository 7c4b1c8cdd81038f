"""Files shipped with the package: the quick-start sample image and the calibration set
(input images and edit instructions) that the build step quantizes with. See LICENSES.md."""

from __future__ import annotations

import json
from pathlib import Path

from engine.errors import ConfigError

ASSETS_DIR = Path(__file__).parent
CALIBRATION_DIR = ASSETS_DIR / "calibration"
CALIBRATION_PROMPTS_FILE = ASSETS_DIR / "calibration_prompts.json"
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp"})
# The edit families of the FLUX.1 Kontext paper (KontextBench).
CATEGORIES = ("local_edit", "global_edit", "style_transfer", "text_editing", "character_consistency")


def sample_image_path() -> Path:
    """The quick-start input image (a cat, 451x300, CC0)."""
    return ASSETS_DIR / "sample.png"


def calibration_image_paths() -> list[Path]:
    """The calibration input images, sorted by name: square, landscape and portrait shapes."""
    return sorted(p for p in CALIBRATION_DIR.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def calibration_prompts() -> list[tuple[str, str]]:
    """The calibration edit instructions as (category, prompt), in file order."""
    try:
        entries = json.loads(CALIBRATION_PROMPTS_FILE.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"{CALIBRATION_PROMPTS_FILE} is unreadable ({exc}); reinstall kontext-engine"
        ) from exc
    if not isinstance(entries, list):
        raise ConfigError(f"{CALIBRATION_PROMPTS_FILE} must hold a JSON list; reinstall kontext-engine")
    prompts: list[tuple[str, str]] = []
    for index, entry in enumerate(entries):
        category = entry.get("category") if isinstance(entry, dict) else None
        prompt = entry.get("prompt") if isinstance(entry, dict) else None
        if category not in CATEGORIES or not isinstance(prompt, str) or not prompt.strip():
            raise ConfigError(
                f"{CALIBRATION_PROMPTS_FILE} entry {index} must be "
                f'{{"category": one of {CATEGORIES}, "prompt": non-empty str}}, got {entry!r}'
            )
        prompts.append((category, prompt))
    return prompts
