"""Where the content-filter models live: one folder per model under `--safety-models DIR`, each a plain
`hf download` of its Hub repository. Only safetensors weights are loaded, never pickles."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import FilterModelError


@dataclass(frozen=True)
class FilterModel:
    """A filter model: its Hub repository, the folder name it takes under --safety-models, and the files
    a usable download has (beside at least one *.safetensors)."""

    repo: str
    folder: str
    files: tuple[str, ...]
    size: str  # for the download hint


NSFW_MODEL = FilterModel(
    repo="Falconsai/nsfw_image_detection",
    folder="nsfw_image_detection",
    files=("config.json", "preprocessor_config.json"),
    size="0.35 GB",
)
PIXTRAL_MODEL = FilterModel(
    repo="mistral-community/pixtral-12b",
    folder="pixtral-12b",
    files=("config.json", "preprocessor_config.json", "tokenizer_config.json"),
    size="25 GB",
)


def download_hint(models_dir: Path | str, models: tuple[FilterModel, ...]) -> str:
    cmds = "; ".join(
        f"hf download {m.repo} --local-dir {Path(models_dir) / m.folder} ({m.size})" for m in models
    )
    return f"download: {cmds}"


def model_folder(models_dir: Path | str | None, model: FilterModel, *, needed_by: str) -> Path:
    """`models_dir/model.folder`, checked for the files loading needs; a FilterModelError naming the
    repository and the target folder otherwise."""
    models = (NSFW_MODEL, PIXTRAL_MODEL) if needed_by == "pixtral" else (model,)
    if models_dir is None:
        raise FilterModelError(
            f"--safety {needed_by} needs its filter models in a local folder: pass --safety-models DIR "
            f"(engine: build_policy(..., models_dir=DIR)), after {download_hint('DIR', models)}"
        )
    folder = Path(models_dir) / model.folder
    missing = [f for f in model.files if not (folder / f).is_file()]
    if not folder.is_dir() or missing or not any(folder.glob("*.safetensors")):
        what = (
            "is missing" if not folder.is_dir() else f"lacks {', '.join(missing) or '*.safetensors weights'}"
        )
        raise FilterModelError(
            f"--safety {needed_by}: {folder} {what} ({model.repo}); {download_hint(models_dir, (model,))}"
        )
    return folder
