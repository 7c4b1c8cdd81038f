"""Writing an edit's output file: the metadata (with the AI-generation disclosure), the C2PA signature
when a signer is configured, and the review hold when the safety policy says a person must approve it."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from . import __version__
from .errors import ProvenanceError
from .images import SOFTWARE_KEY, ai_disclosure, encode_image, output_format, write_bytes
from .provenance import ProvenanceSigner
from .safety import review

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SavedOutput:
    """Where an output went."""

    path: Path  # the target, or the file in the review folder when held
    held: bool  # True: waiting in the review folder for a person to approve it
    signed: bool  # True: carries a C2PA manifest


def output_metadata(
    model: str, *, prompt: str | None = None, include_prompt: bool = True, **items: object
) -> dict[str, str]:
    """The text metadata of an output: the disclosure (`Software`), the model, the prompt when
    `include_prompt` (prompts can be private: servers leave it out), and `items` that are not None."""
    meta = {SOFTWARE_KEY: ai_disclosure(__version__, model), "model": model}
    if prompt is not None and include_prompt:
        meta["prompt"] = prompt
    meta.update({k: str(v) for k, v in items.items() if v is not None})
    return meta


def encode_output(
    image: Image.Image,
    fmt: str,
    metadata: Mapping[str, str],
    *,
    parent: bytes | None = None,
    signer: ProvenanceSigner | None = None,
    title: str = "output",
) -> bytes:
    """`image` encoded as `fmt` (PNG or JPEG) with `metadata`, C2PA-signed when `signer` is given
    (parent: the encoded input image). The bytes a file or an HTTP response carries."""
    data = encode_image(image, fmt, metadata)
    if signer is not None:
        if parent is None:
            raise ProvenanceError("C2PA signing of an edit needs its input image (the parent ingredient)")
        data = signer.sign(data, parent=parent, model=metadata.get("model", ""), title=title)
    return data


def save_output(
    image: Image.Image,
    path: str | Path,
    metadata: Mapping[str, str],
    *,
    parent: bytes | None = None,
    signer: ProvenanceSigner | None = None,
    review_dir: str | Path | None = None,
) -> SavedOutput:
    """Encode `image` as the suffix of `path` says (PNG or JPEG) with `metadata`, sign it when `signer`
    is given (parent: the encoded input image), and write it to `path`, or into `review_dir` when given
    (the review hold). The file appears whole or not at all."""
    target = Path(path)
    data = encode_output(
        image, output_format(target), metadata, parent=parent, signer=signer, title=target.name
    )
    if review_dir is not None:
        return SavedOutput(review.hold(data, review_dir, target.name), held=True, signed=signer is not None)
    return SavedOutput(write_bytes(target, data), held=False, signed=signer is not None)
