"""Each moderation outcome through the Python API (engine.load(...).edit / .save) and the CLI (exit status
3, one line, nothing written), review holds, and the safe defaults, on the tiny preset with real checkers
(the blocklist, and the NSFW classifier at random weights with a chosen head)."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

import engine
from engine import assets
from engine.cli import main
from engine.config import is_synthetic
from engine.errors import ModeratedError
from engine.images import load_image, read_png_metadata
from engine.safety import SafetyPolicy, build_policy, resolve_policy
from engine.safety.nsfw import NsfwChecker
from engine.safety.policy import LICENCE_WARNING
from tests.test_safety_models import save_vit, set_nsfw_bias, tiny_vit

PROMPT = "add a small red hat"
SEED = 4


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


def model_calls(kontext: Any) -> dict[str, int]:
    """Forward passes of every model of the edit (text encoders, VAE encoder/decoder, transformer),
    counted by hooks while the test runs."""
    c = kontext.components
    modules = {
        "text_encoder": c.text_encoder,
        "text_encoder_2": c.text_encoder_2,
        "vae_encoder": c.vae.encoder,
        "vae_decoder": c.vae.decoder,
        "transformer": c.transformer,
    }
    counts = dict.fromkeys(modules, 0)
    for name, module in modules.items():

        def hook(*_: object, name: str = name) -> None:
            counts[name] += 1

        module.register_forward_hook(hook)
    return counts


@pytest.fixture(scope="module")
def images() -> tuple[Image.Image, Image.Image]:
    """(the bundled sample, its tiny edit at SEED): what the input and output checks see."""
    image = load_image(assets.sample_image_path())
    with engine.load("tiny", safety="off") as kontext:
        out = kontext.edit(image, PROMPT, seed=SEED).image
    return image, out


@pytest.fixture(scope="module")
def output_flagging_models(
    images: tuple[Image.Image, Image.Image], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """A --safety-models folder whose classifier passes the input (p < 0.85) and flags the output (p >
    0.85): the random ViT's nsfw-minus-normal logits of the two differ; the head's bias puts 0.85 between."""
    model, processor = tiny_vit(seed=3)
    with torch.no_grad():
        model.classifier.weight *= 30  # widen the random gap between the two images' logits
    probe = NsfwChecker(model, processor)
    d_in, d_out = (math.log(p / (1 - p)) for p in (probe.score(images[0]), probe.score(images[1])))
    assert abs(d_out - d_in) > 1.0  # the threshold sits > 0.5 logits from each: far above float noise
    if d_out < d_in:  # flip the labels so that the output is the more "nsfw" one
        model.config.id2label, model.config.label2id = {0: "nsfw", 1: "normal"}, {"nsfw": 0, "normal": 1}
        d_in, d_out = -d_in, -d_out
    nsfw = model.config.label2id["nsfw"]
    with torch.no_grad():
        model.classifier.bias[nsfw] += math.log(0.85 / 0.15) - (d_in + d_out) / 2
    folder = tmp_path_factory.mktemp("output-flagging")
    save_vit(model, processor, folder)
    check = NsfwChecker.from_folder(folder / "nsfw_image_detection")
    assert check.score(images[0]) < 0.85 < check.score(images[1])
    return folder


@pytest.fixture(scope="module")
def everything_flagging_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model, processor = tiny_vit()
    set_nsfw_bias(model, 5.0)  # p(nsfw) = 0.993 for every image
    folder = tmp_path_factory.mktemp("all-flagging")
    save_vit(model, processor, folder)
    return folder


@pytest.fixture
def blocklist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("blocklist") / "terms.txt"
    path.write_text("red hat\n", encoding="utf-8")
    return path


# ------------------------------------------------------------------ Python API


def test_flagged_prompt_runs_no_model(blocklist: Path, tmp_path: Path) -> None:
    with engine.load("tiny", safety=build_policy("blocklist", blocklist=blocklist)) as kontext:
        calls = model_calls(kontext)
        with pytest.raises(ModeratedError) as e:
            kontext.edit(load_image(assets.sample_image_path()), "add a RED-HAT", seed=SEED)
        assert e.value.stage == "request" and e.value.verdict.checker == "blocklist"
        assert calls == dict.fromkeys(calls, 0)
        kontext.edit(load_image(assets.sample_image_path()), "add a blue cap", seed=SEED, steps=1)
        assert all(n > 0 for n in calls.values())  # the hooks do count when the edit runs
        assert kontext.safety.counts() == {
            ("blocklist", "prompt", "flagged"): 1,
            ("blocklist", "prompt", "passed"): 1,
        }


def test_flagged_input_runs_no_model(everything_flagging_models: Path) -> None:
    policy = build_policy("nsfw", models_dir=everything_flagging_models)
    with engine.load("tiny", safety=policy) as kontext:
        calls = model_calls(kontext)
        with pytest.raises(ModeratedError) as e:
            kontext.edit(assets.sample_image_path(), PROMPT, seed=SEED)
        assert e.value.stage == "request" and "input image" in e.value.verdict.reason
        assert calls == dict.fromkeys(calls, 0)


def test_flagged_output_is_not_returned(output_flagging_models: Path, tmp_path: Path) -> None:
    policy = build_policy("nsfw", models_dir=output_flagging_models)
    with engine.load("tiny", safety=policy) as kontext:
        calls = model_calls(kontext)
        with pytest.raises(ModeratedError) as e:
            kontext.edit(assets.sample_image_path(), PROMPT, seed=SEED)
        assert e.value.stage == "content" and e.value.verdict.checker == "nsfw"
        assert e.value.verdict.scores["nsfw"] > 0.85 and "output image" in e.value.verdict.reason
        assert calls["transformer"] > 0  # the edit ran; its output was dropped
        assert policy.counts() == {("nsfw", "input", "passed"): 1, ("nsfw", "output", "flagged"): 1}


def test_review_holds_the_output(tmp_path: Path) -> None:
    with engine.load("tiny", safety="review") as kontext:
        assert kontext.safety.review and not kontext.safety.checkers
        result = kontext.edit(assets.sample_image_path(), PROMPT, seed=SEED, steps=1)
        saved = kontext.outputs.save(result, tmp_path / "out.png", source=assets.sample_image_path())
    assert saved.held and saved.path == tmp_path / "review" / "out.png"
    assert files_under(tmp_path) == {saved.path}
    assert read_png_metadata(saved.path)["prompt"] == PROMPT


# ------------------------------------------------------------------ CLI: exit 3, one line, nothing written


def _cli(capsys: pytest.CaptureFixture[str], out: Path, *args: str) -> tuple[int, str, str]:
    code = main(["edit", "--no-progress", "--seed", str(SEED), "-o", str(out), *args, "--", "", PROMPT])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def quiet_root_logger() -> Iterator[None]:
    """main() calls logging.basicConfig; keep the handler it adds from outliving the test."""
    root = logging.getLogger()
    handlers = list(root.handlers)
    yield
    root.handlers[:] = handlers


@pytest.mark.usefixtures("quiet_root_logger")
def test_cli_flagged_prompt(capsys: pytest.CaptureFixture[str], tmp_path: Path, blocklist: Path) -> None:
    before = files_under(tmp_path)
    code, out, err = _cli(
        capsys, tmp_path / "out.png", "--safety", "blocklist", "--blocklist", str(blocklist)
    )
    assert code == 3 and out == ""
    assert err.splitlines() == [
        "kontext edit: request moderated: blocklist: prompt matches blocklist term #1; nothing was written"
    ]
    assert files_under(tmp_path) == before


@pytest.mark.usefixtures("quiet_root_logger")
def test_cli_flagged_input(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, everything_flagging_models: Path
) -> None:
    code, out, err = _cli(
        capsys, tmp_path / "out.png", "--safety", "nsfw", "--safety-models", str(everything_flagging_models)
    )
    assert code == 3 and out == ""
    assert len(err.splitlines()) == 1 and err.startswith("kontext edit: request moderated: nsfw: input image")
    assert files_under(tmp_path) == set()


@pytest.mark.usefixtures("quiet_root_logger")
def test_cli_flagged_output(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, output_flagging_models: Path
) -> None:
    code, out, err = _cli(
        capsys, tmp_path / "out.png", "--safety", "nsfw", "--safety-models", str(output_flagging_models)
    )
    assert code == 3 and out == ""
    assert len(err.splitlines()) == 1 and err.startswith("kontext edit: output moderated: nsfw: output image")
    assert files_under(tmp_path) == set()


@pytest.mark.usefixtures("quiet_root_logger")
def test_cli_review(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, out, err = _cli(capsys, tmp_path / "out.png", "--safety", "review", "--steps", "1")
    assert code == 0 and err == ""
    assert out.startswith(f"held for review: {tmp_path / 'review' / 'out.png'} (")
    assert len(out.splitlines()) == 1
    assert files_under(tmp_path) == {tmp_path / "review" / "out.png"}
    code, out, _ = _cli(
        capsys,
        tmp_path / "out.png",
        "--safety",
        "review",
        "--steps",
        "1",
        "--review-dir",
        str(tmp_path / "held"),
    )
    assert code == 0 and (tmp_path / "held" / "out.png").is_file()


# ------------------------------------------------------------------ safe defaults


def test_defaults_by_model(caplog: pytest.LogCaptureFixture) -> None:
    assert is_synthetic("tiny") and is_synthetic("small")
    assert not is_synthetic("kontext-dev") and not is_synthetic("models/kontext-dev")
    with caplog.at_level(logging.WARNING, logger="engine.safety.policy"):
        assert resolve_policy(None, synthetic=True).off
        assert resolve_policy("off", synthetic=True).off
        assert not caplog.records  # random weights: no licence duty, no warning
        real = resolve_policy(None, synthetic=False)
        assert real.review and not real.checkers and real.names == ("review",)
        assert not caplog.records
        assert resolve_policy("off", synthetic=False).off
    assert [r.getMessage() for r in caplog.records] == [LICENCE_WARNING]
    policy = SafetyPolicy()
    assert resolve_policy(policy, synthetic=False) is policy


@pytest.fixture(scope="module")
def local_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny preset exported as a diffusers folder: loaded from a path, it is the real model's kind."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxKontextPipeline

    from engine.model.load import load_components

    c = load_components("tiny")
    folder = tmp_path_factory.mktemp("local-model")
    FluxKontextPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=c.vae,
        text_encoder=c.text_encoder,
        tokenizer=c.tokenizer,
        text_encoder_2=c.text_encoder_2,
        tokenizer_2=c.tokenizer_2,
        transformer=c.transformer,
    ).save_pretrained(folder, safe_serialization=True)
    return folder


def test_a_local_model_defaults_to_review_and_off_warns(
    local_model: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with engine.load("tiny") as kontext:
        assert kontext.safety.off
    with engine.load(local_model) as kontext:
        assert kontext.safety.review and kontext.safety.names == ("review",)
    with (
        caplog.at_level(logging.WARNING, logger="engine.safety.policy"),
        engine.load(local_model, safety="off") as kontext,
    ):
        assert kontext.safety.off
    assert LICENCE_WARNING in [r.getMessage() for r in caplog.records]
