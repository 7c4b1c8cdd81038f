# Types of the lazily imported public API (engine/__init__.py resolves these names on first use).
from .adapters import DenoiserTransformer as DenoiserTransformer
from .adapters import kontext_pipeline as kontext_pipeline
from .request import EditRequest as EditRequest
from .runtime import KontextEngine as KontextEngine
from .runtime import load as load
from .version import __version__ as __version__

__all__ = ["DenoiserTransformer", "EditRequest", "KontextEngine", "__version__", "kontext_pipeline", "load"]
