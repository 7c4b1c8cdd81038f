"""EditRequest: the one typed edit request refuses bad values where it is made."""

import io

import pytest
from PIL import Image

from engine.config import DEFAULT_GUIDANCE
from engine.errors import ConfigError
from engine.request import MAX_IMAGES, MAX_SEED, EditRequest


def _img(w: int = 32, h: int = 32) -> Image.Image:
    return Image.new("RGB", (w, h), (120, 30, 200))


def test_defaults_and_resolution() -> None:
    r = EditRequest(_img(), "add a hat")
    assert (r.steps, r.guidance, r.seed, r.num_images) == (None, DEFAULT_GUIDANCE, 0, 1)
    assert r.placement == "offset"
    assert r.resolved(8).steps == 8
    assert EditRequest(_img(), "x", steps=3).resolved(8).steps == 3  # an explicit value wins
    assert EditRequest(_img(), "x", seed=5, num_images=3).seeds == (5, 6, 7)


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ("steps", 0, "steps must be between 1"),
        ("guidance", float("nan"), "guidance must be between"),
        ("guidance", -1.0, "guidance must be between"),
        ("seed", -1, "seed must be between"),
        ("size", (100, 64), "multiples of 16"),
        ("num_images", MAX_IMAGES + 1, "num_images must be between"),
        ("placement", "left", "placement must be one of"),
        ("references", (_img(),) * 4, "at most 3 reference images"),
        ("prompt", None, "a prompt is required"),
        ("prompt", 7, "prompt must be a string"),
        ("prompt", " ", "the prompt is empty"),
        ("prompt", "x" * 4097, "over the limit of 4096"),
    ],
)
def test_refuses_bad_values(field: str, value: object, words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        EditRequest(**{"image": _img(), "prompt": "x", field: value})  # type: ignore[arg-type]


def test_one_max_seed_for_the_engine_and_the_apis() -> None:
    """MAX_SEED is the largest seed a request may give: its last image's seed still fits in int64
    (torch.Generator's range), one more is refused; the HTTP APIs bound their seeds by the same one."""
    import torch

    from engine.serve import params, schemas

    r = EditRequest(_img(), "x", seed=MAX_SEED, num_images=MAX_IMAGES)
    assert r.seeds[-1] == 2**63 - 2
    torch.Generator().manual_seed(r.seeds[-1])
    with pytest.raises(ConfigError, match=f"seed must be between 0 and {MAX_SEED}"):
        EditRequest(_img(), "x", seed=MAX_SEED + 1)
    assert params.MAX_SEED is MAX_SEED
    seed = schemas.KontextRequest.model_json_schema()["properties"]["seed"]
    assert any(s.get("maximum") == MAX_SEED for s in seed.get("anyOf", [seed]))


def test_of_decodes_bytes_and_paths(tmp_path) -> None:
    buf = io.BytesIO()
    _img(48, 32).save(buf, "PNG")
    path = tmp_path / "in.png"
    path.write_bytes(buf.getvalue())
    r = EditRequest.of(buf.getvalue(), "x", references=[str(path)], size=(64, 48))
    assert r.image.size == (48, 32) and r.references[0].size == (48, 32) and r.size == (64, 48)
    assert len(r.input_images) == 2
    with pytest.raises(ConfigError, match="PIL image or an EncodedImage"):
        EditRequest("in.png", "x")  # type: ignore[arg-type]
