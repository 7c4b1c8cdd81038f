"""LoRA: tiny random LoRAs for the tiny transformer, in diffusers and kohya format, fused by us at load;
the fused transformer equals diffusers' load_lora_weights + fuse_lora and the LoRA arithmetic
(W + scale * alpha / rank * B @ A) within 1e-5, holds plain Linear layers again, and changes weights_id
with each file and scale. Pickles are refused before they are read."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from engine.backends.torch import TorchDenoiser
from engine.cli import main
from engine.errors import WeightsError
from engine.images import read_png_metadata
from engine.model.components import Components
from engine.model.lora import LoraSpec, file_sha256, fuse_loras, lora_weights_id

TOL = 1e-5
RANK = 4
# diffusers (peft) names of the tiny transformer's Linears a LoRA adapts
DIFFUSERS_TARGETS = (
    "transformer_blocks.0.attn.to_q",
    "transformer_blocks.0.attn.to_add_out",
    "single_transformer_blocks.1.proj_out",
)
# kohya (BFL layer) name -> the diffusers Linears it covers; qkv is one fused matrix split in 3
KOHYA_TARGETS = {
    "lora_unet_double_blocks_0_img_attn_proj": ("transformer_blocks.0.attn.to_out.0",),
    "lora_unet_double_blocks_0_img_attn_qkv": tuple(f"transformer_blocks.0.attn.to_{x}" for x in "qkv"),
    "lora_unet_single_blocks_1_linear2": ("single_transformer_blocks.1.proj_out",),
}
KOHYA_ALPHA = 2.0


def _randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 0.2


def diffusers_lora(tiny: Components, path: Path, seed: int = 0) -> dict[str, tuple[torch.Tensor, float]]:
    """Write a diffusers-format LoRA; return {linear name: (its delta B @ A, alpha / rank = 1)}."""
    state, deltas = {}, {}
    for i, name in enumerate(DIFFUSERS_TARGETS):
        lin = tiny.transformer.get_submodule(name)
        a, b = (
            _randn(RANK, lin.in_features, seed=seed + 2 * i),
            _randn(lin.out_features, RANK, seed=seed + 2 * i + 1),
        )
        state[f"transformer.{name}.lora_A.weight"], state[f"transformer.{name}.lora_B.weight"] = a, b
        deltas[name] = (b @ a, 1.0)
    save_file(state, str(path))
    return deltas


def kohya_lora(tiny: Components, path: Path, seed: int = 100) -> dict[str, tuple[torch.Tensor, float]]:
    """Write a kohya-format LoRA (lora_down, lora_up, alpha); return per-Linear deltas and alpha / rank."""
    state, deltas = {}, {}
    for i, (key, names) in enumerate(KOHYA_TARGETS.items()):
        lins = [tiny.transformer.get_submodule(n) for n in names]
        outs = [lin.out_features for lin in lins]
        down, up = (
            _randn(RANK, lins[0].in_features, seed=seed + 2 * i),
            _randn(sum(outs), RANK, seed=seed + 2 * i + 1),
        )
        state[f"{key}.lora_down.weight"], state[f"{key}.lora_up.weight"] = down, up
        state[f"{key}.alpha"] = torch.tensor(KOHYA_ALPHA)
        for name, rows in zip(names, torch.split(up, outs), strict=True):
            deltas[name] = (rows @ down, KOHYA_ALPHA / RANK)
    save_file(state, str(path))
    return deltas


def velocity(transformer: torch.nn.Module) -> torch.Tensor:
    """One transformer forward on fixed random inputs of a tiny shape (64 target + 64 context tokens)."""
    n, l = 128, 32  # noqa: E741
    ids = torch.cat([torch.zeros(64, 3), torch.ones(64, 3)])
    ids[:, 1:] = torch.arange(64).repeat(2)[:, None] % 8
    args = (
        _randn(1, n, 64, seed=1),
        ids,
        _randn(1, l, 32, seed=2),
        torch.zeros(l, 3),
        _randn(1, 32, seed=3),
        torch.tensor([0.6]),
        torch.tensor([2.5]),
    )
    return TorchDenoiser(transformer)(*args)


def by_arithmetic(
    tiny: Components, deltas: dict[str, tuple[torch.Tensor, float]], scale: float
) -> torch.nn.Module:
    t = copy.deepcopy(tiny.transformer)
    with torch.no_grad():
        for name, (delta, alpha_over_rank) in deltas.items():
            t.get_submodule(name).weight += scale * alpha_over_rank * delta
    return t


def by_diffusers(tiny: Components, path: Path, scale: float) -> torch.nn.Module:
    c = copy.deepcopy(tiny)
    pipe = c.diffusers_pipeline()
    pipe.load_lora_weights(str(path))
    pipe.fuse_lora(lora_scale=scale)
    return c.transformer


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_fused_lora_equals_diffusers_and_the_arithmetic(tiny, tmp_path, fmt):
    path = tmp_path / f"{fmt}.safetensors"
    deltas = (diffusers_lora if fmt == "diffusers" else kohya_lora)(tiny, path)
    scale = 0.7
    ours = fuse_loras(copy.deepcopy(tiny), [LoraSpec(path, scale)])
    v = velocity(ours.transformer)
    for name, peer in (
        ("diffusers", by_diffusers(tiny, path, scale)),
        ("arithmetic", by_arithmetic(tiny, deltas, scale)),
    ):
        err = (v - velocity(peer)).abs().max().item()
        assert err <= TOL, f"{fmt} vs {name}: max abs {err:.3g}"
    assert (v - velocity(tiny.transformer)).abs().max() > 100 * TOL  # the LoRA changed the output
    # the adapters are gone: plain Linears, the base model's parameter names, nothing else
    assert type(ours.transformer.get_submodule(next(iter(deltas)))) is torch.nn.Linear
    assert set(ours.transformer.state_dict()) == set(tiny.transformer.state_dict())


def test_two_loras_add_at_their_scales(tiny, tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    deltas_a, deltas_b = diffusers_lora(tiny, a, seed=0), kohya_lora(tiny, b)
    ours = fuse_loras(copy.deepcopy(tiny), [LoraSpec(a, 0.5), LoraSpec(b, -1.0)])
    expected = by_arithmetic(tiny, deltas_a, 0.5)
    with torch.no_grad():
        for name, (delta, alpha_over_rank) in deltas_b.items():
            expected.get_submodule(name).weight -= alpha_over_rank * delta
    assert (velocity(ours.transformer) - velocity(expected)).abs().max().item() <= TOL


def test_weights_id_follows_files_and_scales(tiny, tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    diffusers_lora(tiny, a, seed=0)
    diffusers_lora(tiny, b, seed=50)
    ids = {
        spec: fuse_loras(copy.deepcopy(tiny), list(spec)).weights_id
        for spec in [
            (LoraSpec(a, 1.0),),
            (LoraSpec(a, 0.5),),
            (LoraSpec(b, 1.0),),
            (LoraSpec(a), LoraSpec(b)),
        ]
    }
    assert len(set(ids.values()) | {tiny.weights_id}) == 5  # every LoRA set and scale: its own id
    again = fuse_loras(copy.deepcopy(tiny), [LoraSpec(a, 0.5)]).weights_id
    assert (
        again
        == ids[(LoraSpec(a, 0.5),)]
        == lora_weights_id(tiny.weights_id, [LoraSpec(a, 0.5)], [file_sha256(a)])
    )


def test_pickles_and_fakes_are_refused(tiny, tmp_path):
    pickle = tmp_path / "lora.pt"
    torch.save({"transformer.x.lora_A.weight": torch.zeros(1)}, pickle)
    with pytest.raises(WeightsError, match=r"only \.safetensors LoRAs are loaded"):
        fuse_loras(copy.deepcopy(tiny), [LoraSpec(pickle)])
    disguised = tmp_path / "lora.safetensors"
    disguised.write_bytes(pickle.read_bytes())
    with pytest.raises(WeightsError, match="is not a valid safetensors file"):
        fuse_loras(copy.deepcopy(tiny), [LoraSpec(disguised)])
    with pytest.raises(WeightsError, match="no such file"):
        fuse_loras(copy.deepcopy(tiny), [LoraSpec(tmp_path / "missing.safetensors")])


def test_spec_parsing():
    assert LoraSpec.parse("style.safetensors:0.8") == LoraSpec(Path("style.safetensors"), 0.8)
    assert LoraSpec.parse("style.safetensors") == LoraSpec(Path("style.safetensors"), 1.0)
    assert LoraSpec.parse("C:\\loras\\a.safetensors") == LoraSpec(Path("C:\\loras\\a.safetensors"))
    assert LoraSpec.parse("C:\\loras\\a.safetensors:-0.5").scale == -0.5


def test_cli_edit_fuses_the_lora(tiny, tmp_path):
    lora = tmp_path / "style.safetensors"
    diffusers_lora(tiny, lora)
    out = tmp_path / "out.png"
    assert main(["edit", "--steps", "1", "--no-progress", "--lora", f"{lora}:0.5", "-o", str(out)]) == 0
    expected = lora_weights_id(tiny.weights_id, [LoraSpec(lora, 0.5)], [file_sha256(lora)])
    meta = read_png_metadata(out)
    assert meta["weights"] == expected and meta["loras"] == f"{lora.name}:0.5"
