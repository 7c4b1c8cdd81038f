"""The `nsfw` and `pixtral` checkers on tiny random-weight models of the real architectures (a
ViTForImageClassification with labels normal/nsfw; a LlavaForConditionalGeneration with a Pixtral vision
tower and a Mistral text model, with its tokenizer and image processor), built in memory, saved in the
Hub's folder layout, and loaded through build_policy(models_dir=...) as `--safety-models DIR` does."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from engine.errors import FilterModelError, ModeratedError
from engine.safety import build_policy
from engine.safety.models import NSFW_MODEL, PIXTRAL_MODEL
from engine.safety.nsfw import NsfwChecker
from engine.safety.pixtral import PixtralChecker, check_size
from tests.conftest import gradient_image

# ------------------------------------------------------------------ tiny models of the real architectures


def tiny_vit(seed: int = 0) -> tuple[Any, Any]:
    """A ViT classifier (image 32, patch 8) with Falconsai's labels, and its image processor."""
    from transformers import ViTConfig, ViTForImageClassification
    from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

    config = ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        id2label={0: "normal", 1: "nsfw"},
        label2id={"normal": 0, "nsfw": 1},
    )
    torch.manual_seed(seed)
    model = ViTForImageClassification(config).eval()
    processor = ViTImageProcessorPil(
        size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3
    )
    return model, processor


def set_nsfw_bias(model: Any, nsfw_logit: float) -> None:
    """Zero the head's weights: p(nsfw) = sigmoid(nsfw_logit) for every image."""
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.copy_(torch.tensor([0.0, nsfw_logit]))


def save_vit(model: Any, processor: Any, models_dir: Path) -> Path:
    folder = models_dir / NSFW_MODEL.folder
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


PIXTRAL_TEMPLATE = (  # Pixtral's prompt format: <s>[INST]...[IMG]...[/INST]
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}[INST]"
    "{% for block in message['content'] %}{% if block['type'] == 'text' %}{{ block['content'] }}"
    "{% elif block['type'] == 'image' %}[IMG]{% endif %}{% endfor %}[/INST]{% endif %}{% endfor %}"
)


def tiny_pixtral(seed: int = 0) -> tuple[Any, Any, Any]:
    """(LlavaForConditionalGeneration, tokenizer, image processor): Pixtral vision tower (patch 8), Mistral
    text model, a byte-level BPE tokenizer where "yes" and "no" are single tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import (
        LlavaConfig,
        LlavaForConditionalGeneration,
        MistralConfig,
        PixtralVisionConfig,
        PreTrainedTokenizerFast,
    )
    from transformers.models.pixtral.image_processing_pil_pixtral import PixtralImageProcessorPil

    specials = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[IMG]", "[IMG_BREAK]", "[IMG_END]"]
    vocab = {
        t: i
        for i, t in enumerate(specials + sorted(pre_tokenizers.ByteLevel.alphabet()) + ["ye", "yes", "no"])
    }
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=[("y", "e"), ("ye", "s"), ("n", "o")], unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        chat_template=PIXTRAL_TEMPLATE,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": specials[3:]})
    config = LlavaConfig(
        vision_config=PixtralVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=64,
            patch_size=8,
            head_dim=16,
        ),
        text_config=MistralConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
            max_position_embeddings=8192,
            tie_word_embeddings=False,
        ),
        image_token_index=tokenizer.convert_tokens_to_ids("[IMG]"),
        projector_hidden_act="gelu",
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        multimodal_projector_bias=True,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    processor = PixtralImageProcessorPil(size={"longest_edge": 64}, patch_size={"height": 8, "width": 8})
    return model, tokenizer, processor


def save_pixtral(model: Any, tokenizer: Any, processor: Any, models_dir: Path) -> Path:
    folder = models_dir / PIXTRAL_MODEL.folder
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def lm_head_input(checker: PixtralChecker, run: Any) -> torch.Tensor:
    """The hidden state the LM head sees at the last position while `run(checker)` asks its question."""
    seen: list[torch.Tensor] = []
    hook = checker.model.lm_head.register_forward_hook(
        lambda m, args, out: seen.append(args[0][0, -1].clone())
    )
    try:
        run(checker)
    finally:
        hook.remove()
    assert len(seen) == 1  # one forward: one token, as BFL's generate(max_new_tokens=1)
    return seen[0]


def point_yes_no(model: Any, tokenizer: Any, hidden: torch.Tensor, answer: str) -> None:
    """Make `answer`'s LM-head row +hidden and the other's -hidden: for that input, logit(answer) =
    |h|² > -|h|² = logit(other), whatever the random weights below compute."""
    yes, no = (tokenizer.convert_tokens_to_ids(t) for t in ("yes", "no"))
    win, lose = (yes, no) if answer == "yes" else (no, yes)
    with torch.no_grad():
        model.lm_head.weight[win] = hidden
        model.lm_head.weight[lose] = -hidden


# ------------------------------------------------------------------ nsfw


@pytest.mark.parametrize(("p", "flagged"), [(0.84, False), (0.86, True), (0.99, True), (0.10, False)])
def test_nsfw_threshold_from_a_saved_folder(tmp_path: Path, p: float, flagged: bool) -> None:
    model, processor = tiny_vit()
    set_nsfw_bias(model, math.log(p / (1 - p)))
    save_vit(model, processor, tmp_path)
    policy = build_policy("nsfw", models_dir=tmp_path)
    (checker,) = policy.checkers
    verdict = checker.check_image(gradient_image(300, 200), "output")
    assert verdict.checker == "nsfw" and verdict.flagged is flagged
    assert verdict.scores["nsfw"] == pytest.approx(p, abs=1e-6)
    assert checker.check_prompt("anything at all").flagged is False  # images only, as BFL's classifier
    if flagged:
        with pytest.raises(ModeratedError) as e:
            policy.check_output(gradient_image(64, 64))
        assert e.value.stage == "content" and e.value.verdict.checker == "nsfw"
    else:
        policy.check_output(gradient_image(64, 64))


def test_nsfw_score_is_the_classifier_softmax_of_the_preprocessed_image(tmp_path: Path) -> None:
    """Random weights: the score depends on the image, and equals the model's own forward on pixels
    resized to 32x32 and normalised to [-1, 1] (the processor's config)."""
    import numpy as np

    model, processor = tiny_vit(seed=1)
    checker = NsfwChecker.from_folder(save_vit(model, processor, tmp_path))
    a, b = gradient_image(120, 80, seed=0), gradient_image(120, 80, seed=5).rotate(90)
    resized = np.asarray(a.resize((32, 32), Image.Resampling.BILINEAR), dtype=np.float32) / 127.5 - 1.0
    pixels = torch.from_numpy(resized).permute(2, 0, 1)[None]  # [1, 3, 32, 32]
    with torch.no_grad():
        expected = float(model(pixel_values=pixels).logits.softmax(-1)[0, 1])
    assert checker.score(a) == pytest.approx(expected, abs=1e-5)
    assert checker.score(a) != pytest.approx(checker.score(b), abs=1e-4)


def test_nsfw_needs_the_nsfw_label(tmp_path: Path) -> None:
    model, processor = tiny_vit()
    model.config.label2id = {"cat": 0, "dog": 1}
    with pytest.raises(FilterModelError, match="not 'nsfw'"):
        NsfwChecker(model, processor)


# ------------------------------------------------------------------ missing models name what to download


def test_missing_models_name_the_repos_and_folders(tmp_path: Path) -> None:
    with pytest.raises(FilterModelError) as e:
        build_policy("nsfw", models_dir=tmp_path)
    msg = str(e.value)
    assert "Falconsai/nsfw_image_detection" in msg and str(tmp_path / "nsfw_image_detection") in msg
    with pytest.raises(FilterModelError) as e:
        build_policy("pixtral")  # no --safety-models at all
    msg = str(e.value)
    assert "--safety-models" in msg
    assert "mistral-community/pixtral-12b" in msg and "Falconsai/nsfw_image_detection" in msg
    assert "DIR/pixtral-12b" in msg and "DIR/nsfw_image_detection" in msg
    model, processor = tiny_vit()
    save_vit(model, processor, tmp_path)  # the classifier is there, Pixtral is not
    (tmp_path / PIXTRAL_MODEL.folder).mkdir()
    with pytest.raises(
        FilterModelError, match=r"pixtral-12b lacks config\.json.*mistral-community/pixtral-12b"
    ):
        build_policy("pixtral", models_dir=tmp_path)


# ------------------------------------------------------------------ pixtral


@pytest.fixture(scope="module")
def pixtral_parts() -> tuple[Any, Any, Any]:
    return tiny_pixtral()


def _nsfw_passing(tmp_path: Path) -> None:
    model, processor = tiny_vit()
    set_nsfw_bias(model, -5.0)  # p(nsfw) = 0.007: the classifier lets everything through to Pixtral
    save_vit(model, processor, tmp_path)


@pytest.mark.parametrize("answer", ["yes", "no"])
def test_pixtral_prompt_question_from_a_saved_folder(tmp_path: Path, pixtral_parts: Any, answer: str) -> None:
    model, tokenizer, processor = pixtral_parts
    prompt = "put the cat in a red hat"
    hidden = lm_head_input(
        PixtralChecker(model, tokenizer, processor, nsfw=None), lambda c: c.check_prompt(prompt)
    )
    point_yes_no(model, tokenizer, hidden, answer)
    save_pixtral(model, tokenizer, processor, tmp_path)
    _nsfw_passing(tmp_path)
    policy = build_policy("pixtral", models_dir=tmp_path)
    assert [c.name for c in policy.checkers] == ["pixtral"]
    verdict = policy.checkers[0].check_prompt(prompt)
    assert verdict.flagged is (answer == "yes")
    assert (verdict.scores["yes"] > 0.5) is (answer == "yes")
    if answer == "yes":
        with pytest.raises(ModeratedError) as e:
            policy.check_request(prompt, [])
        assert e.value.stage == "request" and e.value.verdict.checker == "pixtral"
    else:
        policy.check_request(prompt, [])


@pytest.mark.parametrize("answer", ["yes", "no"])
def test_pixtral_image_question_at_512_squared(tmp_path: Path, pixtral_parts: Any, answer: str) -> None:
    model, tokenizer, processor = pixtral_parts
    image = gradient_image(96, 48, seed=2)
    hidden = lm_head_input(
        PixtralChecker(model, tokenizer, processor, nsfw=None), lambda c: c.check_image(image, "input")
    )
    point_yes_no(model, tokenizer, hidden, answer)
    save_pixtral(model, tokenizer, processor, tmp_path)
    _nsfw_passing(tmp_path)
    checker = build_policy("pixtral", models_dir=tmp_path).checkers[0]
    assert isinstance(checker, PixtralChecker)
    verdict = checker.check_image(image, "input")
    assert verdict.checker == "pixtral" and verdict.flagged is (answer == "yes")
    # the image Pixtral saw: 96x48 scaled to ~512² (724x362), then the processor's 64-pixel longest edge
    # and 8-pixel patches: 8x4 patches, one [IMG_BREAK] per row but the last, which is [IMG_END]
    assert check_size(96, 48) == (724, 362)
    ids, pixels, sizes = checker.inputs([{"type": "image"}], [image.resize(check_size(96, 48))])
    assert pixels is not None and sizes is not None and sizes.tolist() == [[32, 64]]
    tokens = tokenizer.convert_ids_to_tokens(ids[0].tolist())
    assert (
        tokens.count("[IMG]") == 8 * 4 and tokens.count("[IMG_BREAK]") == 3 and tokens.count("[IMG_END]") == 1
    )


def test_pixtral_asks_the_classifier_first(tmp_path: Path, pixtral_parts: Any) -> None:
    """An image the NSFW classifier flags never reaches Pixtral (BFL's order), whatever Pixtral says."""
    model, tokenizer, processor = pixtral_parts
    vit, vit_processor = tiny_vit()
    set_nsfw_bias(vit, 5.0)  # p = 0.993
    checker = PixtralChecker(model, tokenizer, processor, nsfw=NsfwChecker(vit, vit_processor))
    calls: list[int] = []
    hook = model.register_forward_hook(lambda *a: calls.append(1))
    try:
        verdict = checker.check_image(gradient_image(64, 64), "output")
    finally:
        hook.remove()
    assert verdict.flagged and verdict.checker == "nsfw" and calls == []


def test_pixtral_tie_goes_to_the_lower_token_id(pixtral_parts: Any) -> None:
    """Equal yes/no logits: greedy decoding's argmax picks the first maximum, the lower id ("yes" here)."""
    import copy

    model, tokenizer, processor = pixtral_parts
    tied = copy.deepcopy(model)
    yes, no = (tokenizer.convert_tokens_to_ids(t) for t in ("yes", "no"))
    assert yes < no
    with torch.no_grad():
        tied.lm_head.weight[[yes, no]] = 0.0
    verdict = PixtralChecker(tied, tokenizer, processor, nsfw=None).check_prompt("a red hat")
    assert verdict.flagged and verdict.scores["yes"] == 0.5


def test_pixtral_beside_nsfw_runs_once(tmp_path: Path, pixtral_parts: Any) -> None:
    model, tokenizer, processor = pixtral_parts
    save_pixtral(model, tokenizer, processor, tmp_path)
    _nsfw_passing(tmp_path)
    assert [c.name for c in build_policy("nsfw,pixtral", models_dir=tmp_path).checkers] == ["pixtral"]


# ------------------------------------------------------------------ the policy around them


def test_cheapest_checker_first_and_the_first_flag_stops(tmp_path: Path) -> None:
    """blocklist, then nsfw: a blocked prompt never costs a classifier run on the image."""
    model, processor = tiny_vit()
    set_nsfw_bias(model, 5.0)  # would flag any image
    save_vit(model, processor, tmp_path)
    terms = tmp_path / "terms.txt"
    terms.write_text("red hat\n", encoding="utf-8")
    policy = build_policy("nsfw,blocklist", models_dir=tmp_path, blocklist=terms)
    assert [c.name for c in policy.checkers] == ["blocklist", "nsfw"]
    with pytest.raises(ModeratedError) as e:
        policy.check_request("a red hat", [gradient_image(32, 32)])
    assert e.value.verdict.checker == "blocklist"
    assert policy.counts() == {("blocklist", "prompt", "flagged"): 1}
    with pytest.raises(ModeratedError) as e:
        policy.check_request("a blue cap", [gradient_image(32, 32)])
    assert e.value.verdict.checker == "nsfw" and e.value.stage == "request"


def test_concurrent_checks_match_serial_ones(tmp_path: Path) -> None:
    """A server checks from many threads: same scores as one by one, every verdict counted."""
    from concurrent.futures import ThreadPoolExecutor

    model, processor = tiny_vit(seed=2)
    save_vit(model, processor, tmp_path)
    policy = build_policy("nsfw", models_dir=tmp_path)
    (checker,) = policy.checkers
    images = [gradient_image(48, 40, seed=i) for i in range(8)]
    serial = [checker.check_image(im, "output").scores["nsfw"] for im in images]
    with ThreadPoolExecutor(4) as pool:
        parallel = list(pool.map(lambda im: checker.check_image(im, "output").scores["nsfw"], images))
        list(pool.map(policy.check_output, images * 4))
    assert parallel == serial
    assert policy.counts() == {("nsfw", "output", "passed"): 32}
