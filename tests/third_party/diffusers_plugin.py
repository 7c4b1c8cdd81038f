"""A pytest plugin for diffusers' own pipeline tests: puts our adapter in place of the transformer.

Loaded by diffusers_suite.py (`-p diffusers_plugin`, from the folder it prepares), never by our suite.
KONTEXT_SUITE_TRANSFORMER: "stock" (diffusers' FluxTransformer2DModel) or "adapter"
(engine.adapters.DenoiserTransformer over it); KONTEXT_SUITE_GUIDANCE: "0" (the tests' own config) or "1"
(guidance_embeds=True, Kontext [dev]'s). Each test class's get_dummy_components is wrapped once, keeping
its signature (the cache tests read its parameters).
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch

TRANSFORMER = os.environ.get("KONTEXT_SUITE_TRANSFORMER", "stock")
GUIDANCE = os.environ.get("KONTEXT_SUITE_GUIDANCE", "0") == "1"


def pytest_collection_modifyitems(items: list[Any]) -> None:
    seen: set[type] = set()
    for item in items:
        cls = getattr(item, "cls", None)
        if cls is None or cls in seen or not hasattr(cls, "get_dummy_components"):
            continue
        seen.add(cls)
        cls.get_dummy_components = _wrap(cls.get_dummy_components)


def _wrap(original: Any) -> Any:
    @functools.wraps(original)
    def get_dummy_components(self: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        components = original(self, *args, **kwargs)
        transformer = components["transformer"]
        if GUIDANCE and not transformer.config.guidance_embeds:
            from diffusers import FluxTransformer2DModel

            torch.manual_seed(0)
            transformer = FluxTransformer2DModel.from_config({**transformer.config, "guidance_embeds": True})
        if TRANSFORMER == "adapter":
            from engine.adapters import DenoiserTransformer

            transformer = DenoiserTransformer.from_module(transformer)
        components["transformer"] = transformer
        return components

    return get_dummy_components
