"""Successive edits: re-encoding each output (reencode=True) against handing its latents on (False).

Runs the same prompts and seeds through both sessions and prints, turn by turn, the VAE encode time
of each path (what reencode=False saves, from turn 2 on) and the distance between the two paths' final latents
(relative L2, engine.metrics; 0 on turn 1, where both edit the same file). Timings are wall-clock
seconds of this machine; the distance is deterministic.

    python -m benchmarks.sessions                             # tiny, 8 turns: a minute or two on 2 cores
    python -m benchmarks.sessions --model small --turns 8     # the documented numbers: over 10 min on 2 cores

Progress: a bar per session on stderr and one log line per turn (its seconds), so a long run shows
where it is; --no-progress drops the bars.
"""

from __future__ import annotations

import argparse
import logging
import platform
import statistics
import time
from typing import TYPE_CHECKING

from tqdm.auto import tqdm

import engine
from engine import assets
from engine.images import load_image
from engine.metrics import rel_l2

if TYPE_CHECKING:
    from engine.pipeline import EditResult

log = logging.getLogger("benchmarks.sessions")

PROMPTS = (
    "add a red hat",
    "make it night",
    "add snow",
    "paint it in watercolor",
    "turn the sky purple",
    "add a small dog",
    "make it autumn",
    "add a lighthouse",
)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--model", default="tiny", help="preset or path (default tiny; small: minutes per turn pair)"
    )
    p.add_argument("--turns", type=int, default=8)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--no-progress", action="store_true", help="no progress bars (the per-turn log stays)")
    args = p.parse_args()
    if args.turns < 1 or args.steps < 1:
        p.error("--turns and --steps must be at least 1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")

    image = load_image(assets.sample_image_path())
    log.info("loading %s", args.model)
    with engine.load(args.model) as kontext:
        kontext.edit(image, PROMPTS[0], steps=1)  # warm-up: first-call allocations out of the timings
        runs: dict[bool, list[EditResult]] = {}
        for reencode in (True, False):
            name = "reencode" if reencode else "latents"
            session = kontext.session(image, reencode=reencode)
            runs[reencode] = []
            for k in tqdm(range(args.turns), desc=f"session ({name})", unit="turn", disable=args.no_progress):
                start = time.perf_counter()
                runs[reencode].append(session.edit(PROMPTS[k % len(PROMPTS)], seed=k, steps=args.steps))
                log.info("%s turn %d/%d: %.2f s", name, k + 1, args.turns, time.perf_counter() - start)
    print(
        f"{args.model}, {args.steps} steps, {platform.processor() or platform.machine()}, "
        f"bucket {runs[True][0].size[0]}x{runs[True][0].size[1]}"
    )
    print("turn | vae_encode s reencode | vae_encode s latents | rel L2 latents (latents vs reencode)")
    for k, (a, b) in enumerate(zip(runs[True], runs[False], strict=True), start=1):
        dist = rel_l2(b.latents.float().numpy(), a.latents.float().numpy())
        print(f"{k:>4} | {a.timings['vae_encode']:>21.4f} | {b.timings['vae_encode']:>20.4f} | {dist:.4f}")
    # turn 1 encodes the input image on both paths: the saving is turns 2..N
    later = list(zip(runs[True][1:], runs[False][1:], strict=True))
    saved = sum(a.timings["vae_encode"] - b.timings["vae_encode"] for a, b in later)
    per_turn = statistics.median(a.timings["vae_encode"] for a, _ in later) if later else 0.0
    total = sum(r.timings["total"] for r in runs[True])
    print(
        f"VAE encode time saved on turns 2..{args.turns}: {saved:.3f} s "
        f"(median {per_turn:.3f} s per turn), {100 * saved / total:.1f}% of the re-encoding "
        f"session's {total:.2f} s"
    )


if __name__ == "__main__":
    main()
