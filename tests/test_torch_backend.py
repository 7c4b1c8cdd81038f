"""The torch path's levers on the tiny model: option parsing, weight-sharing copies, fused QKV, the two
FP8 filters, static FP8 scales, the CUDA-graph wrapper's buffer plumbing, and contestant isolation.
The `gpu` tests hold what only a GPU can check: graph replay equals eager, FP8 within its bound.

Bounds. Fused QKV computes the same products from concatenated weights: <= 1e-6 relative L2 (measured
0 on this CPU). Static FP8 (E4M3, per-tensor scales, fp32 accumulation) on tiny: measured 3.6e-3
(tokens) and 4.0e-3 (all) relative L2 per forward, bound 0.05. A planted 1000x too small amax (inputs
saturate) gives 0.087 on the whole tiny model, whose residual path dilutes block errors, and 0.99 on one
Linear, which is where the numerics are checked tightly.
"""

from __future__ import annotations

import pytest
import torch

from engine.backends.cuda_graphs import Captured, GraphedCall
from engine.backends.fp8 import StaticFp8Linear, fp8_linears, is_modulation, quantize_static
from engine.backends.torch import (
    TorchDenoiser,
    compile_blocks,
    fuse_qkv,
    torch_denoiser,
    velocity,
    weight_sharing_copy,
)
from engine.backends.torch_options import LEVERS, TorchOptions, check_options, parse_levers, parse_spec
from engine.bench.isolation import changed, fingerprint
from engine.calibration import calibrate_amax
from engine.errors import BackendUnavailableError, ConfigError
from engine.metrics import rel_l2

STATIC_BOUND = 0.05
CPU = torch.device("cpu")


def inputs(side: int = 128, seed: int = 0, text: int = 32) -> dict[str, torch.Tensor]:
    """Denoiser inputs of the tiny model for a square side (target + context tokens)."""
    g = torch.Generator().manual_seed(seed)
    n = (side // 16) ** 2
    return {
        "hidden_states": torch.randn(1, 2 * n, 64, generator=g),  # [B, N + M, 64]
        "img_ids": torch.randint(0, side // 16, (2 * n, 3), generator=g).float(),  # [N + M, 3]
        "encoder_hidden_states": torch.randn(1, text, 32, generator=g),  # [B, L, 32]
        "txt_ids": torch.zeros(text, 3),
        "pooled_projections": torch.randn(1, 32, generator=g),
        "timestep": torch.tensor([0.5]),
        "guidance": torch.tensor([2.5]),
    }


@pytest.fixture(scope="module")
def amax(tiny):
    return calibrate_amax(tiny, device="cpu", dtype=torch.float32, edits=2, steps=2)


# ----------------------------------------------------------------------------- options


def test_contestant_names_round_trip_and_refuse_nonsense():
    mode, opts = parse_spec("torch-fp8+graphs+qkv+all")
    assert mode == "fp8" and opts.cuda_graphs and opts.fused_qkv and opts.fp8_filter == "all"
    assert opts.levers == ("all", "qkv", "graphs")  # canonical order: LEVERS'
    mode, opts = parse_spec("torch-fp8+attn-fp8-block")
    assert opts.attention == "kernel-fp8-block" and opts.levers == ("attn-fp8-block",)
    for token in LEVERS:
        assert token in parse_levers(token).levers
    with pytest.raises(ConfigError, match="unknown torch lever 'turbo'"):
        parse_spec("torch-fp8+turbo")
    with pytest.raises(ConfigError, match="torch-"):
        parse_spec("tensorrt-fp8")
    with pytest.raises(ConfigError, match="fp8 only"):
        parse_spec("torch-compile+static")  # static FP8 scales without FP8: refused, not ignored
    with pytest.raises(ConfigError, match="not eager"):
        check_options("eager", TorchOptions(dynamic=True))
    with pytest.raises(ConfigError, match="fp8_filter"):
        TorchOptions(fp8_filter="some")


def test_fp8_filters_differ_by_exactly_the_modulation_layers(tiny):
    tokens, every = fp8_linears(tiny.transformer, "tokens"), fp8_linears(tiny.transformer, "all")
    assert set(tokens) < set(every)
    extra = set(every) - set(tokens)
    assert extra and all(is_modulation(n) for n in extra)
    # one modulation Linear per double-block stream, one per single block
    cfg = tiny.preset.transformer
    assert len(extra) == 2 * cfg.num_layers + cfg.num_single_layers
    assert not any(
        n.startswith(("x_embedder", "context_embedder", "time_text_embed", "norm_out", "proj_out"))
        for n in every
    )
    # only the top-level proj_out is kept: every single block's proj_out is a block Linear like the others
    singles = [f"single_transformer_blocks.{i}.proj_out" for i in range(cfg.num_single_layers)]
    assert set(singles) <= set(tokens)


def test_fp8_filter_on_the_full_kontext_config_selects_418_linears():
    """On the real 12B layout (built on the meta device, no memory) the default filter
    quantizes 418 Linears: 19 double blocks x 12 (q, k, v, added q, k, v, to_out, to_add_out, two FFNs
    of two Linears) + 38 single blocks x 5 (q, k, v, proj_mlp, proj_out). `all` adds the 2 x 19 + 38
    modulation Linears: 494. Matching FP8_KEEP on any path component kept the 38 single-block proj_out
    in bf16 (380 and 456), which is not the recipe that measured 225 ms (docs/hardware.md; the recipe:
    docs/gpu.md, 'The FP8 recipe')."""
    from diffusers import FluxTransformer2DModel

    from engine.config import KONTEXT_DEV_TRANSFORMER as cfg

    with torch.device("meta"):
        t = FluxTransformer2DModel(**cfg.to_diffusers())
    tokens, every = fp8_linears(t, "tokens"), fp8_linears(t, "all")
    assert (cfg.num_layers, cfg.num_single_layers) == (19, 38)
    assert len(tokens) == 418
    assert len(every) == 494
    assert sum(n.endswith(".proj_out") for n in tokens) == 38
    kept = [n for n, m in t.named_modules() if isinstance(m, torch.nn.Linear) and n not in every]
    top = {"x_embedder", "context_embedder", "time_text_embed", "norm_out", "proj_out"}
    assert {n.split(".")[0] for n in kept} == top


# ----------------------------------------------------------------------------- copies and levers


def test_weight_sharing_copy_shares_every_tensor_and_no_module(tiny):
    t = tiny.transformer
    cp = weight_sharing_copy(t)
    originals = dict(t.named_parameters())
    for name, p in cp.named_parameters():
        assert p is originals[name]
    assert cp.transformer_blocks[0] is not t.transformer_blocks[0]
    assert cp.transformer_blocks[0].attn is not t.transformer_blocks[0].attn


def test_fused_qkv_on_a_copy_matches_and_leaves_the_original(tiny):
    t = tiny.transformer
    before = fingerprint(t)
    x = inputs()
    ref = TorchDenoiser(t)(**x)
    fused = fuse_qkv(weight_sharing_copy(t))
    attn = fused.transformer_blocks[0].attn
    assert hasattr(attn, "to_qkv") and hasattr(attn, "to_added_qkv")
    assert not hasattr(attn, "to_q")  # detached: the fused path is the only one left to run
    assert hasattr(fused.single_transformer_blocks[0].attn, "to_qkv")
    assert rel_l2(TorchDenoiser(fused)(**x), ref) <= 1e-6
    assert not changed(before, fingerprint(t))
    assert hasattr(t.transformer_blocks[0].attn, "to_q") and not hasattr(
        t.transformer_blocks[0].attn, "to_qkv"
    )


@pytest.mark.slow  # dynamo traces every block
def test_regional_compile_traces_each_block_type_once_per_shape(tiny, monkeypatch):
    """Without JointSlices the first single block got contiguous inputs and the later ones slices of one
    [B, L + N, D] tensor, so dynamo compiled the single block twice per shape (3 graphs per shape on tiny,
    whose 1 double and 2 single blocks should make 2). Counted with a backend that only counts."""
    from torch._dynamo.testing import CompileCounter

    counter = CompileCounter()
    module_compile = torch.nn.Module.compile

    def counted(self, mode=None, dynamic=None):
        module_compile(self, backend=counter, dynamic=dynamic)

    monkeypatch.setattr(torch.nn.Module, "compile", counted)
    torch._dynamo.reset()
    try:
        view = compile_blocks(tiny.transformer)
        for n, side in enumerate((128, 64)):
            x = inputs(side=side, seed=n)
            out = TorchDenoiser(view)(**x)
            assert counter.frame_count == 2 * (n + 1)  # one graph per block type per shape
            assert rel_l2(out, TorchDenoiser(tiny.transformer)(**x)) <= 1e-6
    finally:
        torch._dynamo.reset()


def test_calibration_is_deterministic_and_covers_every_eligible_linear(tiny, amax):
    assert set(amax) == set(fp8_linears(tiny.transformer, "all"))
    assert all(v > 0 for v in amax.values())
    again = calibrate_amax(tiny, device="cpu", dtype=torch.float32, edits=2, steps=2)
    assert again == amax


@pytest.mark.parametrize("which", ["tokens", "all"])
def test_static_fp8_within_its_bound_and_a_bad_scale_is_caught(tiny, amax, which):
    t = tiny.transformer
    x = inputs(seed=3)
    ref = TorchDenoiser(t)(**x)
    q = quantize_static(weight_sharing_copy(t), amax, CPU, which, allow_cpu=True)
    swapped = [n for n, m in q.named_modules() if isinstance(m, StaticFp8Linear)]
    assert sorted(swapped) == sorted(fp8_linears(t, which))
    err = rel_l2(TorchDenoiser(q)(**x), ref)
    assert err < STATIC_BOUND, err
    saturated = {k: v * 1e-3 for k, v in amax.items()}  # planted bug: scales 1000x too small
    bad = quantize_static(weight_sharing_copy(t), saturated, CPU, which, allow_cpu=True)
    assert rel_l2(TorchDenoiser(bad)(**x), ref) > 10 * err  # (the tiny model's residual path dilutes it)


def test_static_fp8_linear_numerics():
    """One Linear alone: E4M3 rounding (3 mantissa bits) costs ~2-3% relative L2; a saturating input
    scale far more. Measured 0.035 and 0.99."""
    g = torch.Generator().manual_seed(0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        lin = torch.nn.Linear(64, 48)
    x = torch.randn(4, 10, 64, generator=g)
    ref = lin(x)
    amax = float(x.abs().amax())
    err = rel_l2(StaticFp8Linear(lin, amax)(x), ref)
    assert 1e-3 < err < STATIC_BOUND, err  # quantized (not a pass-through), within the bound
    assert rel_l2(StaticFp8Linear(lin, amax * 1e-3)(x), ref) > 0.5


def test_static_fp8_linear_asks_for_fast_accumulation(monkeypatch):
    """One _scaled_mm per call, with use_fast_accum=True as torchao's Float8 Linears (left
    False, Hopper accumulates with periodic fp32 promotion: a slower GEMM than the dynamic contestant's)."""
    calls: list[dict] = []
    real = torch._scaled_mm

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "_scaled_mm", spy)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        lin = torch.nn.Linear(64, 48)
    x = torch.randn(2, 5, 64)
    y = StaticFp8Linear(lin, float(x.abs().amax()))(x)
    assert y.shape == (2, 5, 48)
    assert len(calls) == 1 and calls[0].get("use_fast_accum") is True
    assert calls[0]["out_dtype"] == x.dtype


def test_static_fp8_refuses_missing_calibration(tiny, amax):
    partial = dict(list(amax.items())[1:])
    with pytest.raises(ConfigError, match="no calibrated amax"):
        quantize_static(weight_sharing_copy(tiny.transformer), partial, CPU, "all", allow_cpu=True)
    with pytest.raises(ConfigError, match="calibrate_amax"):
        torch_denoiser(weight_sharing_copy(tiny.transformer), mode="fp8", options=parse_levers("static"))
    with pytest.raises(BackendUnavailableError, match="CUDA graphs"):
        torch_denoiser(tiny.transformer, mode="eager", device="cpu", options=parse_levers("graphs"))


def test_kernel_attention_lever_says_why_it_cannot_run(tiny):
    try:
        import engine.kernels  # noqa: F401

        pytest.skip("engine.kernels is importable here: the GPU tests run the swap")
    except ImportError:
        pass
    with pytest.raises(BackendUnavailableError, match=r"engine\.kernels"):
        torch_denoiser(weight_sharing_copy(tiny.transformer), device="cpu", options=parse_levers("attn-bf16"))


@pytest.mark.slow  # two engine loads and edits
def test_engine_load_applies_the_levers():
    from engine.runtime import load

    from .conftest import gradient_image

    image = gradient_image(128, 128)
    with load("tiny") as plain, load("tiny", torch_options=parse_levers("qkv")) as fused:
        assert fused.name == "torch-eager-fp32+qkv"
        assert hasattr(fused.components.transformer.transformer_blocks[0].attn, "to_qkv")
        a = plain.edit(image, "add a red hat", steps=2).latents
        b = fused.edit(image, "add a red hat", steps=2).latents
    assert rel_l2(b, a) <= 1e-6


def test_cli_edit_refuses_bad_levers_in_one_line(capsys):
    from engine.cli import main

    assert main(["edit", "--levers", "turbo", "--no-progress"]) == 2
    assert "unknown torch lever 'turbo'" in capsys.readouterr().err
    assert main(["edit", "--torch-mode", "compile", "--levers", "static", "--no-progress"]) == 2
    assert "fp8 only" in capsys.readouterr().err


# ----------------------------------------------------------------------------- CUDA-graph plumbing


def replaying_capture(fn, example):
    """A CPU stand-in for graph capture with the same contract: the 'graph' reads the static input
    buffers and writes the static output at every replay, never the tensors of the capturing call."""
    static = {k: v.clone() for k, v in example.items()}
    out = fn(static)

    def replay() -> None:
        out.copy_(fn(static))

    return Captured(static, out, replay)


def test_graphed_call_replays_per_signature_on_fresh_inputs(tiny):
    t = tiny.transformer
    graphed = GraphedCall(lambda i: velocity(t, i), capture=replaying_capture)
    eager = TorchDenoiser(t)
    with torch.inference_mode():
        for x in (inputs(seed=0), inputs(seed=1), inputs(side=64, seed=2), inputs(seed=4)):
            out = graphed(x)
            assert torch.equal(out, eager(**x))  # the new inputs were copied in: no stale replay
    assert graphed.captured == 2  # one graph per input signature (128 and 64 px), reused after
    first = graphed(inputs(seed=0))
    graphed(inputs(seed=1))
    assert torch.equal(first, eager(**inputs(seed=0)))  # a returned output is not the static buffer


def test_each_graphed_call_captures_into_its_own_memory_pool(tiny, monkeypatch):
    """The graphs of one GraphedCall share its pool; two GraphedCalls never share one."""
    from engine.backends import cuda_graphs

    handles = iter(range(100))
    pools: list[tuple[int, int]] = []  # (GraphedCall, pool) of every capture

    owner = [0]  # which GraphedCall captures now

    def fake_capture(fn, example, warmup=2, pool=None):
        pools.append((owner[0], pool))
        return replaying_capture(fn, example)

    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: next(handles))
    monkeypatch.setattr(cuda_graphs, "capture_cuda_graph", fake_capture)
    t = tiny.transformer
    with torch.inference_mode():
        for n in (0, 1):
            owner[0] = n
            graphed = GraphedCall(lambda i: velocity(t, i))
            graphed(inputs(seed=0))
            graphed(inputs(side=64, seed=1))
            assert graphed.captured == 2
    assert pools == [(0, 0), (0, 0), (1, 1), (1, 1)]


# ----------------------------------------------------------------------------- isolation


def test_no_contestant_changes_anothers_modules(tiny, amax):
    """Every lever that swaps modules or weights, each on its own copy: the baseline's tensors and each
    contestant's tensors are unchanged by all the others. A contestant working in place is caught."""
    t = tiny.transformer
    x = inputs(seed=5)
    baseline = fingerprint(t)

    def static(module: torch.nn.Module, which: str) -> torch.nn.Module:
        return quantize_static(module, amax, CPU, which, allow_cpu=True)

    makers = {
        "qkv": lambda: fuse_qkv(weight_sharing_copy(t)),
        "static-tokens": lambda: static(weight_sharing_copy(t), "tokens"),
        "static-all+qkv": lambda: static(fuse_qkv(weight_sharing_copy(t)), "all"),
    }
    modules = {name: make() for name, make in makers.items()}
    prints = {name: fingerprint(m) for name, m in modules.items()}
    outs = {name: TorchDenoiser(m)(**x) for name, m in modules.items()}
    for name, m in modules.items():
        assert not changed(prints[name], fingerprint(m)), name
        assert torch.equal(TorchDenoiser(m)(**x), outs[name]), name
    assert not changed(baseline, fingerprint(t))
    # The check catches a contestant that works in place on a module tree another one runs:
    shared = weight_sharing_copy(t)  # stands for a baseline that two contestants would share
    before = fingerprint(shared)
    quantize_static(shared, amax, CPU, "tokens", allow_cpu=True)  # no copy: swaps the shared modules
    assert changed(before, fingerprint(shared))
    assert not changed(baseline, fingerprint(t))  # (the session's tiny model itself stayed intact)


# ----------------------------------------------------------------------------- GPU


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _gpu_inputs(side: int = 128, seed: int = 0) -> dict[str, torch.Tensor]:
    return {
        k: v.to("cuda", torch.bfloat16 if v.is_floating_point() and k != "guidance" else v.dtype)
        for k, v in inputs(side, seed).items()
    }


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("mode", ["eager", "compile"])
def test_cuda_graph_replay_equals_eager_on_gpu(mode):
    from engine.model.load import load_components

    t = load_components("tiny").transformer.to("cuda", torch.bfloat16)
    plain = torch_denoiser(weight_sharing_copy(t), mode=mode, device="cuda")
    graphed = torch_denoiser(weight_sharing_copy(t), mode=mode, device="cuda", options=parse_levers("graphs"))
    for x in (_gpu_inputs(128, 0), _gpu_inputs(128, 1), _gpu_inputs(64, 2)):
        a, b = plain(**x), graphed(**x)
        assert torch.isfinite(b).all()
        if mode == "eager":
            assert torch.equal(a, b)  # the same kernels, replayed
        else:
            assert rel_l2(b.float(), a.float()) < 1e-3


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("levers", ["", "all", "static", "qkv+graphs"])
def test_fp8_path_within_its_bound_on_gpu(levers):
    from engine.backends.fp8 import device_capability, fp8_supported
    from engine.model.load import load_components

    if not fp8_supported(device_capability(torch.device("cuda"))):
        pytest.skip("FP8 needs compute capability >= 8.9")
    comps = load_components("tiny", dtype=torch.bfloat16, device="cuda")
    t = comps.transformer
    before = fingerprint(t)
    x = _gpu_inputs()
    ref = TorchDenoiser(t)(**x).float()
    options = parse_levers(levers)
    amax = (
        calibrate_amax(comps, device="cuda", dtype=torch.bfloat16) if options.fp8_scales == "static" else None
    )
    d = torch_denoiser(weight_sharing_copy(t), mode="fp8", device="cuda", options=options, amax=amax)
    assert rel_l2(d(**x).float(), ref) < 0.15
    assert not changed(before, fingerprint(t))  # FP8 on a copy leaves the bf16 module as it was


@pytest.mark.gpu
@cuda
def test_kernel_attention_swap_on_gpu():
    pytest.importorskip("engine.kernels")
    from engine.model.load import load_components

    t = load_components("tiny", dtype=torch.bfloat16, device="cuda").transformer
    x = _gpu_inputs()
    ref = TorchDenoiser(t)(**x).float()
    d = torch_denoiser(weight_sharing_copy(t), mode="eager", device="cuda", options=parse_levers("attn-bf16"))
    assert rel_l2(d(**x).float(), ref) < 0.02


@pytest.mark.gpu
@cuda
def test_compile_cache_is_written_after_a_compile(tmp_path):
    from engine.model.load import load_components

    t = load_components("tiny", dtype=torch.bfloat16, device="cuda").transformer
    d = torch_denoiser(t, mode="compile", device="cuda", options=TorchOptions(compile_cache=tmp_path))
    d(**_gpu_inputs())
    path = d.save_compile_cache()
    assert path is not None and path.stat().st_size > 0
