"""Memory: a plan of where each component lives before a byte is read (plan.py, sizes.py,
activations.py), and the mechanisms it chooses: FP8 storage (fp8_storage.py), block streaming on a
second CUDA stream (streaming.py), T5 off the card (text_encoder.py), the VAE tiled (vae_tiling.py),
applied by apply.py. docs/memory.md has the arithmetic and the measured table."""

from .plan import GIB, Levers, MemoryPlan, plan_memory

__all__ = ["GIB", "Levers", "MemoryPlan", "plan_memory"]
