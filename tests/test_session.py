"""Successive edits: reencode=True is a user re-uploading each saved output (bit for bit);
reencode=False hands the previous turn's final latents to the next turn as its context, exactly."""

from __future__ import annotations

import pytest
import torch

from engine.backends import DenoiserBase
from engine.backends.torch import TorchDenoiser
from engine.buckets import FAMILIES, buckets, nearest_bucket
from engine.cli import main
from engine.errors import BucketError, ConfigError
from engine.images import load_image, read_png_metadata
from engine.request import EditRequest, EncodedImage

from .conftest import gradient_image, save_png

TURNS = [("add a red hat", 1), ("make it night", 2), ("paint it in watercolor", 3)]


class Recording(DenoiserBase):
    """The torch denoiser, keeping the hidden_states of its first call of each edit."""

    def __init__(self, transformer) -> None:
        self.inner = TorchDenoiser(transformer)
        self.name, self.shape_keys = self.inner.name, None
        self.calls: list[torch.Tensor] = []

    def run(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        self.calls.append(inputs["hidden_states"].clone())
        return self.inner(**inputs)


def test_an_output_stays_in_its_bucket():
    """What lets a chain keep its size: a bucket's nearest bucket is itself, in every family."""
    for family in FAMILIES:
        assert all(nearest_bucket(w, h, family) == (w, h) for w, h in buckets(family))


def test_reencode_turns_equal_fresh_edits_of_the_saved_files(tiny_engine, tmp_path):
    kontext = tiny_engine
    session = kontext.session(gradient_image(80, 192, seed=4))
    saved = []
    for k, (prompt, seed) in enumerate(TURNS):
        out = session.edit(prompt, seed=seed, steps=2)
        saved.append(save_png(out.image, tmp_path / f"turn-{k}.png", {"prompt": prompt}))
    for k in range(1, len(TURNS)):
        prompt, seed = TURNS[k]
        fresh = kontext.edit(load_image(saved[k - 1]), prompt, seed=seed, steps=2)
        assert torch.equal(fresh.latents, session.turns[k].latents), f"turn {k}"
        assert fresh.image.tobytes() == session.turns[k].image.tobytes()
    assert [t.size for t in session.turns] == [(80, 192)] * 3


def test_latent_turns_take_the_previous_latents_as_context(tiny_engine, monkeypatch):
    kontext = tiny_engine
    recording = Recording(kontext.components.transformer)
    kontext.dispatcher.primary = recording  # see every call's hidden_states = noise (+) context
    session = kontext.session(gradient_image(128, 128, seed=6), reencode=False)
    first = session.edit(TURNS[0][0], seed=1, steps=2)
    assert isinstance(session.context, EncodedImage) and torch.equal(session.context.tokens, first.latents)
    n_before, vae = len(recording.calls), kontext.components.vae
    encodes = []
    monkeypatch.setattr(vae, "encode", lambda *a, **k: encodes.append(1) or type(vae).encode(vae, *a, **k))
    second = session.edit(TURNS[1][0], seed=2, steps=2)
    assert encodes == []  # no VAE encode on a latent turn
    ctx = recording.calls[n_before][:, first.latents.shape[1] :]  # [1, M, 64]
    assert torch.equal(ctx, first.latents)  # the context IS the previous latents, bit for bit
    # the re-encoding chain from the same first turn feeds VAE(decode(latents)) instead
    reencoded = kontext.edit(first.image, TURNS[1][0], seed=2, steps=2)
    assert not torch.equal(reencoded.latents, second.latents)
    assert encodes == [1] and second.size == first.size == (128, 128)


def test_latent_chain_needs_a_bucket_output(tiny_engine):
    session = tiny_engine.session(gradient_image(128, 128), reencode=False)
    session.edit("add a hat", steps=1, size=(112, 112))  # not a tiny bucket: the next turn cannot chain
    with pytest.raises(BucketError, match="not a bucket of family tiny; edit at size=None"):
        session.edit("make it night", steps=1)


def test_cli_then_writes_one_file_per_turn(tmp_path):
    src = tmp_path / "in.png"
    save_png(gradient_image(128, 128), src, {})
    out = tmp_path / "out.png"
    code = main(
        [
            "edit",
            str(src),
            "add a hat",
            "--then",
            "make it night",
            "--then",
            "add snow",
            "--steps",
            "1",
            "--no-progress",
            "-o",
            str(out),
        ]
    )
    assert code == 0 and not out.exists()
    metas = [read_png_metadata(tmp_path / f"out-{k}.png") for k in (1, 2, 3)]
    assert [m["prompt"] for m in metas] == ["add a hat", "make it night", "add snow"]
    assert [m["source_image"] for m in metas] == ["in.png", "out-1.png", "out-2.png"]


def test_a_turn_takes_an_edit_request_with_the_session_input(tiny_engine):
    """An EditRequest's image is replaced by the session's input; keywords beside it, or several images
    per turn, are refused."""
    session = tiny_engine.session(gradient_image(128, 128, seed=6))
    request = EditRequest(gradient_image(80, 192), "add a hat", steps=1, seed=2)
    out = session.edit(request)
    fresh = tiny_engine.edit(gradient_image(128, 128, seed=6), "add a hat", steps=1, seed=2)
    assert torch.equal(out.latents, fresh.latents) and out.size == (128, 128)
    with pytest.raises(ConfigError, match="not both"):
        session.edit(request, seed=3)
    with pytest.raises(ConfigError, match="one image per turn"):
        session.edit("add a hat", steps=1, num_images=2)
