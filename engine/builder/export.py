"""Export stage: the Kontext transformer -> ONNX, with the Denoiser's argument names as inputs.

The wrapper swaps diffusers' float64 RoPE for a float32 one (the graph holds no DOUBLE tensor),
exports with the dynamo exporter at batch 2 with dynamic batch / image / text axes, and names
every node after the module it came from, so recipes can exclude layers by module path.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..backends import DENOISER_INPUTS, DENOISER_OUTPUT, DenoiserBase
from ..backends.inputs import dummy_inputs
from ..backends.torch import velocity
from ..buckets import ShapeKey
from ..config import TransformerConfig
from ..errors import BuildError
from ..files import move_into_place

log = logging.getLogger(__name__)

DEFAULT_OPSET = 20  # BuildOptions' and `kontext build --opset`'s default
EXPORT_VERSION = 1  # bump when this file changes what it writes (the export stage and request hash see it)
MIN_OPSET = 19
EXTERNAL_DATA_BYTES = 1_800_000_000  # protobuf's limit is 2 GiB; stay clear of it
EXPORT_BATCH = 2  # export with batch >= 2 or the batch axis can freeze at 1


class Float32FluxPosEmbed(torch.nn.Module):
    """FluxPosEmbed computed in float32 (diffusers uses float64; the relative change is ~1e-7)."""

    def __init__(self, theta: float, axes_dim: list[int]) -> None:
        super().__init__()
        self.theta = float(theta)
        self.axes_dim = [int(d) for d in axes_dim]

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pos = ids.float()  # [S, n_axes]
        cos_out, sin_out = [], []
        for i, dim in enumerate(self.axes_dim):
            exponent = torch.arange(0, dim, 2, dtype=torch.float32, device=ids.device) / dim  # [dim/2]
            freqs = 1.0 / (self.theta**exponent)  # [dim/2]
            angles = pos[:, i : i + 1] * freqs[None, :]  # [S, dim/2]
            cos_out.append(angles.cos().repeat_interleave(2, dim=1))  # [S, dim]
            sin_out.append(angles.sin().repeat_interleave(2, dim=1))
        return torch.cat(cos_out, dim=-1), torch.cat(sin_out, dim=-1)  # [S, sum(axes_dim)] each


@contextmanager
def float32_rope(transformer: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Swap `transformer.pos_embed` for a float32 copy for the duration of the block, then restore it."""
    original: Any = transformer.pos_embed
    transformer.pos_embed = Float32FluxPosEmbed(original.theta, list(original.axes_dim))
    try:
        yield transformer
    finally:
        transformer.pos_embed = original


class DenoiserExportWrapper(torch.nn.Module):
    """forward(<DENOISER_INPUTS>) -> velocity: the transformer as the Denoiser contract sees it."""

    # The Denoiser's seven-argument call (DenoiserBase's), whose parameter names become the graph's
    # input names; it packs them and calls run().
    forward = DenoiserBase.__call__

    def __init__(self, transformer: torch.nn.Module) -> None:
        super().__init__()
        self.transformer = transformer

    def run(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:  # DENOISER_INPUTS -> [B, N + M, 64]
        return velocity(self.transformer, inputs)


def dynamic_shapes() -> dict[str, dict[int, object]]:
    """Dynamic batch, image-token (target + context) and text-token axes; ids have no batch axis."""
    batch = torch.export.Dim("batch", min=1, max=64)
    image = torch.export.Dim("image_tokens", min=2, max=65536)
    text = torch.export.Dim("text_tokens", min=1, max=4096)
    return {
        "hidden_states": {0: batch, 1: image},
        "img_ids": {0: image},
        "encoder_hidden_states": {0: batch, 1: text},
        "txt_ids": {0: text},
        "pooled_projections": {0: batch},
        "timestep": {0: batch},
        "guidance": {0: batch},
    }


@dataclass(frozen=True)
class ExportResult:
    onnx_path: Path
    files: tuple[Path, ...]  # the graph and, for big models, its external data file
    external_data: bool


def parameter_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def export_transformer(
    transformer: torch.nn.Module,
    path: Path,
    *,
    cfg: TransformerConfig,
    opset: int = DEFAULT_OPSET,
    text_tokens: int = 32,
) -> ExportResult:
    """Export `transformer` (a diffusers FluxTransformer2DModel of `cfg`, eval, float32) to `path`.

    The example inputs (batch 2, 20 + 20 image tokens) only fix ranks and dtypes: every axis but the
    features is dynamic.

    Files appear under their final names only when whole: everything is written in a temporary
    folder beside `path` and renamed (external data first, the graph last).
    """
    if opset < MIN_OPSET:
        raise BuildError(
            f"opset {opset} is too old: use --opset {MIN_OPSET} or newer (RMSNorm and Gelu need it)"
        )
    inputs = dummy_inputs(cfg, ShapeKey(EXPORT_BATCH, 20, 20, text_tokens))
    external = parameter_bytes(transformer) > EXTERNAL_DATA_BYTES
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(dir=path.parent, prefix=".export-"))
    try:
        with float32_rope(transformer), torch.no_grad():
            program = torch.onnx.export(
                DenoiserExportWrapper(transformer).eval(),
                tuple(inputs[name] for name in DENOISER_INPUTS),
                None,
                dynamo=True,
                opset_version=opset,
                dynamic_shapes=dynamic_shapes(),
                input_names=list(DENOISER_INPUTS),
                output_names=[DENOISER_OUTPUT],
                optimize=True,
                verbose=False,
            )
        if program is None:
            raise BuildError(
                "torch.onnx.export returned no program; upgrade torch to >= 2.8 (dynamo exporter)"
            )
        name_nodes_by_module(program.model)
        tmp_path = tmp_dir / path.name
        program.save(str(tmp_path), external_data=external)
        files = move_into_place(tmp_dir, path.parent, last=path.name)  # external data first, the graph last
        return ExportResult(onnx_path=path, files=tuple(files), external_data=external)
    except BuildError:
        raise
    except Exception as e:  # the exporter raises many types; give one actionable message
        raise BuildError(
            f"ONNX export failed: {type(e).__name__}: {e}. Run with -vv for the exporter's log; "
            "check that torch is 2.8 or newer and diffusers < 0.43"
        ) from e
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def name_nodes_by_module(model: object) -> None:
    """Rename nodes '/<module path>/<Op>_<k>' from the exporter's name-scope metadata (in place).

    The dynamo exporter names nodes 'node_MatMul_11'; its metadata keeps the module path, which is
    what ModelOpt filters and TensorRT layer names should show ('/transformer_blocks.0/attn/to_q/...').
    """
    graph = model.graph  # type: ignore[attr-defined]
    used: set[str] = set()
    for node in graph:
        scopes = node.metadata_props.get("pkg.torch.onnx.name_scopes", "")
        path = _module_path(scopes)
        base = f"/{path}/{node.op_type}" if path else f"/{node.op_type}"
        name, k = base, 0
        while name in used:
            k += 1
            name = f"{base}_{k}"
        used.add(name)
        node.name = name


def _module_path(scopes: str) -> str:
    """ "['', 'transformer', 'transformer.x_embedder', 'linear']" -> 'x_embedder'."""
    parts = [s.strip().strip("'\"") for s in scopes.strip("[]").split(",")]
    modules = [p for p in parts if p.startswith("transformer.")]
    if not modules:
        return ""
    return modules[-1].removeprefix("transformer.").replace(".", "/")
