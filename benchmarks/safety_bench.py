"""`python -m benchmarks.safety_bench`: what the licence duties cost per output, on this machine.

- C2PA signing of a 1024² PNG (noise: the largest PNG a 1024² output makes), ES256, no thumbnails, no
  timestamp authority: the time of ProvenanceSigner.sign on the encoded bytes, and the bytes it adds.
- The `nsfw` checker on a 1024² output: the real ViT-B/16 architecture (Falconsai/nsfw_image_detection's
  config: 224² input, patch 16, hidden 768, 12 layers) at random weights, which costs what the real
  weights cost; preprocessing (resize to 224², normalise) included.
Medians of --repeats runs after one warm-up; torch's default thread count. Each number is given as wall
time and as CPU time of this process (all its threads): on a shared machine the wall time grows with
the others' load (printed: the 1-minute load average against the core count) and the CPU time much less.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from engine.images import encode_image
from engine.outputs import output_metadata
from engine.provenance import ProvenanceSigner, trial_credentials
from engine.safety.nsfw import NsfwChecker


def median_ms(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    """(wall, CPU) milliseconds, medians of `repeats` calls after one warm-up."""
    fn()
    wall, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return 1000 * statistics.median(wall), 1000 * statistics.median(cpu)


def timing(ms: tuple[float, float], repeats: int) -> str:
    return f"{ms[0]:.1f} ms wall, {ms[1]:.1f} ms CPU (medians of {repeats})"


def noise_image(size: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), "RGB")


def signing(size: int, repeats: int) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        creds = trial_credentials(Path(tmp))
        signer = ProvenanceSigner.from_files(creds.chain, creds.key)
    meta = output_metadata("kontext-dev", prompt="add a small red hat", seed=0)
    out = encode_image(noise_image(size, seed=1), "PNG", meta)
    parent = encode_image(noise_image(size, seed=2), "PNG", {})
    encode = median_ms(lambda: encode_image(noise_image(size, seed=1), "PNG", meta), max(3, repeats // 4))
    sign = median_ms(lambda: signer.sign(out, parent=parent, model="kontext-dev"), repeats)
    added = len(signer.sign(out, parent=parent, model="kontext-dev")) - len(out)
    return (
        f"C2PA sign, {size}x{size} PNG ({len(out) / 1e6:.2f} MB, parent {len(parent) / 1e6:.2f} MB), ES256, "
        f"no thumbnail, no TSA: {timing(sign, repeats)}; the manifest adds {added / 1e3:.1f} KB\n"
        f"  for scale, PNG encoding of the same image: {encode[0]:.0f} ms wall, {encode[1]:.0f} ms CPU"
    )


def nsfw(size: int, repeats: int) -> str:
    from transformers import ViTConfig, ViTForImageClassification
    from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

    config = ViTConfig(id2label={0: "normal", 1: "nsfw"}, label2id={"normal": 0, "nsfw": 1})  # ViT-B/16
    torch.manual_seed(0)
    model = ViTForImageClassification(config)
    processor = ViTImageProcessorPil(
        size={"height": 224, "width": 224}, image_mean=[0.5] * 3, image_std=[0.5] * 3
    )
    checker = NsfwChecker(model, processor)
    image = noise_image(size)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    ms = median_ms(lambda: checker.check_image(image, "output"), repeats)
    return (
        f"nsfw check, {size}x{size} output, ViT-B/16 ({params:.1f}M params, fp32) on cpu "
        f"({torch.get_num_threads()} threads): {timing(ms, repeats)}"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=1024, help="image side (default 1024)")
    p.add_argument("--repeats", type=int, default=20, help="timed runs (default 20)")
    args = p.parse_args()
    print(f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the start")
    print(signing(args.size, args.repeats))
    print(nsfw(args.size, args.repeats))
    print(f"load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
