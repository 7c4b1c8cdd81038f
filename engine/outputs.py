"""Writing an edit's output file: the metadata (with the AI-generation disclosure), the C2PA signature
when a signer is configured, and the review hold when the safety policy says a person must approve it.

OutputWriter is a loaded engine's writer (`KontextEngine.outputs`): it knows the model, weights, build
and signer, and reads the prompt, seed, steps and guidance from the result's EditRequest. No output
names a local path: the model is a preset name ("kontext-dev" for local weights), the build its name.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image

from .errors import ProvenanceError
from .images import SOFTWARE_KEY, ai_disclosure, encode_image, output_format, write_bytes
from .provenance import ProvenanceSigner
from .safety import review
from .version import __version__

if TYPE_CHECKING:
    from .pipeline import EditResult

SourceImage = Image.Image | str | Path | bytes  # the input image: decoded, a file, or the file's bytes

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


@dataclass(frozen=True)
class OutputWriter:
    """Writes one engine's outputs: metadata with the AI disclosure, C2PA signature, review hold."""

    model: str  # the preset's name: "kontext-dev" for local weights (a file must not reveal a path)
    weights_id: str
    build: str | None = None  # the build folder's name (never its path); None: no build
    signer: ProvenanceSigner | None = None  # C2PA-sign every output
    review: bool = False  # the safety policy's review: save() holds outputs for a person

    def metadata(
        self,
        result: EditResult,
        *,
        index: int = 0,
        source: SourceImage | None = None,
        include_prompt: bool = True,
        extra: Mapping[str, str | None] | None = None,
    ) -> dict[str, str]:
        """The text metadata of image `index` of `result`: disclosure, model, weights, seed, steps (and
        with a step cache, the steps computed and the cache), guidance, backend, size, build, source file
        name, the prompt when `include_prompt`, `extra`."""
        r = result.request
        return output_metadata(
            self.model,
            prompt=r.prompt if r is not None else None,
            include_prompt=include_prompt,
            seed=result.seeds[index],
            steps=r.steps if r is not None else None,
            steps_computed=result.steps_computed if result.cache else None,  # only when a cache ran
            cache=result.cache or None,
            guidance=r.guidance if r is not None else None,
            weights=self.weights_id,
            backend=result.backend,
            size=f"{result.size[0]}x{result.size[1]}",
            engine=self.build,
            source_image=Path(source).name if isinstance(source, (str, Path)) else None,
            **(extra or {}),
        )

    def save(
        self,
        result: EditResult,
        path: str | Path,
        *,
        index: int = 0,
        source: SourceImage | None = None,
        include_prompt: bool = True,
        review_dir: str | Path | None = None,
        extra: Mapping[str, str | None] | None = None,
    ) -> SavedOutput:
        """Write image `index` of `result` to `path` (.png or .jpg) with its metadata, C2PA-signed when
        there is a signer (source: the input image, the parent ingredient; needed then). Under review
        the file goes to `review_dir` (default: `review/` beside `path`). include_prompt: write the
        prompt into the file (prompts can be private). extra: more text items (None values left out)."""
        meta = self.metadata(result, index=index, source=source, include_prompt=include_prompt, extra=extra)
        parent = source_bytes(source) if self.signer is not None and source is not None else None
        held = (review_dir or review.default_review_dir(path)) if self.review else None
        return save_output(
            result.images[index], path, meta, parent=parent, signer=self.signer, review_dir=held
        )

    def encode(
        self,
        result: EditResult,
        fmt: str = "PNG",
        *,
        index: int = 0,
        source: SourceImage | None = None,
        include_prompt: bool = False,
    ) -> bytes:
        """Image `index` of `result` as PNG or JPEG bytes with the same metadata and signature as save(),
        for callers that send bytes rather than write files (the server). The prompt is left out unless
        asked for."""
        meta = self.metadata(result, index=index, source=source, include_prompt=include_prompt)
        parent = source_bytes(source) if self.signer is not None and source is not None else None
        return encode_output(result.images[index], fmt, meta, parent=parent, signer=self.signer)


def source_bytes(source: SourceImage) -> bytes:
    """The input image's bytes for the C2PA ingredient: the file as given, or a PIL image as PNG."""
    if isinstance(source, Image.Image):
        buf = io.BytesIO()
        source.save(buf, format="PNG")
        return buf.getvalue()
    return bytes(source) if isinstance(source, (bytes, bytearray)) else Path(source).read_bytes()
