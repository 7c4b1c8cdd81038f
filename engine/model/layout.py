"""The files of a downloaded Kontext checkpoint, found and checked before anything is loaded.

A diffusers folder as `hf download black-forest-labs/FLUX.1-Kontext-dev` writes it (sharded weights
with their index files, the tokenizers' own file formats), or BFL's single-file transformer inside
one. Every file the load will read is checked here first, cheaply (safetensors headers against file
sizes, JSON parsed, spiece.model parsed), so a broken download is one WeightsError naming the missing
or damaged file, never a library's traceback. Paths stay as given: through a Hugging Face cache
snapshot's symlinks, never the resolved `blobs/<hash>`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import WeightsError
from .components import DOWNLOAD_HINT
from .safetensors_files import read_header

SIDECAR = "kontext.json"  # what a folder's transformer config cannot say: bucket family, T5 length

_WHAT = {
    "transformer": "the diffusers transformer",
    "text_encoder": "the CLIP text encoder",
    "text_encoder_2": "the T5 text encoder",
    "tokenizer": "the CLIP tokenizer",
    "tokenizer_2": "the T5 tokenizer",
    "vae": "the autoencoder",
}


@dataclass(frozen=True)
class Layout:
    """Every file a load of `path` reads, checked. bfl: the transformer is BFL's single file."""

    path: Path  # as given (a folder, or the BFL file inside one)
    folder: Path
    bfl: bool
    transformer: tuple[Path, ...]  # diffusers shards, or the BFL file
    transformer_config: Path | None  # None: a BFL file without transformer/config.json
    text_encoder: tuple[Path, ...]
    text_encoder_2: tuple[Path, ...]
    vae: tuple[Path, ...]
    other: tuple[Path, ...]  # configs, index files, tokenizer files, model_index.json, kontext.json

    def weights(self) -> tuple[Path, ...]:
        return self.transformer + self.text_encoder + self.text_encoder_2 + self.vae

    def files(self) -> list[Path]:
        """Everything read, sorted (what a build's source signature covers)."""
        return sorted({*self.weights(), *self.other})


def model_name(path: Path) -> str:
    """A local checkpoint's name (build folders, presets): its folder's, a cache snapshot's repository's
    (not the commit hash), with "-bfl" for BFL's single file, whose build must not share the folder's."""
    p = Path(os.path.abspath(Path(path).expanduser()))
    bfl = p.suffix == ".safetensors"
    folder = p.parent if bfl else p
    snapshot = folder.parent.name == "snapshots" and folder.parent.parent.name.startswith("models--")
    name = folder.parent.parent.name.split("--")[-1] if snapshot else folder.name
    return f"{name}-bfl" if bfl else name


def find_layout(path: Path) -> Layout:
    """The checked Layout of a folder or of a BFL file inside one; WeightsError naming the first
    missing or damaged file."""
    bfl = path.is_file()
    if bfl:
        if path.suffix != ".safetensors":
            raise WeightsError(
                f"{path}: only .safetensors checkpoints are loaded (never pickle). {DOWNLOAD_HINT}"
            )
        folder = path.parent
        if not (folder / "model_index.json").is_file():
            raise WeightsError(
                f"{path} holds only the transformer; put it inside the diffusers folder of the model "
                f"(which provides the VAE and text encoders). {DOWNLOAD_HINT}"
            )
    else:
        folder = path
        if not (folder / "model_index.json").is_file():
            raise WeightsError(
                f"{folder} is not a diffusers model folder (no model_index.json). {DOWNLOAD_HINT}"
            )
    other: list[Path] = [folder / "model_index.json"]
    _json(folder / "model_index.json")
    if (folder / SIDECAR).is_file():
        other.append(folder / SIDECAR)
    if bfl:
        read_header(path)
        transformer: tuple[Path, ...] = (path,)
        beside = folder / "transformer" / "config.json"
        config: Path | None = beside if beside.is_file() else None
    else:
        transformer = _weights(folder, "transformer", "diffusion_pytorch_model", other)
        config = _config(folder, "transformer")
    if config is not None:
        other.append(config)
    text_encoder = _weights(folder, "text_encoder", "model", other)
    text_encoder_2 = _weights(folder, "text_encoder_2", "model", other)
    vae = _weights(folder, "vae", "diffusion_pytorch_model", other)
    other += [_config(folder, s) for s in ("text_encoder", "text_encoder_2", "vae")]
    other += _clip_tokenizer(_subfolder(folder, "tokenizer"))
    other += _t5_tokenizer(_subfolder(folder, "tokenizer_2"))
    return Layout(path, folder, bfl, transformer, config, text_encoder, text_encoder_2, vae, tuple(other))


def _subfolder(folder: Path, sub: str) -> Path:
    d = folder / sub
    if not d.is_dir():
        raise WeightsError(f"{d}/ is missing ({_WHAT[sub]}); the download is incomplete. {DOWNLOAD_HINT}")
    return d


def _missing(path: Path, sub: str) -> WeightsError:
    return WeightsError(f"{path} is missing ({_WHAT[sub]}); the download is incomplete. {DOWNLOAD_HINT}")


def _weights(folder: Path, sub: str, stem: str, other: list[Path]) -> tuple[Path, ...]:
    """The safetensors files of one component: the shards its index names, or the single file."""
    d = _subfolder(folder, sub)
    index = d / f"{stem}.safetensors.index.json"
    weight_map: dict[str, str] = {}
    if index.is_file():
        other.append(index)
        listed = _json(index).get("weight_map")
        if not isinstance(listed, dict) or not listed:
            raise WeightsError(f"{index} has no weight_map; download it again. {DOWNLOAD_HINT}")
        weight_map = {str(k): str(v) for k, v in listed.items()}
        files = tuple(d / name for name in sorted(set(weight_map.values())))
    else:
        files = (d / f"{stem}.safetensors",)
    for f in files:
        if not f.is_file():
            raise _missing(f, sub)
        header, _ = read_header(f)
        if weight_map:
            absent = [k for k, v in weight_map.items() if v == f.name and k not in header]
            if absent:
                raise WeightsError(f"{f} lacks {len(absent)} tensors its index lists; download it again")
    return files


def _config(folder: Path, sub: str) -> Path:
    path = _subfolder(folder, sub) / "config.json"
    if not path.is_file():
        raise _missing(path, sub)
    _json(path)
    return path


def _json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise WeightsError(f"{path}: cannot be read ({e.strerror or e}); download it again") from e
    except ValueError as e:
        raise WeightsError(f"{path} is not valid JSON (truncated or damaged); download it again") from e
    if not isinstance(data, dict):
        raise WeightsError(f"{path} is not a JSON object; download it again")
    return data


def _clip_tokenizer(d: Path) -> list[Path]:
    """CLIP's tokenizer: tokenizer.json, or (the real repository) vocab.json and merges.txt."""
    files = [f for f in (d / "tokenizer_config.json", d / "special_tokens_map.json") if f.is_file()]
    for f in files:
        _json(f)
    if (d / "tokenizer.json").is_file():
        _json(d / "tokenizer.json")
        return [*files, d / "tokenizer.json"]
    for name in ("vocab.json", "merges.txt"):
        if not (d / name).is_file():
            raise _missing(d / name, "tokenizer")
    _json(d / "vocab.json")
    _merges(d / "merges.txt")
    return [*files, d / "vocab.json", d / "merges.txt"]


def _merges(path: Path) -> None:
    """A BPE merges.txt: its #version header, then lines of two symbols (a truncated file ends in the
    middle of one, or is empty)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, ValueError) as e:
        raise WeightsError(f"{path} cannot be read as UTF-8 text; download it again") from e
    lines = [line for line in text.split("\n") if line and not line.startswith("#version")]
    if not text.strip() or any(len(line.split(" ")) != 2 for line in lines):
        raise WeightsError(f"{path} is not a BPE merges file (truncated or damaged); download it again")


def _t5_tokenizer(d: Path) -> list[Path]:
    """T5's tokenizer: tokenizer.json and/or spiece.model (the real repository has both)."""
    files = [f for f in (d / "tokenizer_config.json", d / "special_tokens_map.json") if f.is_file()]
    for f in files:
        _json(f)
    found = [f for f in (d / "tokenizer.json", d / "spiece.model") if f.is_file()]
    if not found:
        raise _missing(d / "spiece.model", "tokenizer_2")
    for f in found:
        if f.suffix == ".json":
            _json(f)
        else:
            _sentencepiece(f)
    return files + found


def _sentencepiece(path: Path) -> None:
    import sentencepiece

    try:
        sentencepiece.SentencePieceProcessor(model_proto=path.read_bytes())
    except Exception as e:  # sentencepiece raises RuntimeError (or OSError) for a damaged model
        raise WeightsError(
            f"{path} is not a sentencepiece model (truncated or damaged); download it again"
        ) from e
