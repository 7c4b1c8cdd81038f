# Types of the lazily imported public API (engine/__init__.py resolves these names on first use).
from .adapters import DenoiserTransformer as DenoiserTransformer
from .adapters import kontext_pipeline as kontext_pipeline
from .runtime import KontextEngine as KontextEngine
from .runtime import load as load

__version__: str
__all__ = ["DenoiserTransformer", "KontextEngine", "kontext_pipeline", "load"]
