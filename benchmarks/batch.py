"""Several images per edit: throughput at batch 1, 2, 4, and how far a batch row is from its single edit.

Throughput: `edit(num_images=B)` end to end (one text and one VAE encode, B noises, one batched
denoise, B decodes), median of --repeats after one warm-up, as images per second. Check: the max abs
difference between each image's latents in a batch of 4 and the single edit of its seed, and the max
pixel difference (the tolerance tests/test_batch.py asserts).

    python -m benchmarks.batch --model small --batches 1,2,4
    python -m benchmarks.batch --check --model tiny
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import numpy as np

import engine
from engine import assets
from engine.images import load_image

PROMPT = "add a red hat"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="small")
    p.add_argument("--batches", default="1,2,4")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--check", action="store_true", help="batch-vs-single error instead of throughput")
    args = p.parse_args()

    image = load_image(assets.sample_image_path())
    with engine.load(args.model) as kontext:
        if args.check:
            batch = kontext.edit(image, PROMPT, seed=5, steps=args.steps, num_images=4)
            for i in range(4):
                single = kontext.edit(image, PROMPT, seed=5 + i, steps=args.steps)
                err = (batch.latents[i] - single.latents[0]).abs().max().item()
                px = np.abs(np.asarray(batch.images[i], np.int16) - np.asarray(single.image, np.int16)).max()
                scale = single.latents.abs().max().item()
                print(
                    f"{args.model} seed {5 + i}: max abs latent diff {err:.2g} "
                    f"(latents up to {scale:.2g}), max pixel diff {px}"
                )
            return
        print(f"{args.model}, {args.steps} steps, {platform.processor() or platform.machine()}")
        print("batch | median s per edit | images/s | x batch 1")
        base = None
        for b in (int(v) for v in args.batches.split(",")):
            kontext.edit(image, PROMPT, steps=args.steps, num_images=b)  # warm-up
            times = []
            for r in range(args.repeats):
                t0 = time.perf_counter()
                kontext.edit(image, PROMPT, seed=r, steps=args.steps, num_images=b)
                times.append(time.perf_counter() - t0)
            rate = b / statistics.median(times)
            base = base or rate
            print(f"{b:>5} | {statistics.median(times):>17.3f} | {rate:>8.2f} | {rate / base:.2f}")


if __name__ == "__main__":
    main()
