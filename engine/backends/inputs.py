"""The Denoiser's inputs for one shape key: their shapes (TensorRT profiles and contexts) and seeded
dummy values (warmup, CUDA-graph capture, ONNX export). One definition for all of them."""

from __future__ import annotations

import torch

from ..buckets import ShapeKey
from ..config import TransformerConfig


def input_shapes(cfg: TransformerConfig, key: ShapeKey) -> dict[str, tuple[int, ...]]:
    """The Denoiser inputs' shapes for one shape key: TensorRT profiles, warmup and export use these."""
    b, n, l = key.batch, key.image_tokens, key.text_tokens  # noqa: E741
    return {
        "hidden_states": (b, n, cfg.in_channels),
        "img_ids": (n, 3),
        "encoder_hidden_states": (b, l, cfg.joint_attention_dim),
        "txt_ids": (l, 3),
        "pooled_projections": (b, cfg.pooled_projection_dim),
        "timestep": (b,),
        "guidance": (b,),
    }


def dummy_inputs(
    cfg: TransformerConfig,
    key: ShapeKey,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Seeded inputs of one shape key, for warmup and export (only shapes and dtypes matter there).

    Activations, timestep in `dtype`; ids and guidance float32, as the pipeline passes them.
    """
    g = torch.Generator().manual_seed(seed)
    shapes = input_shapes(cfg, key)
    n, l = shapes["img_ids"][0], shapes["txt_ids"][0]  # noqa: E741
    out = {
        "hidden_states": torch.randn(shapes["hidden_states"], generator=g).to(dtype),  # [B, N + M, C]
        "img_ids": torch.randint(0, 8, (n, 3), generator=g).float(),  # [N + M, 3]
        "encoder_hidden_states": torch.randn(shapes["encoder_hidden_states"], generator=g).to(dtype),
        "txt_ids": torch.zeros(l, 3),  # [L, 3]
        "pooled_projections": torch.randn(shapes["pooled_projections"], generator=g).to(dtype),  # [B, D]
        "timestep": torch.rand(shapes["timestep"], generator=g).to(dtype),  # [B]
        "guidance": torch.full(shapes["guidance"], 2.5),  # [B]
    }
    return {k: v.to(device) for k, v in out.items()}
