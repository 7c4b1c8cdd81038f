"""engine/images.py against a hostile-image corpus generated here, diffusers' VaeImageProcessor
(resize, preprocess, postprocess) and PNG metadata round trips; engine/assets' shipped files."""

from __future__ import annotations

import io
import struct
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers.image_processor import VaeImageProcessor
from PIL import Image, ImageFile

from engine import assets
from engine.errors import ConfigError, ImageError
from engine.images import (
    load_image,
    read_png_metadata,
    resize_to,
    to_pil,
    to_rgb,
    to_tensor,
)

from .conftest import save_png

HANG_BOUND_S = 1.0  # a bound on a hang, not a performance test


def noise_image(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = len(mode)
    pixels = rng.integers(0, 256, size=(height, width, channels), dtype=np.uint8)
    return Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode)


def encode(image: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG whose IHDR (valid CRC) claims width x height RGB, with no pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IEND", b"")


def refused(call: Callable[[], object]) -> ImageError:
    """Run `call`, require an ImageError within HANG_BOUND_S, return it."""
    start = time.perf_counter()
    with pytest.raises(ImageError) as info:
        call()
    elapsed = time.perf_counter() - start
    assert elapsed < HANG_BOUND_S, f"took {elapsed:.2f} s"
    return info.value


# ---------------------------------------------------------------------------- hostile corpus


def test_zero_byte_file(tmp_path: Path) -> None:
    error = refused(lambda: load_image(write(tmp_path, "empty.png", b"")))
    assert "empty" in str(error) and "PNG, JPEG, WebP" in str(error)


def test_text_file(tmp_path: Path) -> None:
    error = refused(lambda: load_image(write(tmp_path, "notes.png", b"hello, this is not an image\n")))
    assert "PNG, JPEG, WebP" in str(error)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_file(tmp_path: Path, fmt: str) -> None:
    data = encode(noise_image(128, 96), fmt)
    path = write(tmp_path, f"cut.{fmt.lower()}", data[: len(data) // 2])
    assert not ImageFile.LOAD_TRUNCATED_IMAGES
    error = refused(lambda: load_image(path))
    assert "decode" in str(error)


def test_huge_header_refused_before_decode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    decoded: list[object] = []
    real_load = ImageFile.ImageFile.load

    def spy_load(self: ImageFile.ImageFile) -> object:
        decoded.append(self)
        return real_load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", spy_load)
    # 81 MP: over our 64 MP default, under Pillow's own bomb limit, so our check answers.
    over_ours = write(tmp_path, "wide.png", png_header_only(9000, 9000))
    assert over_ours.stat().st_size < 100
    error = refused(lambda: load_image(over_ours))
    assert "9000x9000" in str(error) and "before decoding" in str(error)
    # 10 GP: Pillow's decompression-bomb check answers inside Image.open; still our type.
    bomb = write(tmp_path, "bomb.png", png_header_only(100_000, 100_000))
    error = refused(lambda: load_image(bomb))
    assert "before decoding" in str(error)
    assert decoded == []


def test_max_pixels_is_the_callers(tmp_path: Path) -> None:
    path = write(tmp_path, "small.png", encode(noise_image(40, 30), "PNG"))
    refused(lambda: load_image(path, max_pixels=40 * 30 - 1))
    assert load_image(path, max_pixels=40 * 30).size == (40, 30)


def test_compressed_text_bomb(tmp_path: Path) -> None:
    """A zTXt chunk that inflates to 16 MB from a few kB of file."""
    valid = encode(noise_image(8, 8), "PNG")
    ztxt = png_chunk(b"zTXt", b"comment\x00\x00" + zlib.compress(b"A" * (16 << 20), 9))
    path = write(tmp_path, "ztxt.png", valid[:33] + ztxt + valid[33:])  # after IHDR
    assert path.stat().st_size < 64 * 1024
    refused(lambda: load_image(path))


def test_jpeg_with_thousands_of_scans(tmp_path: Path) -> None:
    path = write(tmp_path, "scans.jpg", b"\xff\xd8\xff\xe0" + b"\xff\xda\x00\x08" * 5000 + b"\xff\xd9")
    assert "scans" in str(refused(lambda: load_image(path)))


@pytest.mark.parametrize(("fmt", "label"), [("GIF", "GIF"), ("BMP", "BMP"), ("TIFF", "TIFF")])
def test_other_formats_refused(tmp_path: Path, fmt: str, label: str) -> None:
    path = write(tmp_path, "image.png", encode(noise_image(16, 16), fmt))  # the suffix lies
    error = refused(lambda: load_image(path))
    assert label in str(error) and "PNG, JPEG, WebP" in str(error)


def test_over_size_file(tmp_path: Path) -> None:
    data = encode(noise_image(32, 32), "PNG")
    path = write(tmp_path, "big.png", data)
    assert "limit" in str(refused(lambda: load_image(path, max_file_bytes=len(data) - 1)))
    refused(lambda: load_image(data, max_file_bytes=len(data) - 1))
    assert load_image(path, max_file_bytes=len(data)).size == (32, 32)


def test_missing_path_and_directory(tmp_path: Path) -> None:
    refused(lambda: load_image(tmp_path / "nope.png"))
    refused(lambda: load_image(tmp_path))


def test_wrong_source_type() -> None:
    refused(lambda: load_image(12345))  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- accepted inputs


def test_rgb_png_from_path_and_bytes(tmp_path: Path) -> None:
    image = noise_image(33, 17)
    data = encode(image, "PNG")
    for source in (write(tmp_path, "a.png", data), str(tmp_path / "a.png"), data, bytearray(data)):
        loaded = load_image(source)
        assert loaded.mode == "RGB" and loaded.size == (33, 17)
        assert loaded.tobytes() == image.tobytes()


def test_webp_accepted(tmp_path: Path) -> None:
    image = noise_image(24, 20)
    loaded = load_image(write(tmp_path, "a.webp", encode(image, "WEBP", lossless=True)))
    assert loaded.mode == "RGB" and loaded.tobytes() == image.tobytes()


def test_palette_png(tmp_path: Path) -> None:
    image = noise_image(16, 16).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    loaded = load_image(write(tmp_path, "p.png", encode(image, "PNG")))
    assert loaded.mode == "RGB" and loaded.tobytes() == image.convert("RGB").tobytes()


def test_palette_png_with_transparency_over_white(tmp_path: Path) -> None:
    image = Image.new("P", (4, 4), 0)
    image.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    image.putpixel((0, 0), 1)
    loaded = load_image(write(tmp_path, "pt.png", encode(image, "PNG", transparency=0)))
    assert loaded.getpixel((1, 1)) == (255, 255, 255)
    assert loaded.getpixel((0, 0)) == (200, 100, 50)


def test_greyscale_l(tmp_path: Path) -> None:
    image = noise_image(20, 10, "L")
    loaded = load_image(write(tmp_path, "l.png", encode(image, "PNG")))
    pixels = np.asarray(loaded)
    assert loaded.mode == "RGB"
    for channel in range(3):
        np.testing.assert_array_equal(pixels[..., channel], np.asarray(image))


def test_sixteen_bit_greyscale_scaled_not_clipped(tmp_path: Path) -> None:
    values = np.array([[0, 257, 32768, 65535, 1000, 128]], dtype=np.uint16)
    image = Image.fromarray(values)
    assert image.mode == "I;16"
    loaded = load_image(write(tmp_path, "g16.png", encode(image, "PNG")))
    pixels = np.asarray(loaded)
    assert loaded.mode == "RGB"
    np.testing.assert_array_equal(pixels[0, :, 0], [0, 1, 128, 255, 4, 0])
    assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all()


def test_sixteen_bit_transparency_key_over_white(tmp_path: Path) -> None:
    image = Image.fromarray(np.array([[0, 1000, 32768]], dtype=np.uint16))
    loaded = load_image(write(tmp_path, "g16t.png", encode(image, "PNG", transparency=1000)))
    np.testing.assert_array_equal(np.asarray(loaded)[0, :, 0], [0, 255, 128])


def test_mode_i_as_sixteen_bit() -> None:
    image = Image.fromarray(np.array([[0, 32768, 65535, 70000, -5]], dtype=np.int32), "I")
    np.testing.assert_array_equal(np.asarray(to_rgb(image))[0, :, 1], [0, 128, 255, 255, 0])


def test_cmyk_jpeg(tmp_path: Path) -> None:
    image = Image.new("CMYK", (16, 16), (0, 0, 0, 0))  # no ink: white
    image.paste((255, 0, 0, 0), (0, 0, 8, 16))  # full cyan on the left half
    loaded = load_image(write(tmp_path, "cmyk.jpg", encode(image, "JPEG", quality=100)))
    assert loaded.mode == "RGB"
    right = np.asarray(loaded)[:, 12:].astype(int)
    left = np.asarray(loaded)[:, :4].astype(int)
    assert (right > 245).all()
    assert (left[..., 0] < 10).all() and (left[..., 1:] > 245).all()


def test_rgba_transparent_pixels_become_white(tmp_path: Path) -> None:
    image = Image.new("RGBA", (4, 2), (0, 0, 0, 0))  # transparent black
    image.putpixel((0, 0), (255, 0, 0, 255))  # opaque red
    image.putpixel((1, 0), (0, 0, 0, 128))  # half-transparent black
    loaded = load_image(write(tmp_path, "rgba.png", encode(image, "PNG")))
    assert loaded.mode == "RGB"
    assert loaded.getpixel((0, 0)) == (255, 0, 0)
    assert loaded.getpixel((3, 1)) == (255, 255, 255)
    assert all(abs(v - 127) <= 1 for v in loaded.getpixel((1, 0)))


def test_rgb_transparency_key_over_white(tmp_path: Path) -> None:
    image = Image.new("RGB", (2, 1), (0, 0, 0))
    image.putpixel((1, 0), (10, 20, 30))
    loaded = load_image(write(tmp_path, "key.png", encode(image, "PNG", transparency=(0, 0, 0))))
    assert loaded.getpixel((0, 0)) == (255, 255, 255) and loaded.getpixel((1, 0)) == (10, 20, 30)


def test_la_over_white(tmp_path: Path) -> None:
    image = Image.new("LA", (3, 1), (0, 0))
    image.putpixel((0, 0), (40, 255))
    loaded = load_image(write(tmp_path, "la.png", encode(image, "PNG")))
    assert loaded.getpixel((0, 0)) == (40, 40, 40)
    assert loaded.getpixel((2, 0)) == (255, 255, 255)


def test_exif_orientation_applied(tmp_path: Path) -> None:
    image = Image.new("RGB", (40, 20), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 20, 20))  # red left half
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    loaded = load_image(write(tmp_path, "rot.jpg", encode(image, "JPEG", quality=95, exif=exif.tobytes())))
    assert loaded.size == (20, 40)
    top, bottom = loaded.getpixel((10, 5)), loaded.getpixel((10, 35))
    assert top[0] > 200 and top[2] < 60  # the left half is now on top
    assert bottom[2] > 200 and bottom[0] < 60


# ---------------------------------------------------------------------------- diffusers parity


def test_resize_matches_diffusers() -> None:
    image = noise_image(97, 61, seed=3)
    ours = resize_to(image, (64, 48))  # (width, height)
    theirs = VaeImageProcessor().resize(image, height=48, width=64)
    assert ours.size == theirs.size == (64, 48)
    assert ours.tobytes() == theirs.tobytes()


def test_resize_rejects_bad_size() -> None:
    with pytest.raises(ConfigError):
        resize_to(noise_image(8, 8), (0, 8))


def test_to_tensor_matches_preprocess() -> None:
    image = noise_image(48, 32, seed=4)
    ours = to_tensor(image)
    theirs = VaeImageProcessor().preprocess(image, height=32, width=48)
    assert ours.shape == (1, 3, 32, 48) and ours.dtype == torch.float32
    assert float((ours - theirs).abs().max()) == 0.0
    assert float(ours.min()) >= -1.0 and float(ours.max()) <= 1.0


def test_to_tensor_refuses_non_rgb() -> None:
    with pytest.raises(ImageError):
        to_tensor(noise_image(8, 8, "L"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_to_pil_matches_postprocess(dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(5)
    tensor = (torch.rand(1, 3, 24, 40, generator=generator) * 2.4 - 1.2).to(dtype)  # past [-1, 1]
    ours = to_pil(tensor)
    theirs = VaeImageProcessor().postprocess(tensor, output_type="pil")[0]
    assert ours.mode == "RGB" and ours.size == (40, 24)
    assert ours.tobytes() == theirs.tobytes()


def test_to_pil_round_trips_to_tensor() -> None:
    image = noise_image(16, 8, seed=6)
    assert to_pil(to_tensor(image)).tobytes() == image.tobytes()


def test_to_pil_refuses_bad_input() -> None:
    with pytest.raises(ImageError):
        to_pil(torch.zeros(3, 8, 8))
    with pytest.raises(ImageError):
        to_pil(torch.full((1, 3, 8, 8), float("nan")))


# ---------------------------------------------------------------------------- PNG output

METADATA = {
    "prompt": "Make the cat wear a tiny hat 🎩 — «très chic», 猫",
    "seed": "42",
    "steps": "28",
    "guidance": "2.5",
    "model": "black-forest-labs/FLUX.1-Kontext-dev",
    "backend": "onnxruntime",
    "note": "latin-1 only: café",
}


def test_metadata_round_trip(tmp_path: Path) -> None:
    path = save_png(noise_image(16, 16), tmp_path / "out.png", METADATA)
    assert read_png_metadata(path) == METADATA
    assert load_image(path).size == (16, 16)


def test_save_is_deterministic(tmp_path: Path) -> None:
    image = noise_image(32, 24, seed=7)
    first = save_png(image, tmp_path / "a.png", METADATA)
    second = save_png(image, tmp_path / "b.png", dict(reversed(list(METADATA.items()))))
    assert first.read_bytes() == second.read_bytes()


def test_save_leaves_no_temp_file(tmp_path: Path) -> None:
    save_png(noise_image(8, 8), tmp_path / "out.png", {"seed": "1"})
    save_png(noise_image(8, 8, seed=1), tmp_path / "out.png", {"seed": "2"})
    assert [p.name for p in tmp_path.iterdir()] == ["out.png"]
    assert read_png_metadata(tmp_path / "out.png") == {"seed": "2"}


@pytest.mark.parametrize("failure", [OSError(28, "No space left on device"), RuntimeError("boom")])
def test_failed_save_keeps_previous_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failure: Exception
) -> None:
    target = save_png(noise_image(8, 8), tmp_path / "out.png", {"seed": "1"})
    before = target.read_bytes()

    def half_write(self: Image.Image, fp: io.BufferedWriter, *args: object, **kwargs: object) -> None:
        fp.write(before[: len(before) // 2])
        raise failure

    monkeypatch.setattr(Image.Image, "save", half_write)
    expected = ImageError if isinstance(failure, OSError) else type(failure)
    with pytest.raises(expected):
        save_png(noise_image(8, 8, seed=1), target, {"seed": "2"})
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["out.png"]


def test_save_refuses_bad_metadata(tmp_path: Path) -> None:
    for bad in ({"": "x"}, {"k" * 80: "x"}, {"prompt\u2603": "x"}, {"seed": 42}, {"a": "x\x00y"}):
        with pytest.raises(ImageError):
            save_png(noise_image(4, 4), tmp_path / "bad.png", bad)  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []


def test_save_creates_a_missing_directory(tmp_path: Path) -> None:
    path = save_png(noise_image(4, 4), tmp_path / "missing" / "out.png", {"seed": "1"})  # engine.files
    assert read_png_metadata(path) == {"seed": "1"}


def test_save_into_an_unwritable_place(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(ImageError, match="cannot write"):
        save_png(noise_image(4, 4), tmp_path / "file" / "out.png", {})  # a file where a folder should be


def test_read_metadata_of_non_png(tmp_path: Path) -> None:
    refused(lambda: read_png_metadata(write(tmp_path, "x.png", encode(noise_image(4, 4), "JPEG"))))


# ---------------------------------------------------------------------------- shipped assets


def test_sample_image_loads() -> None:
    path = assets.sample_image_path()
    assert path.is_file()
    assert load_image(path).mode == "RGB"


def test_calibration_images() -> None:
    paths = assets.calibration_image_paths()
    assert len(paths) >= 4
    shapes = set()
    for path in paths:
        image = load_image(path)
        assert image.mode == "RGB" and max(image.size) <= 512
        ratio = image.width / image.height
        shapes.add("square" if ratio == 1 else "landscape" if ratio > 1 else "portrait")
    assert shapes == {"square", "landscape", "portrait"}


def test_calibration_prompts() -> None:
    prompts = assets.calibration_prompts()
    assert len(prompts) >= 32
    assert {category for category, _ in prompts} == set(assets.CATEGORIES)
    assert len({prompt for _, prompt in prompts}) == len(prompts)


def test_assets_are_small() -> None:
    total = sum(p.stat().st_size for p in assets.ASSETS_DIR.rglob("*") if p.is_file())
    assert total < 1.5 * 1024 * 1024
    assert (assets.ASSETS_DIR / "LICENSES.md").is_file()


def test_one_format_table_for_every_spelling() -> None:
    """PIL's names, the APIs' output_format, MIME types and suffixes all come from images.FORMATS: the
    encoder writes what its MIME type says, and an unknown spelling is refused."""
    from engine.images import FORMATS, OUTPUT_FORMATS, encode_image, image_format, output_format, sniff_format

    assert OUTPUT_FORMATS == ("PNG", "JPEG")
    for f in FORMATS:
        assert image_format(f.name) is image_format(f.api_name) is image_format(f.mime) is f
    for name in OUTPUT_FORMATS:
        data = encode_image(Image.new("RGB", (16, 16)), name, {})
        assert (
            sniff_format(data) == name and image_format(name).mime == f"image/{image_format(name).api_name}"
        )
    assert [output_format(f"a{s}") for s in (".png", ".JPG", ".jpeg")] == ["PNG", "JPEG", "JPEG"]
    with pytest.raises(ConfigError, match=r"outputs are \.png"):
        output_format("a.webp")  # an input format only
    with pytest.raises(ConfigError, match="unknown image format 'gif'"):
        image_format("gif")
    from engine.serve import api_openai, schemas

    api_names = [image_format(n).api_name for n in OUTPUT_FORMATS]
    assert list(api_openai.OUTPUT_FORMATS) == [f.value for f in schemas.OutputFormat] == api_names
