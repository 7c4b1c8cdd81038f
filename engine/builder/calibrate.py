"""The build's calibration and verification inputs, captured from OUR sampling loop, and their files.

A recording Denoiser wraps the fp32 torch transformer and keeps every call's inputs (and its
output, the golden velocity). Calibration runs engine.calibration's set and loop (the edits static
FP8 calibrates on too); the golden edits (what verification compares with) cover every shape key a
build serves (one edit per key, with references and a batch where the key has them). Seeded: two
builds record the same bytes.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import logging
from collections.abc import Sequence
from dataclasses import asdict
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from ..assets import calibration_image_paths, calibration_prompts
from ..backends import DENOISER_INPUTS, DENOISER_OUTPUT
from ..backends.recording import DenoiserCall, RecordingDenoiser
from ..backends.torch import TorchDenoiser
from ..buckets import ShapeKey, buckets, nearest_bucket, reference_bucket, reference_buckets, tokens
from ..calibration import CalibrationSpec, calibration_edits, run_calibration, run_edit
from ..errors import BuildError
from ..files import atomic_write_bytes
from ..images import load_image, resize_to
from ..model.components import Components
from ..pipeline import KontextPipeline
from ..request import EditRequest

log = logging.getLogger(__name__)

Sample = dict[str, np.ndarray]  # one transformer call: DENOISER_INPUTS (+ DENOISER_OUTPUT) -> array


def _samples(calls: Sequence[DenoiserCall], with_output: bool) -> list[Sample]:
    """Recorded calls -> float32 numpy samples (the ONNX inputs, and the output when asked)."""
    out: list[Sample] = []
    for c in calls:
        sample = {k: c.inputs[k].to("cpu", torch.float32).numpy() for k in DENOISER_INPUTS}
        if with_output:
            sample[DENOISER_OUTPUT] = c.output.to("cpu", torch.float32).numpy()
        out.append(sample)
    return out


def calibration_hash(spec: CalibrationSpec, family: str) -> str:
    """sha256 of the calibration set: the image bytes, the instructions, the spec and the bucket family."""
    h = hashlib.sha256(json.dumps({"spec": asdict(spec), "family": family}, sort_keys=True).encode())
    for e in calibration_edits(spec):
        h.update(hashlib.sha256(e.image.read_bytes()).digest())
        h.update(f"{e.category}\0{e.prompt}\0{e.seed}".encode())
    return h.hexdigest()


def capture_calibration(
    components: Components, spec: CalibrationSpec, family: str, device: str = "cpu", progress: bool = True
) -> list[Sample]:
    """Run the calibration edits through the sampling loop in the weights' own dtype (bf16 for a GPU build:
    the real model calibrates on the GPU without an fp32 copy); return the recorded inputs in fp32."""
    dtype = next(components.transformer.parameters()).dtype
    rec = RecordingDenoiser(TorchDenoiser(components.transformer, name="torch-calibration"))
    samples: list[Sample] = []

    def keep(_edit: object) -> None:
        samples.extend(_samples(rec.calls, with_output=False))  # every step's inputs
        rec.reset()

    run_calibration(
        components, rec, spec, device=device, dtype=dtype, family=family, after_edit=keep, progress=progress
    )
    return samples


def capture_golden(
    components: Components,
    family: str,
    steps: int = 3,
    device: str = "cpu",
    keys: Sequence[ShapeKey] | None = None,
    refs: Sequence[int] = (0,),
    progress: bool = True,
) -> dict[ShapeKey, list[Sample]]:
    """Inputs and fp32 torch outputs at the first and last step of one edit per shape key.

    keys None: the family's single-image batch-1 keys. Those keys come first, from the same edits
    (bucket order, images and seeds) as ever, so a default build records the same bytes. Every other
    key (a batch > 1 or reference images: kontext build --batch/--refs) gets one edit of its own,
    built by `reference_edit` from `refs` (the reference counts the build serves).
    """
    rec = RecordingDenoiser(TorchDenoiser(components.transformer, name="torch-fp32"))
    pipe = KontextPipeline(components, device=device, bucket_family=family)
    images = calibration_image_paths()
    prompts = calibration_prompts()
    out: dict[ShapeKey, list[Sample]] = {}
    seen: set[int] = set()
    bar = {"leave": False, "disable": not progress}
    for i, bucket in enumerate(tqdm(buckets(family), desc="golden", unit="bucket", **bar)):
        n = (bucket[0] // 16) * (bucket[1] // 16)
        if n in seen:
            continue
        seen.add(n)
        if nearest_bucket(bucket[0], bucket[1], family) != bucket:
            raise BuildError(f"bucket {bucket} of {family} is not its own nearest bucket; check buckets.py")
        image = resize_to(load_image(images[i % len(images)]), bucket)
        rec.reset(keep={0, steps - 1})
        run_edit(pipe, EditRequest(image, prompts[i % len(prompts)][1], steps, seed=i), rec)
        samples = _samples(rec.calls, with_output=True)
        key = ShapeKey(1, n, n, samples[0]["txt_ids"].shape[0])
        if keys is None or key in keys:
            out[key] = samples
    others = [k for k in sorted(keys or ()) if k not in out]
    for j, key in enumerate(tqdm(others, desc="golden (batch, refs)", unit="key", **bar)):
        image, references = reference_edit(key, family, refs, j)
        rec.reset(keep={0, steps - 1})
        edit = EditRequest(
            image,
            prompts[j % len(prompts)][1],
            steps,
            seed=j,
            references=tuple(references),
            num_images=key.batch,
        )
        got = run_edit(pipe, edit, rec)
        if got != key:
            raise BuildError(f"the reference edit for {key} ran at {got}; check reference_edit")
        out[key] = _samples(rec.calls, with_output=True)
    return out


def reference_edit(
    key: ShapeKey, family: str, refs: Sequence[int], seed: int
) -> tuple[Image.Image, list[Image.Image]]:
    """An input image and reference images whose edit has shape key `key` (at batch key.batch).

    The input image goes to the family's first bucket with key.target_tokens tokens; the references, to
    the first combination (in reference_buckets order) of the smallest count r in `refs` whose token
    sum is context - target. Each image is a bundled calibration image resized to exactly its bucket,
    a bucket that reference_bucket (nearest_bucket for the input) maps to itself.
    """
    images = calibration_image_paths()
    pick = partial(_image_at, images, seed)
    target = [
        b for b in buckets(family) if tokens(*b) == key.target_tokens and nearest_bucket(*b, family) == b
    ]
    if not target:
        raise BuildError(f"no bucket of {family} has {key.target_tokens} tokens (shape key {key})")
    extra = key.context_tokens - key.target_tokens
    if extra == 0:
        return pick(target[0], 0), []
    for r in sorted(x for x in refs if x > 0):
        own = [b for b in reference_buckets(family, r) if reference_bucket(*b, family, r) == b]
        for combo in itertools.combinations_with_replacement(own, r):
            if sum(tokens(*b) for b in combo) == extra:
                return pick(target[0], 0), [pick(b, k + 1) for k, b in enumerate(combo)]
    raise BuildError(
        f"no combination of {list(refs)} reference(s) adds {extra} tokens in {family} (key {key})"
    )


def _image_at(images: Sequence[Path], seed: int, bucket: tuple[int, int], k: int) -> Image.Image:
    """Calibration image number seed + k (cycled), resized to exactly `bucket` (w, h)."""
    return resize_to(load_image(images[(seed + k) % len(images)]), bucket)


# --------------------------------------------------------------------------- files


def save_samples(path: Path, samples: Sequence[Sample], keys: Sequence[str] | None = None) -> None:
    """Samples -> one .npz (entries '<i>/<name>', plus '<i>/@key' when keyed), written atomically."""
    arrays: dict[str, np.ndarray] = {}
    for i, s in enumerate(samples):
        for name, a in s.items():
            arrays[f"{i:06d}/{name}"] = a
        if keys is not None:
            arrays[f"{i:06d}/@key"] = np.array(keys[i])
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # type: ignore[arg-type]
    atomic_write_bytes(path, buf.getbuffer())


def load_samples(path: Path) -> tuple[list[Sample], list[str]]:
    """The samples of a .npz written by save_samples, and their keys ('' where unkeyed)."""
    try:
        with np.load(path) as z:
            grouped: dict[str, Sample] = {}
            keys: dict[str, str] = {}
            for entry in z.files:
                idx, name = entry.split("/", 1)
                if name == "@key":
                    keys[idx] = str(z[entry])
                else:
                    grouped.setdefault(idx, {})[name] = z[entry]
    except (OSError, ValueError) as e:
        raise BuildError(f"{path} is unreadable ({e}); rebuild with `kontext build --force`") from e
    order = sorted(grouped)
    return [grouped[i] for i in order], [keys.get(i, "") for i in order]


def save_golden(path: Path, golden: dict[ShapeKey, list[Sample]]) -> None:
    samples = [s for k in sorted(golden) for s in golden[k]]
    keys = [str(k) for k in sorted(golden) for _ in golden[k]]
    save_samples(path, samples, keys)


def load_golden(path: Path) -> dict[str, list[Sample]]:
    samples, keys = load_samples(path)
    out: dict[str, list[Sample]] = {}
    for s, k in zip(samples, keys, strict=True):
        out.setdefault(k, []).append(s)
    return out
