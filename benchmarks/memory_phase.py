"""The memory phase of the GPU run: one full-size edit per memory plan, each on an emulated smaller card.

On the one big GPU, `torch.cuda.set_per_process_memory_fraction` caps torch's allocator at a 24 GiB and
a 16 GiB card (or whatever --vram lists). First the resident path (the reference), then per card: plan
(engine.memory.plan_memory), load and apply the plan (engine.load(vram=plan)), cap the allocator, run one
edit at the family's square bucket (1024x1024 on the full model), and record the expected peak, the
peak allocated and reserved (torch.cuda.max_memory_*, reset before the edit), end-to-end seconds and
rel L2 of the final latents against the resident edit. One JSON row per plan, flushed to DIR/memory.jsonl
as it goes; a plan that would end past --deadline-s (seconds from this process's start, estimated from
the previous plan) is written as a skipped row and the phase stops.

What the emulation does not cover: the load itself runs uncapped (the weights come onto the big card,
then the plan moves them off), and the CUDA context is outside the cap.

    python -m benchmarks.memory_phase --model full --vram 24,16 --results DIR --deadline-s 400
    python -m benchmarks.memory_phase --model tiny --vram 24,16 --results DIR --deadline-s 300 --dry-run

--dry-run runs the same code on a CPU with the tiny preset: each card's plan is the full model's, and its
levers are applied to tiny (streaming with the no-op transfer); no memory is capped or measured. Exit
status 1 when any row is an error.
"""

from __future__ import annotations

import time

START = time.monotonic()  # --deadline-s counts from here (before the heavy imports)

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, TextIO  # noqa: E402

log = logging.getLogger("benchmarks.memory_phase")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--model", default="full", help="full on a GPU; tiny with --dry-run")
    p.add_argument("--vram", default="24,16", help="cards to emulate, GiB, comma list")
    p.add_argument("--results", type=Path, required=True, help="folder: memory.jsonl is written there")
    p.add_argument("--deadline-s", type=float, default=None, help="seconds from this process's start")
    p.add_argument("--steps", type=int, default=None, help="steps per edit (default: the model's)")
    p.add_argument("--dry-run", action="store_true", help="tiny on a CPU: the same code, nothing capped")
    return p.parse_args(argv)


def cards(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


class Rows:
    """memory.jsonl, one row per plan, flushed after each."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / "memory.jsonl"
        self._f: TextIO = self.path.open("w")
        self.errors = 0

    def write(self, row: dict[str, Any]) -> None:
        self.errors += row.get("error") is not None
        self._f.write(json.dumps(row) + "\n")
        self._f.flush()
        log.warning("memory phase: %s", json.dumps(row))

    def close(self) -> None:
        self._f.close()


def square_image(width: int, height: int) -> Any:
    """A smooth RGB gradient with a seeded texture: the same input on every run."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:height, 0:width]
    noise = np.random.default_rng(0).integers(-16, 16, size=(height, width, 3))
    rgb = np.stack([x * 255 / (width - 1), y * 255 / (height - 1), (x + y) % 256], axis=-1) + noise
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), "RGB")


def run_edit(kontext: Any, cuda: bool, fraction: float | None, steps: int | None) -> dict[str, Any]:
    """One edit at the family's square bucket, with the allocator capped at `fraction` of the card."""
    import torch

    from engine.buckets import buckets
    from engine.request import EditRequest

    w, h = min(buckets(kontext.family), key=lambda b: (abs(b[0] - b[1]), -b[0]))
    request = EditRequest.of(square_image(w, h), "add a small red hat", seed=0, steps=steps)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        if fraction is not None:
            torch.cuda.set_per_process_memory_fraction(fraction)
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    result = kontext.edit(request)
    if cuda:
        torch.cuda.synchronize()
    out: dict[str, Any] = {"seconds": round(time.perf_counter() - t0, 3), "size": [w, h]}
    out["steps"] = len(result.step_times)
    if cuda:
        out["peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
        out["peak_reserved_bytes"] = torch.cuda.max_memory_reserved()
        torch.cuda.set_per_process_memory_fraction(1.0)
    out["latents"] = result.latents.float().cpu()
    return out


def load_and_edit(
    model: str, device: str, plan: Any, fraction: float | None, steps: int | None
) -> dict[str, Any]:
    """Load `model` under `plan` (None: resident), edit once, and free everything before returning (the
    next plan loads onto an empty card)."""
    import gc

    import torch

    from engine.runtime import load

    try:
        with load(model, device=device, vram=plan, safety="off") as kontext:
            return run_edit(kontext, device == "cuda", fraction, steps)
    finally:  # the engine is closed and unreferenced here: collect it before the next plan loads
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    import torch

    from engine.memory.plan import GIB, evaluate, plan_memory
    from engine.memory.sizes import model_sizes

    cuda = not args.dry_run
    if cuda and not torch.cuda.is_available():
        print("memory_phase: needs a CUDA GPU (or --dry-run on a CPU)", file=sys.stderr)
        return 2
    device = "cuda" if cuda else "cpu"
    total = torch.cuda.get_device_properties(0).total_memory if cuda else None
    rows = Rows(args.results)
    plan_model = "full" if args.dry_run else args.model
    base = {
        "model": args.model,
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "dry_run": args.dry_run,
    }
    reference: torch.Tensor | None = None
    last = 0.0
    todo: list[float | None] = [None, *cards(args.vram)]  # None: the resident reference
    try:
        for vram in todo:
            name = "resident" if vram is None else f"{vram:g}GiB"
            if args.deadline_s is not None and time.monotonic() - START + last > args.deadline_s:
                rows.write({**base, "plan": name, "skipped": "deadline"})
                break
            t0 = time.monotonic()
            row: dict[str, Any] = {**base, "plan": name, "vram_gib": vram, "error": None}
            try:
                plan = None
                if vram is not None:
                    plan = plan_memory(plan_model, vram=vram)
                    row |= {"levers": list(plan.levers.names()), "fits": plan.fits}
                    row["expected_peak_bytes"] = plan.peak_bytes
                    row["plan_json"] = plan.to_json()
                    if not plan.fits:  # a planned refusal: the row says so, and the phase goes on
                        rows.write({**row, "refused": plan.refusal()})
                        continue
                    if args.dry_run:  # the full model's levers, on tiny
                        plan = evaluate(model_sizes(args.model), plan.levers, int(vram * GIB))
                fraction = None if vram is None or total is None else min(1.0, vram * GIB / total)
                measured = load_and_edit(args.model, device, plan, fraction, args.steps)
                latents = measured.pop("latents")
                if reference is None:
                    reference = latents
                ref_norm = reference.norm().item()
                row |= measured
                row["rel_l2"] = (latents - reference).norm().item() / ref_norm if ref_norm else None
            except Exception as e:  # an out-of-memory is this row's result
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
                if cuda:
                    torch.cuda.set_per_process_memory_fraction(1.0)
                    torch.cuda.empty_cache()
            row["phase_seconds"] = round(time.monotonic() - t0, 1)
            last = row["phase_seconds"]
            rows.write(row)
    finally:
        rows.close()
    print(f"memory phase: wrote {rows.path} ({rows.errors} error row(s))")
    return 1 if rows.errors else 0


if __name__ == "__main__":
    sys.exit(main())
