"""Checkpoints on disk: Components written as a diffusers folder, and a downloaded folder (or BFL's
single-file transformer inside one) read back (`load_local`, what `--model PATH` runs).

Every module is built on the meta device and given its tensors, read by safetensors straight onto the
device and cast there (no copy in host memory, none in fp32, no accelerate). layout.py checks every
file first; the machine's room is checked (random_weights.require_room) before a byte is allocated.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import torch

from ..config import PRESETS, ConfigError, ModelPreset, TransformerConfig
from ..errors import WeightsError
from ..files import move_into_place
from .bfl import config_from_shapes, from_bfl
from .components import DOWNLOAD_HINT, Components, assemble, fingerprint_files
from .key_names import library_names
from .layout import SIDECAR, Layout, find_layout, model_name
from .random_weights import remake_buffers_, require_room
from .safetensors_files import load_bytes, load_tensors, shapes

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sidecar:
    """kontext.json beside model_index.json, written by save_diffusers for presets other than the real one."""

    preset: str
    bucket_family: str
    max_sequence_length: int
    default_steps: int


# --------------------------------------------------------------------------- writing


def save_diffusers(components: Components, folder: Path) -> Path:
    """Write `components` as a diffusers FluxKontextPipeline folder (safetensors), plus kontext.json
    for a configuration other than the real model's. Files land through files.move_into_place, each
    subfolder complete before model_index.json (the file a loader opens first) appears."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=f".{folder.name}.") as tmp_name:
        tmp = Path(tmp_name)
        components.diffusers_pipeline().save_pretrained(tmp, safe_serialization=True)
        p = components.preset
        if p.transformer != PRESETS["kontext-dev"].transformer:
            sidecar = Sidecar(p.name, p.bucket_family, p.max_sequence_length, p.default_steps)
            (tmp / SIDECAR).write_text(json.dumps(asdict(sidecar), indent=2) + "\n")
        for sub in sorted(d for d in tmp.iterdir() if d.is_dir()):
            move_into_place(sub, folder / sub.name)
            sub.rmdir()
        move_into_place(tmp, folder, last="model_index.json")
    log.info("wrote %s (diffusers layout)", folder)
    return folder


# --------------------------------------------------------------------------- reading


def load_local(
    path: Path, *, dtype: torch.dtype, device: torch.device, check_room: bool = True
) -> Components:
    """A diffusers folder, or a BFL single file inside one, -> Components on `device` in `dtype`.

    Refused in one line before anything is allocated when a file is missing or damaged (layout.py) or
    the device cannot hold the weights. `source` is the path as given, made absolute but not resolved,
    so a build from a cache snapshot records the snapshot, not a blob. check_room False: a memory plan
    (engine/memory) has checked the room already and reads the weights into host memory first.
    """
    given = Path(os.path.abspath(Path(path).expanduser()))
    layout = find_layout(given)
    preset = _preset(layout)
    if check_room:
        require_room(f"the checkpoint {given}", load_bytes(layout.weights(), dtype), device)
    state_dict = load_tensors(layout.transformer, device)
    if layout.bfl:
        state_dict = from_bfl(state_dict)
    transformer = build_transformer(preset.transformer, state_dict, dtype)
    vae, text_encoder, text_encoder_2 = _encoders(layout, dtype, device)
    tokenizer, tokenizer_2 = _tokenizers(layout.folder)
    modules = (transformer, vae, text_encoder, text_encoder_2)
    weights_id = fingerprint_files(list(layout.transformer))
    log.info("loaded %s on %s in %s", given, device, dtype)
    return assemble(preset, modules, tokenizer, tokenizer_2, weights_id, str(given))


def source_files(path: Path) -> list[Path]:
    """Every file `load_local(path)` reads (checked), as given: a folder's without BFL's file and
    ae.safetensors, which it never opens; a BFL file's with the folder's encoders, VAE and tokenizers."""
    return find_layout(Path(os.path.abspath(Path(path).expanduser()))).files()


def _preset(layout: Layout) -> ModelPreset:
    if layout.transformer_config is not None:
        return local_preset(layout.folder)
    return _with_sidecar(layout.folder, config_from_shapes(shapes(layout.transformer[0])))


def local_preset(folder: Path) -> ModelPreset:
    """The preset of a diffusers folder: its transformer config, and the family and T5 length from
    kontext.json if present, else the real model's (1 MP, 512 tokens; kontext-dev itself when the
    config is the real one)."""
    try:
        config = json.loads((folder / "transformer" / "config.json").read_text())
        transformer = TransformerConfig.from_diffusers(config)
    except (OSError, ValueError, TypeError, ConfigError) as e:
        raise WeightsError(f"{folder}/transformer/config.json: {e}. {DOWNLOAD_HINT}") from e
    return _with_sidecar(folder, transformer)


def _with_sidecar(folder: Path, transformer: TransformerConfig) -> ModelPreset:
    real = PRESETS["kontext-dev"]
    sidecar_path = folder / SIDECAR
    if sidecar_path.exists():
        try:
            s = Sidecar(**json.loads(sidecar_path.read_text()))
        except (ValueError, TypeError) as e:
            raise WeightsError(f"{sidecar_path} is not a valid {SIDECAR}: {e}") from e
        return ModelPreset(
            s.preset, transformer, s.bucket_family, s.max_sequence_length, default_steps=s.default_steps
        )
    if transformer == real.transformer:
        return real
    log.warning(
        "%s: a non-standard transformer config and no %s; using 1mp buckets, 512 tokens", folder, SIDECAR
    )
    return ModelPreset(model_name(folder), transformer, real.bucket_family, real.max_sequence_length)


def build_transformer(
    config: TransformerConfig, state_dict: dict[str, torch.Tensor], dtype: torch.dtype
) -> Any:
    """A FluxTransformer2DModel built on meta and given `state_dict`'s tensors (cast to `dtype` where
    they lie, named as diffusers' loader names them), in eval mode without gradients."""
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        model = cast(torch.nn.Module, FluxTransformer2DModel(**config.to_diffusers()))
    state_dict = library_names(model, state_dict, "the transformer")
    for k in list(state_dict):
        state_dict[k] = state_dict[k].to(dtype)  # one tensor at a time, on its device
    try:
        model.load_state_dict(state_dict, strict=True, assign=True)
    except RuntimeError as e:
        raise WeightsError(f"the checkpoint does not match its transformer config: {e}") from e
    return model.eval().requires_grad_(False)


def _encoders(layout: Layout, dtype: torch.dtype, device: torch.device) -> tuple[Any, Any, Any]:
    """VAE, CLIP and T5, each built on meta from its config.json and given its checked tensors."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    folder = layout.folder

    def config(sub: str, cls: Any) -> Any:
        try:
            return cls.from_pretrained(folder / sub, local_files_only=True)
        except (OSError, ValueError, TypeError) as e:
            raise WeightsError(
                f"{folder / sub / 'config.json'} is not a valid config ({_first_line(e)})"
            ) from e

    try:
        vae_config = AutoencoderKL.load_config(folder / "vae", local_files_only=True)
    except (OSError, ValueError) as e:
        raise WeightsError(
            f"{folder / 'vae' / 'config.json'} is not a valid config ({_first_line(e)})"
        ) from e
    clip_config, t5_config = config("text_encoder", CLIPTextConfig), config("text_encoder_2", T5Config)
    vae = _on_meta(lambda: AutoencoderKL.from_config(vae_config), layout.vae, dtype, device)
    text_encoder = _on_meta(lambda: CLIPTextModel(clip_config), layout.text_encoder, dtype, device)
    text_encoder_2 = _on_meta(lambda: T5EncoderModel(t5_config), layout.text_encoder_2, dtype, device)
    return vae, text_encoder, text_encoder_2


def _on_meta(
    make: Callable[[], Any], files: tuple[Path, ...], dtype: torch.dtype, device: torch.device
) -> torch.nn.Module:
    """make() on the meta device, then the files' tensors (cast to `dtype` on `device`) assigned, under
    the names the module's own library loads them into (key_names: a transformers 4.x CLIP file's
    `text_model.*` keys are today's unprefixed ones).

    Tied weights (T5's encoder.embed_tokens is its shared.weight, which alone is on disk) are tied
    again; non-persistent buffers (CLIP's position_ids) remade; anything still on meta is an error that
    names the folder. fp16 keeps a model's _keep_in_fp32_modules in fp32, as transformers does.
    """
    with torch.device("meta"):
        model = cast(torch.nn.Module, make())
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or ()) if dtype == torch.float16 else set()
    expected = set(model.state_dict())
    buffers = {n for n, _ in model.named_buffers()}
    where = files[0].parent
    state = {}
    for k, v in library_names(model, load_tensors(files, device), str(where)).items():
        if k not in expected and k in buffers:
            continue  # an old checkpoint's copy of a non-persistent buffer
        fp32 = keep.intersection(k.split("."))
        state[k] = v.to(torch.float32 if fp32 else dtype) if v.is_floating_point() else v
    _missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if unexpected:
        raise WeightsError(
            f"{where}: {len(unexpected)} tensors do not fit its config.json, e.g. {unexpected[:2]}"
        )
    tie = getattr(model, "tie_weights", None)
    if tie is not None:
        tie()
    left = [n for n, p in model.named_parameters() if p.is_meta]
    if left:
        raise WeightsError(f"{where}: {len(left)} tensors are missing, e.g. {left[:2]}; download it again")
    remake_buffers_(model, device)
    return model.eval().requires_grad_(False)


def _tokenizers(folder: Path) -> tuple[Any, Any]:
    from transformers import CLIPTokenizer, T5Tokenizer  # T5Tokenizer is the fast (tokenizers) one in 5.x

    loaded = []
    for sub, cls in (("tokenizer", CLIPTokenizer), ("tokenizer_2", T5Tokenizer)):
        try:
            loaded.append(cls.from_pretrained(folder / sub, local_files_only=True))
        except Exception as e:  # the tokenizers library raises its own exceptions for bad files
            raise WeightsError(f"{folder / sub}/ does not load ({_first_line(e)}); download it again") from e
    return loaded[0], loaded[1]


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:200]
