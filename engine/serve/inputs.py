"""Request fields to engine inputs: an input_image (base64, data: URL, or an http(s) URL when
allowed) to validated image bytes, and an aspect_ratio "W:H" to the engine's output bucket. Every
refusal is an InputError whose message is the 4xx `detail`."""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
import socket
from urllib.parse import urlsplit

from ..buckets import nearest_bucket
from ..errors import ImageError
from ..images import MAX_FILE_BYTES, load_image

ASPECT = re.compile(r"^\s*(\d{1,5})\s*:\s*(\d{1,5})\s*$")
MIN_RATIO, MAX_RATIO = 9 / 21, 21 / 9
URL_TIMEOUT_S = 10.0


class InputError(ValueError):
    """A request field that cannot be used; its message says why and what to send instead."""


def image_bytes(value: str, field: str, *, allow_urls: bool, max_bytes: int = MAX_FILE_BYTES) -> bytes:
    """The image file a field carries, decoded and fully validated by engine.images.load_image."""
    text = value.strip()
    if text.lower().startswith(("http://", "https://")):
        if not allow_urls:
            raise InputError(
                f"{field}: image URLs are off on this server (start it with --allow-urls); "
                "send the image as base64 or a data: URL"
            )
        data = fetch(text, field, max_bytes)
    else:
        if text.lower().startswith("data:"):
            header, sep, text = text.partition(",")
            if not sep or ";base64" not in header.lower():
                raise InputError(f"{field}: a data: URL must be base64 (data:image/png;base64,...)")
        if len(text) > (max_bytes * 4) // 3 + 4:
            raise InputError(f"{field}: the image is over the limit of {max_bytes} bytes")
        try:
            data = base64.b64decode("".join(text.split()), validate=True)
        except (binascii.Error, ValueError):
            raise InputError(f"{field}: not valid base64 (nor a data: URL)") from None
    try:
        load_image(data, max_file_bytes=max_bytes)
    except ImageError as e:
        raise InputError(f"{field}: {e}") from None
    return data


def fetch(url: str, field: str, max_bytes: int) -> bytes:
    """GET an image URL: public addresses only (no loopback, private or link-local hosts), no
    redirects, at most `max_bytes`, within URL_TIMEOUT_S per read."""
    import httpx

    parts = urlsplit(url)
    host = parts.hostname or ""
    try:
        infos = socket.getaddrinfo(host, parts.port or (443 if parts.scheme == "https" else 80))
    except (socket.gaierror, UnicodeError, ValueError):
        raise InputError(f"{field}: cannot resolve the host of {url!r}") from None
    for info in infos:
        addr = ipaddress.ip_address(str(info[4][0]).split("%")[0])
        if not addr.is_global:
            raise InputError(f"{field}: {host} resolves to a non-public address ({addr}); refused")
    try:
        with httpx.stream("GET", url, timeout=URL_TIMEOUT_S, follow_redirects=False) as r:
            if r.status_code != 200:
                raise InputError(f"{field}: fetching {url!r} answered HTTP {r.status_code}")
            chunks, size = [], 0
            for chunk in r.iter_bytes():
                size += len(chunk)
                if size > max_bytes:
                    raise InputError(f"{field}: {url!r} is over the limit of {max_bytes} bytes")
                chunks.append(chunk)
    except httpx.HTTPError as e:
        raise InputError(f"{field}: cannot fetch {url!r}: {type(e).__name__}") from None
    return b"".join(chunks)


def output_size(aspect_ratio: str | None, family: str) -> tuple[int, int] | None:
    """The bucket of the engine's family nearest "W:H" (BFL allows 21:9 to 9:21); None: the input's."""
    if aspect_ratio is None:
        return None
    m = ASPECT.match(aspect_ratio)
    if m is None:
        raise InputError(f"aspect_ratio must look like '16:9', got {aspect_ratio!r}")
    w, h = int(m.group(1)), int(m.group(2))
    if w == 0 or h == 0 or not MIN_RATIO - 1e-9 <= w / h <= MAX_RATIO + 1e-9:
        raise InputError(f"aspect_ratio must be between 21:9 and 9:21, got {aspect_ratio!r}")
    return nearest_bucket(w, h, family)
