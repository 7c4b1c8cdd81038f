"""The diffusers adapter: our denoisers inside diffusers' FluxKontextPipeline (docs/diffusers.md).

calls.py: diffusers_call, the keywords that run an EditRequest through diffusers as our pipeline does.
transformer.py: DenoiserTransformer, a Denoiser as a diffusers ModelMixin transformer.
pipeline.py: as_transformer / kontext_pipeline, a loaded engine as a FluxKontextPipeline.
diffusers' model classes are imported on first use of the last two (the bench needs only the first).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .calls import diffusers_call

if TYPE_CHECKING:
    from .pipeline import as_transformer, kontext_pipeline
    from .transformer import DenoiserTransformer

__all__ = ["DenoiserTransformer", "as_transformer", "diffusers_call", "kontext_pipeline"]

_LAZY = {"DenoiserTransformer": "transformer", "as_transformer": "pipeline", "kontext_pipeline": "pipeline"}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from importlib import import_module

    return getattr(import_module(f".{_LAZY[name]}", __name__), name)
