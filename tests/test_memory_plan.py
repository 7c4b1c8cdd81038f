"""The memory plan's arithmetic for the full model on the meta device, against an independent count of
its parameters (the layout tables of tests/test_full_preset.py, written from BFL's and diffusers' code)
and the activation formulas of docs/memory.md recomputed here by hand; the choice at 80, 48, 24, 16 and
12 GiB in bf16 and fp8; a 1 GiB card refused in one line; the JSON contract; `engine.load` refusing
before any weight is read."""

from __future__ import annotations

import json
import math

import pytest

from engine.memory.plan import CONTEXT_BYTES, GIB, MARGIN, evaluate, ladder, plan_memory
from engine.memory.sizes import model_sizes
from tests.test_full_preset import diffusers_layout

T5_PARAMS, CLIP_PARAMS, VAE_PARAMS = 4_762_310_656, 123_060_480, 83_819_683  # published files' counts


def independent_transformer_bytes() -> tuple[int, int, int]:
    """(bf16, FP8 storage, largest FP8 block) from the layout table: FP8 = every 2-D weight inside a
    block at 1 byte + a 4-byte scale, everything else at 2 bytes."""
    layout = diffusers_layout()
    bf16 = 2 * sum(math.prod(s) for s in layout.values())
    fp8, blocks = 0, {}
    for name, shape in layout.items():
        in_block = name.startswith(("transformer_blocks.", "single_transformer_blocks."))
        b = math.prod(shape) + 4 if in_block and len(shape) == 2 else 2 * math.prod(shape)
        fp8 += b
        if in_block:
            key = ".".join(name.split(".")[:2])
            blocks[key] = blocks.get(key, 0) + b
    return bf16, fp8, max(blocks.values())


@pytest.fixture(scope="module")
def sizes():
    return model_sizes("full")


def test_component_bytes_match_an_independent_count(sizes):
    bf16, fp8, block = independent_transformer_bytes()
    assert bf16 == 2 * 11_901_408_320 == sizes.bf16["transformer"]
    assert sizes.transformer_fp8 == fp8 and max(sizes.blocks_fp8) == block
    assert fp8 < 0.51 * bf16  # FP8 storage: half, less the embedders and norms kept in bf16
    assert sizes.bf16["text_encoder_2"] == 2 * T5_PARAMS
    assert sizes.bf16["text_encoder"] == 2 * CLIP_PARAMS
    assert sizes.bf16["vae"] == 2 * VAE_PARAMS
    assert len(sizes.blocks_bf16) == 19 + 38


def hand_phases(levers: tuple[str, ...], sizes) -> dict[str, int]:  # type: ignore[no-untyped-def]
    """docs/memory.md's formulas, by hand, for the full model at the 1mp family's largest edit: 4150
    target + 4150 context tokens (1328x800), 512 text tokens; the VAE at 1328x800 (also the most pixels)."""
    bf16, fp8, block = independent_transformer_bytes()
    S, D, H, hd, L, px = 4150 * 2 + 512, 3072, 24, 128, 512, 1328 * 800
    denoise = 12 * S * D * 2 + H * S * 4 + 2 * S * hd * 4 + 4 * 8300 * 64 * 4
    text = 3 * L * 10240 * 2 + 4 * L * 4096 * 2 + 2 * 64 * L * L * 4
    area = 512 * 512 if "vae-tiled" in levers else px
    vae = 4 * 256 * area * 2 + 2 * 3 * px * 4
    if "vae-tiled" in levers:
        vae += int(3 * px * 4 / 0.75**2)
    t = fp8 if "fp8" in levers else bf16
    if "streamed" in levers:
        t = sizes.transformer_fixed_fp8 + 2 * block
    t5 = 2 * T5_PARAMS
    on_card = t + 2 * CLIP_PARAMS + 2 * VAE_PARAMS + (0 if any(x.startswith("t5-") for x in levers) else t5)
    text_t5 = t5 if "t5-released" in levers else 0
    return {
        "text": on_card + text_t5 + (0 if "t5-cpu" in levers else text),
        "denoise": on_card + denoise,
        "vae": on_card + vae,
    }


EXPECTED = {  # card GiB -> levers (the same in bf16 and fp8, except fp8 alone at 80 and 48)
    80: (),
    48: (),
    24: ("t5-released", "fp8"),
    16: ("t5-cpu", "fp8"),
    12: ("t5-released", "fp8", "vae-tiled", "streamed"),
}


@pytest.mark.parametrize("precision", ["bf16", "fp8"])
@pytest.mark.parametrize("gib", sorted(EXPECTED, reverse=True))
def test_the_plan_at_each_card(sizes, gib, precision):
    plan = plan_memory(sizes, vram=gib, precision=precision)
    want = EXPECTED[gib] or (("fp8",) if precision == "fp8" else ())
    assert plan.levers.names() == want
    assert plan.fits and plan.phases == hand_phases(want, sizes)
    usable = int(gib * GIB * (1 - MARGIN)) - CONTEXT_BYTES
    assert plan.budget_bytes == usable and plan.peak_bytes <= usable
    # the fastest that fits: every rung before it does not
    rungs = ladder(precision)
    chosen = rungs.index(plan.levers)
    for faster in rungs[:chosen]:
        assert evaluate(sizes, faster, gib * GIB, precision=precision).peak_bytes > usable, faster
    t = plan.components["transformer"]
    assert t.dtype == ("fp8" if "fp8" in want else "bf16")
    assert t.placement == ("streamed" if "streamed" in want else "resident")


def test_published_sizes_in_gib(sizes):
    """The plan on the real model's sizes: 22.17 GiB of bf16 transformer, 8.87 GiB of T5."""
    assert round(sizes.bf16["transformer"] / GIB, 2) == 22.17
    assert round(sizes.bf16["text_encoder_2"] / GIB, 2) == 8.87
    assert round(plan_memory(sizes, vram=80).peak_bytes / GIB, 2) == 33.47


def test_a_1_gib_card_is_refused_in_one_line(sizes):
    plan = plan_memory(sizes, vram=1)
    assert not plan.fits and plan.smallest_card_gib == 3
    assert plan_memory(sizes, vram=3).fits and not plan_memory(sizes, vram=2).fits
    line = plan.refusal()
    assert "\n" not in line and "3 GiB" in line and "--vram 3" in line


def test_kontext_plan_cli_json_and_refusal(capsys):
    from engine.cli import main

    assert main(["plan", "--model", "full", "--vram", "16", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"fits", "peak_bytes", "components"}
    assert set(out["components"]) == {"transformer", "text_encoder", "text_encoder_2", "vae"}
    for c in out["components"].values():
        assert set(c) == {"placement", "dtype", "bytes"}
    assert out["components"]["transformer"] == {"placement": "resident", "dtype": "fp8", "bytes": 11968589880}
    assert out["components"]["text_encoder_2"]["placement"] == "cpu" and out["fits"] is True
    assert main(["plan", "--model", "full", "--vram", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "smallest card that fits has 3 GiB" in err[0]


def test_load_refuses_before_reading_a_weight():
    from engine.errors import ConfigError
    from engine.runtime import load

    with pytest.raises(ConfigError, match="smallest card that fits has 3 GiB"):
        load("full", device="cpu", vram=1)  # the full preset on a CPU would be refused later, by room


def test_vram_option_is_validated():
    from engine.config import LoadOptions
    from engine.errors import ConfigError

    assert LoadOptions(vram=24).vram == 24 and LoadOptions(vram="auto").vram == "auto"
    for bad in (0, -1, "lots", True):
        with pytest.raises(ConfigError, match="vram must be"):
            LoadOptions(vram=bad)  # type: ignore[arg-type]


def test_kontext_info_shows_the_plan(capsys):
    from engine.cli import main

    assert main(["info", "--vram", "24"]) == 0
    out = capsys.readouterr().out
    assert "memory plan: full in bf16 on a 24 GiB card (t5-released, fp8)" in out
    assert "text_encoder_2  released" in out
