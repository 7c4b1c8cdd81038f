"""A checkpoint's tensor names -> the names today's module has, renamed as the module's own library
renames them in `from_pretrained`, through that library's machinery (never a copy of its tables).

- transformers (5.x): `conversion_mapping.get_model_conversion_mapping(model)` gives the model's
  renamings (e.g. CLIPTextModel's `PrefixChange(prefix_to_remove="text_model")`: files written by
  4.x name every CLIP tensor `text_model.*`), applied by `core_model_loading.rename_source_key` with
  the base-model prefix, as `convert_and_load_state_dict_in_model` does. A key that needs one of its
  WeightConverters (a tensor split or merged) is refused: that is a format we have not met.
- diffusers: `ModelMixin._fix_state_dict_keys_on_load` (the pre-0.14 attention names `query`, `key`,
  `value`, `proj_attn` -> `to_q`...), which diffusers applies to single-file weights; it leaves
  FluxTransformer2DModel's and AutoencoderKL's current names as they are.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import WeightsError


def library_names(model: Any, state: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """`state` (a file's tensors) under the names `model`'s library gives them when it loads the file."""
    if hasattr(model, "_fix_state_dict_keys_on_load"):  # a diffusers ModelMixin
        fixed = dict(state)
        model._fix_state_dict_keys_on_load(fixed)
        return fixed
    if hasattr(model, "base_model_prefix") and hasattr(model, "config"):  # a transformers PreTrainedModel
        names = transformers_names(model, list(state), where)
        return {names[k]: v for k, v in state.items()}
    return state


def transformers_names(model: Any, keys: list[str], where: str) -> dict[str, str]:
    """Each checkpoint key -> the key transformers' own loader loads it into (unchanged where none fits)."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    mapping = get_model_conversion_mapping(model)
    renamings = [t for t in mapping if isinstance(t, WeightRenaming)]
    converters = [t for t in mapping if isinstance(t, WeightConverter)]
    expected = model.state_dict()  # on meta: names and shapes only
    prefix = model.base_model_prefix
    out: dict[str, str] = {}
    for key in keys:
        name, converter = rename_source_key(key, renamings, converters, prefix, expected)
        if name not in expected and key in expected:  # as transformers does: renamed away from a fit
            name, converter = rename_source_key(key, [], [], prefix, expected)
        if converter is not None:
            raise WeightsError(
                f"{where}: {key} needs transformers' tensor conversion {converter!r}, which this loader "
                "does not apply; download the model's current files"
            )
        out[key] = name
    if len(set(out.values())) != len(out):
        raise WeightsError(f"{where}: two tensors of the file load into one name; download it again")
    return out
