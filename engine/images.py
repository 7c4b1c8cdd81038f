"""Input images in, output images out: decode and validate PNG/JPEG/WebP, convert to RGB, resize and
tensorize exactly as diffusers' VaeImageProcessor does, encode PNG or JPEG outputs with their metadata
and the AI-generation disclosure (PNG text chunks; JPEG EXIF)."""

from __future__ import annotations

import io
import json
import logging
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image, ImageOps, PngImagePlugin

from .errors import ConfigError, ImageError
from .files import atomic_writer

if TYPE_CHECKING:  # numpy and torch are imported where used: decoding and checking an input needs neither
    import torch

log = logging.getLogger(__name__)

MAX_PIXELS = 64 * 1024 * 1024  # 64 MP: far above any Kontext bucket, far below a decompression bomb
MAX_FILE_BYTES = 64 * 1024 * 1024  # 64 MiB
MAX_JPEG_SCANS = 1000  # progressive JPEGs have ~10 scans; thousands is a CPU-exhaustion attack


@dataclass(frozen=True)
class ImageFormat:
    """One image format under every spelling the engine uses: `name` is PIL's and sniff_format's ("PNG"),
    `api_name` the HTTP APIs' output_format ("png"), then its MIME type and file suffixes."""

    name: str
    api_name: str
    mime: str
    suffixes: tuple[str, ...]
    output: bool  # an edit may be written in it (WebP is an input format only)


# The one table of image formats (inputs: all of them; outputs: PNG and JPEG).
FORMATS = (
    ImageFormat("PNG", "png", "image/png", (".png",), output=True),
    ImageFormat("JPEG", "jpeg", "image/jpeg", (".jpg", ".jpeg"), output=True),
    ImageFormat("WebP", "webp", "image/webp", (".webp",), output=False),
)
ACCEPTED_FORMATS = tuple(f.name for f in FORMATS)
OUTPUT_FORMATS = tuple(f.name for f in FORMATS if f.output)


def image_format(spelling: str) -> ImageFormat:
    """The format named by any of its spellings: "PNG", "png" or "image/png"."""
    for f in FORMATS:
        if spelling in (f.name, f.api_name, f.mime):
            return f
    raise ConfigError(f"unknown image format {spelling!r}; the formats are {', '.join(ACCEPTED_FORMATS)}")


_PIL_FORMATS = ["PNG", "JPEG", "WEBP"]  # plugins Image.open may try; MPO is JPEG from cameras
_DECODED_FORMATS = frozenset({"PNG", "JPEG", "MPO", "WEBP"})
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"
_OTHER_MAGIC = (  # recognized only to say what a refused file is
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"\x00\x00\x01\x00", "ICO"),
    (b"%PDF", "PDF"),
)
_ACCEPTED_TEXT = ", ".join(ACCEPTED_FORMATS)

ImageSource = str | os.PathLike[str] | bytes | bytearray | memoryview


# ---------------------------------------------------------------------------- loading


def load_image(
    source: ImageSource,
    *,
    max_pixels: int = MAX_PIXELS,
    max_file_bytes: int = MAX_FILE_BYTES,
) -> Image.Image:
    """Decode a PNG, JPEG or WebP file (a path or its bytes) into an RGB PIL image.

    Checks, in order, each failing with ImageError: the file is a regular file of at most
    `max_file_bytes` (checked from its size before reading); it is not empty; its magic
    bytes say PNG, JPEG or WebP (GIF, BMP, TIFF, text... are refused); its header parses;
    its header's width * height is at most `max_pixels` (checked BEFORE any pixel is
    decoded; Pillow's own decompression-bomb limit also applies); the pixel data decodes
    completely (truncated files are refused, never padded). Animated PNG/WebP: the first
    frame. The EXIF orientation is applied (ImageOps.exif_transpose).

    Mode rule (see `to_rgb`): palette images become RGB (RGBA first if they carry
    transparency); grey L/1 is replicated to R=G=B; 16-bit grey (I;16*, and I/F, read as
    16-bit samples clipped to 0..65535) is scaled to 8 bits by round(v / 257), so 65535 ->
    255 and 32768 -> 128; CMYK/YCbCr go through Pillow's convert("RGB"); any alpha (RGBA,
    LA, PA, or a tRNS transparency key) is composited over WHITE, then dropped. 16-bit RGB
    PNGs arrive as 8-bit RGB from Pillow (high byte). No ICC colour management is done.
    """
    data, name = _read_source(source, max_file_bytes)
    if not data:
        raise ImageError(f"{name}: the file is empty (0 bytes); accepted formats: {_ACCEPTED_TEXT}")
    _check_format(data, name)
    image = _decode(data, name, max_pixels)
    rgb = to_rgb(image)
    log.debug("loaded %s: %s %dx%d -> RGB", name, image.mode, rgb.width, rgb.height)
    return rgb


def _read_source(source: ImageSource, max_file_bytes: int) -> tuple[bytes, str]:
    """Return (bytes, a name for messages), refusing anything larger than `max_file_bytes`."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        if len(data) > max_file_bytes:
            raise ImageError(f"image data is {len(data)} bytes; the limit is {max_file_bytes} bytes")
        return data, f"<{len(data)} bytes>"
    if not isinstance(source, (str, os.PathLike)):
        raise ImageError(f"load_image takes a path or bytes, not {type(source).__name__}")
    path = Path(source)
    try:
        st = path.stat()
    except OSError as exc:
        raise ImageError(f"{path}: cannot read the image: {exc.strerror or exc}") from exc
    if not stat.S_ISREG(st.st_mode):
        raise ImageError(f"{path}: not a regular file")
    if st.st_size > max_file_bytes:
        raise ImageError(f"{path}: the file is {st.st_size} bytes; the limit is {max_file_bytes} bytes")
    try:
        with path.open("rb") as f:
            data = f.read(max_file_bytes + 1)  # the file may have grown since stat()
    except OSError as exc:
        raise ImageError(f"{path}: cannot read the image: {exc.strerror or exc}") from exc
    if len(data) > max_file_bytes:
        raise ImageError(f"{path}: the file is larger than the limit of {max_file_bytes} bytes")
    return data, str(path)


def sniff_format(data: bytes) -> str | None:
    """The accepted format named by the magic bytes, or None."""
    if data.startswith(_PNG_MAGIC):
        return "PNG"
    if data.startswith(_JPEG_MAGIC):
        return "JPEG"
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    return None


def _check_format(data: bytes, name: str) -> None:
    found = sniff_format(data)
    if found is None:
        other = next((label for magic, label in _OTHER_MAGIC if data.startswith(magic)), None)
        what = f"a {other} file" if other else "not a recognized image"
        raise ImageError(f"{name}: {what}; accepted formats: {_ACCEPTED_TEXT}")
    if found == "JPEG":
        scans = data.count(b"\xff\xda")  # SOS markers; 0xFF in entropy-coded data is byte-stuffed
        if scans > MAX_JPEG_SCANS:
            raise ImageError(f"{name}: JPEG with {scans} scans (limit {MAX_JPEG_SCANS}); refused as hostile")


def _decode(data: bytes, name: str, max_pixels: int) -> Image.Image:
    """Parse the header, check the pixel count, then decode and apply EXIF orientation.

    The decoder parses untrusted bytes: any exception it raises means the image cannot be
    used, and is reported as an ImageError.
    """
    try:
        with Image.open(io.BytesIO(data), formats=_PIL_FORMATS) as lazy:
            width, height = lazy.size
            if lazy.format not in _DECODED_FORMATS:
                raise ImageError(f"{name}: decoded as {lazy.format}; accepted formats: {_ACCEPTED_TEXT}")
            if width <= 0 or height <= 0:
                raise ImageError(f"{name}: invalid dimensions {width}x{height}")
            if width * height > max_pixels:
                raise ImageError(
                    f"{name}: {width}x{height} = {width * height} pixels exceeds the limit of "
                    f"{max_pixels} pixels; refused before decoding"
                )
            if getattr(lazy, "is_animated", False):
                log.info("%s: animated %s, using its first frame", name, lazy.format)
            lazy.load()
            return ImageOps.exif_transpose(lazy)
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageError(f"{name}: refused before decoding, as a decompression bomb: {exc}") from exc
    except Exception as exc:
        raise ImageError(
            f"{name}: cannot decode the image (corrupt or truncated?): {type(exc).__name__}: {exc}"
        ) from exc


# ---------------------------------------------------------------------------- modes


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to RGB by the rule stated in `load_image`."""
    mode = image.mode
    if mode == "RGB" and "transparency" not in image.info:
        return image
    if mode in ("I", "F") or mode.startswith("I;16"):
        return _sixteen_bit_grey_to_rgb(image)
    if _has_alpha(image):
        return _composite_over_white(image)
    try:
        return image.convert("RGB")  # P, 1, L, CMYK, YCbCr, LAB, HSV, RGBX...
    except (ValueError, OSError) as exc:
        raise ImageError(f"cannot convert a {mode} image to RGB: {exc}") from exc


def _has_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in image.info


def _composite_over_white(image: Image.Image) -> Image.Image:
    """Blend straight alpha over an opaque white background: out = a * rgb + (1 - a) * 255."""
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _sixteen_bit_grey_to_rgb(image: Image.Image) -> Image.Image:
    """16-bit grey -> 8-bit RGB by round(v / 257) (0 -> 0, 65535 -> 255), never clipping at 255."""
    import numpy as np

    samples = np.asarray(image).astype(np.float64)  # I;16B arrives as big-endian uint16: astype fixes it
    eight = np.rint(np.clip(samples, 0.0, 65535.0) / 257.0).astype(np.uint8)  # v/257 never ties at .5
    key = image.info.get("transparency")  # a tRNS grey key: those pixels are transparent -> white
    if isinstance(key, int) and not isinstance(key, bool):
        eight[samples == key] = 255
    return Image.fromarray(np.stack([eight] * 3, axis=-1), mode="RGB")


# ---------------------------------------------------------------------------- resize and tensors


def resize_to(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Resize to `size` = (width, height) with LANCZOS, as VaeImageProcessor.resize does for PIL.

    PIL's resize takes (width, height), not (height, width).
    """
    width, height = size
    if not (isinstance(width, int) and isinstance(height, int) and width > 0 and height > 0):
        raise ConfigError(f"resize_to needs a positive integer (width, height), got {size!r}")
    return image.resize((width, height), resample=Image.Resampling.LANCZOS, reducing_gap=None)


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> [1, 3, H, W] float32 in [-1, 1], as VaeImageProcessor.preprocess computes it."""
    if image.mode != "RGB":
        raise ImageError(f"to_tensor needs an RGB image, got mode {image.mode}; load it with load_image")
    import numpy as np
    import torch

    pixels = np.array(image).astype(np.float32) / 255.0  # [H, W, 3] in [0, 1]
    tensor = torch.from_numpy(pixels[None].transpose(0, 3, 1, 2)).contiguous()  # [1, 3, H, W]
    return 2.0 * tensor - 1.0


def to_pil(tensor: torch.Tensor) -> Image.Image:
    """[1, 3, H, W] in [-1, 1] -> RGB PIL image, as VaeImageProcessor.postprocess(output_type="pil").

    Denormalizes in the tensor's own dtype ((x * 0.5 + 0.5).clamp(0, 1)), then float32,
    then (x * 255).round() to uint8. Non-finite values are refused: they mean the denoiser or
    the VAE overflowed, and would otherwise turn into arbitrary pixels.
    """
    if tensor.ndim != 4 or tensor.shape[0] != 1 or tensor.shape[1] != 3:
        raise ImageError(f"to_pil needs a [1, 3, H, W] tensor, got shape {list(tensor.shape)}")
    import torch

    if not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise ImageError(
            f"the decoded image has {bad} non-finite values (NaN/inf): the denoiser or VAE overflowed; "
            "try a higher-precision backend"
        )
    unit = (tensor * 0.5 + 0.5).clamp(0, 1)  # [1, 3, H, W] in [0, 1]
    pixels = unit.detach().cpu().permute(0, 2, 3, 1).float().numpy()  # [1, H, W, 3]
    return Image.fromarray((pixels[0] * 255).round().astype("uint8"))


# ---------------------------------------------------------------------------- output


JPEG_QUALITY = 95
SOFTWARE_KEY = "Software"  # the PNG keyword and EXIF tag of the AI-generation disclosure
_EXIF_DESCRIPTION, _EXIF_MODEL, _EXIF_SOFTWARE, _EXIF_USER_COMMENT = 0x010E, 0x0110, 0x0131, 0x9286
_EXIF_IFD = 0x8769
_ASCII_PREFIX = b"ASCII\x00\x00\x00"  # EXIF UserComment character-code prefix


def ai_disclosure(version: str, model: str) -> str:
    """The `Software` value of every output: who made it, that it is AI-generated, from which model
    (BFL's reference writes "AI generated;img2img;flux")."""
    return f"kontext-engine {version}; AI generated; img2img; FLUX.1 Kontext [dev] ({model})"


def output_format(path: str | os.PathLike[str]) -> str:
    """PNG or JPEG, from the file name's suffix."""
    suffix = Path(path).suffix.lower()
    for f in FORMATS:
        if f.output and suffix in f.suffixes:
            return f.name
    raise ConfigError(f"{path}: outputs are .png, .jpg or .jpeg files, not {suffix or 'no suffix'!r}")


def encode_image(image: Image.Image, fmt: str, metadata: Mapping[str, str]) -> bytes:
    """`image` as PNG or JPEG bytes carrying `metadata`. PNG: one text chunk per item (tEXt if Latin-1,
    else uncompressed iTXt), keys sorted, nothing time-dependent, so equal inputs give equal bytes. JPEG
    (quality 95): EXIF Software, Model and ImageDescription from the `Software`, `model` and `prompt`
    items, and every item as JSON in UserComment."""
    if fmt not in OUTPUT_FORMATS:
        raise ConfigError(f"output format must be PNG or JPEG, got {fmt!r}")
    buf = io.BytesIO()
    try:
        if fmt == "PNG":
            image.save(buf, format="PNG", pnginfo=_png_info(metadata))
        else:
            image.convert("RGB").save(buf, format="JPEG", quality=JPEG_QUALITY, exif=_exif(metadata))
    except OSError as exc:  # Pillow's encoders report failures as OSError
        raise ImageError(f"cannot encode the {fmt} image: {exc.strerror or exc}") from exc
    return buf.getvalue()


def write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """An encoded image to `path`, atomically; an OSError becomes an ImageError naming the file."""
    target = Path(path)
    try:
        with atomic_writer(target) as f:
            f.write(data)
    except OSError as exc:
        raise ImageError(f"{target}: cannot write the image: {exc.strerror or exc}") from exc
    log.debug("wrote %s (%d bytes)", target, len(data))
    return target


def _exif(metadata: Mapping[str, str]) -> Image.Exif:
    exif = Image.Exif()
    for tag, key in ((_EXIF_SOFTWARE, SOFTWARE_KEY), (_EXIF_MODEL, "model"), (_EXIF_DESCRIPTION, "prompt")):
        if key in metadata:
            exif[tag] = str(metadata[key])
    comment = json.dumps(dict(sorted(metadata.items())), ensure_ascii=True)  # ASCII: \u escapes
    exif.get_ifd(_EXIF_IFD)[_EXIF_USER_COMMENT] = _ASCII_PREFIX + comment.encode("ascii")
    return exif


def _png_info(metadata: Mapping[str, str]) -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    for key in sorted(metadata):
        value = metadata[key]
        _check_png_key(key)
        if not isinstance(value, str):
            raise ImageError(f"PNG metadata value for {key!r} must be a str, got {type(value).__name__}")
        if "\x00" in value:
            raise ImageError(f"PNG metadata value for {key!r} contains a NUL character")
        try:
            value.encode("latin-1")
        except UnicodeEncodeError:
            info.add_itxt(key, value, lang="", tkey="", zip=False)
        else:
            info.add_text(key, value, zip=False)
    return info


def _check_png_key(key: object) -> None:
    """PNG keywords: 1-79 printable Latin-1 characters, no leading, trailing or double spaces."""
    ok = (
        isinstance(key, str)
        and 1 <= len(key) <= 79
        and all(32 <= ord(c) <= 126 or 161 <= ord(c) <= 255 for c in key)
        and key == key.strip()
        and "  " not in key
    )
    if not ok:
        raise ImageError(f"invalid PNG metadata key {key!r}: use 1-79 printable Latin-1 characters")


def read_png_metadata(path: str | os.PathLike[str], *, max_pixels: int = MAX_PIXELS) -> dict[str, str]:
    """The tEXt, zTXt and iTXt chunks of a PNG file, as str -> str."""
    target = Path(path)
    try:
        with Image.open(target, formats=["PNG"]) as png:
            width, height = png.size
            if width * height > max_pixels:
                raise ImageError(f"{target}: {width}x{height} exceeds the limit of {max_pixels} pixels")
            return {str(key): str(value) for key, value in png.text.items()}  # type: ignore[attr-defined]
    except ImageError:
        raise
    except Exception as exc:
        raise ImageError(f"{target}: cannot read PNG metadata: {type(exc).__name__}: {exc}") from exc


def read_jpeg_metadata(data: bytes) -> dict[str, str]:
    """The metadata `encode_image` put in a JPEG's EXIF UserComment (empty if there is none)."""
    try:
        with Image.open(io.BytesIO(data), formats=["JPEG"]) as jpeg:
            comment = jpeg.getexif().get_ifd(_EXIF_IFD).get(_EXIF_USER_COMMENT)
    except Exception as exc:
        raise ImageError(f"cannot read JPEG metadata: {type(exc).__name__}: {exc}") from exc
    if not isinstance(comment, bytes) or not comment.startswith(_ASCII_PREFIX):
        return {}
    return {str(k): str(v) for k, v in json.loads(comment[len(_ASCII_PREFIX) :]).items()}
