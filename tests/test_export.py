"""Export: input/output names, no DOUBLE tensors, opset, dynamic axes, parity with the torch transformer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from engine.backends import DENOISER_INPUTS, DENOISER_OUTPUT
from engine.backends.inputs import dummy_inputs
from engine.buckets import ShapeKey
from engine.builder.calibrate import load_golden
from engine.builder.export import MIN_OPSET, Float32FluxPosEmbed, float32_rope
from engine.metrics import rel_l2
from engine.model.components import Components

ONNX = "onnx/transformer.onnx"


def _graph(built: Path) -> onnx.ModelProto:
    return onnx.load(str(built / ONNX))


def test_graph_interface(built_tiny: Path) -> None:
    m = _graph(built_tiny)
    assert [i.name for i in m.graph.input] == list(DENOISER_INPUTS)
    assert [o.name for o in m.graph.output] == [DENOISER_OUTPUT]
    assert max(o.version for o in m.opset_import if o.domain in ("", "ai.onnx")) >= MIN_OPSET
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in m.graph.input}
    assert dims["hidden_states"][:2] == ["batch", "image_tokens"]
    assert dims["img_ids"] == ["image_tokens", 3]  # no batch axis
    assert dims["txt_ids"] == ["text_tokens", 3]
    assert dims["encoder_hidden_states"][:2] == ["batch", "text_tokens"]


def test_graph_holds_no_double(built_tiny: Path) -> None:
    m = onnx.shape_inference.infer_shapes(_graph(built_tiny))
    double = onnx.TensorProto.DOUBLE
    typed = [*m.graph.input, *m.graph.output, *m.graph.value_info]
    assert not [v.name for v in typed if v.type.tensor_type.elem_type == double]
    assert not [t.name for t in m.graph.initializer if t.data_type == double]
    casts = [n.name for n in m.graph.node if n.op_type == "Cast" and any(a.i == double for a in n.attribute)]
    assert not casts


def test_nodes_are_named_by_module(built_tiny: Path) -> None:
    names = {n.name for n in _graph(built_tiny).graph.node if n.op_type in ("MatMul", "Gemm")}
    assert "/x_embedder/MatMul" in names
    assert "/transformer_blocks/0/attn/to_q/MatMul" in names
    assert "/proj_out/MatMul" in names


def test_float32_rope_matches_diffusers_and_is_restored(tiny: Components) -> None:
    ids = torch.cat([torch.zeros(32, 3), torch.randint(0, 40, (128, 3)).float()])
    ref_cos, ref_sin = tiny.transformer.pos_embed(ids)
    original = tiny.transformer.pos_embed
    with float32_rope(tiny.transformer) as tr:
        assert isinstance(tr.pos_embed, Float32FluxPosEmbed)
        cos, sin = tr.pos_embed(ids)
    assert tiny.transformer.pos_embed is original
    assert cos.dtype == torch.float32
    torch.testing.assert_close(cos, ref_cos, atol=1e-5, rtol=0)
    torch.testing.assert_close(sin, ref_sin, atol=1e-5, rtol=0)


def _torch(tiny: Components, inputs: dict[str, np.ndarray]) -> np.ndarray:
    with torch.inference_mode():
        t = {k: torch.from_numpy(v) for k, v in inputs.items()}
        return tiny.transformer(**t, return_dict=False)[0].numpy()


def test_onnx_matches_torch_on_every_shape_key(built_tiny: Path, tiny: Components) -> None:
    session = ort.InferenceSession(str(built_tiny / ONNX), providers=["CPUExecutionProvider"])
    reference = load_golden(built_tiny / "verify/golden.npz")
    assert len(reference) == 4  # the tiny family's shape keys
    for key, samples in reference.items():
        for s in samples:
            inputs = {n: s[n] for n in DENOISER_INPUTS}
            assert rel_l2(session.run(None, inputs)[0], _torch(tiny, inputs)) < 1e-4, key


@pytest.mark.parametrize("batch,image_tokens,text_tokens", [(3, 90, 20), (2, 128, 32)])
def test_onnx_matches_torch_at_other_batches(
    built_tiny: Path, tiny: Components, batch: int, image_tokens: int, text_tokens: int
) -> None:
    session = ort.InferenceSession(str(built_tiny / ONNX), providers=["CPUExecutionProvider"])
    cfg = tiny.preset.transformer
    inputs = {
        k: v.numpy()
        for k, v in dummy_inputs(
            cfg, ShapeKey(batch, image_tokens // 2, image_tokens - image_tokens // 2, text_tokens)
        ).items()
    }
    out = session.run(None, inputs)[0]
    assert out.shape == (batch, image_tokens, cfg.in_channels)
    assert rel_l2(out, _torch(tiny, inputs)) < 1e-4
