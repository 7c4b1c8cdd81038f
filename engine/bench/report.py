"""Benchmark results as records (JSON lines), a text table, and files under <out>/<device>/<date>/.

Every number derived here is computed from the measured samples: ratios are the baseline's median over
the contestant's median on the same bucket in the same run; TFLOP/s is engine.flops' count over the
median transformer step, and %peak divides it by the peak of the precision mix the contestant really ran
(FP8 Linears at the FP8 peak, the rest at bf16's). Stages a contestant does not measure are null in JSON
and "-" in the table.
"""

from __future__ import annotations

import io
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..files import atomic_write_bytes
from ..flops import ForwardFlops, gpu_peaks, linear_flops_by_name, mixed_peak_tflops, transformer_flops
from ..metrics import psnr, rel_l2
from .contestants import BASELINE, STAGES, STEP_CACHE
from .goals import evaluate_goals, format_goals, goals_apply
from .machine import FP8_PRECISIONS, device_name, library_versions, peak_tflops, slug
from .run import BenchRun, Entry, median_total
from .timing import summarize

log = logging.getLogger(__name__)

SCHEMA_VERSION = 3  # 3: own peak memory and weights, FP8 FLOP mix, dynamo counters
QUALITY_METHOD = "per-step rel L2: contestant's transformer fed the reference trajectory's recorded inputs"


@dataclass(frozen=True)
class ResultFiles:
    jsonl: Path
    table: Path
    chart: Path | None
    profile: Path | None = None


def _finite(x: float | None) -> float | None:
    """JSON has no inf/nan: those become null (psnr_identical says when null means 'identical')."""
    return None if x is None or not math.isfinite(x) else x


def run_record(run: BenchRun) -> dict[str, Any]:
    c = run.config
    return {
        "record": "run",
        "schema": SCHEMA_VERSION,
        "run_id": run.started.strftime("%Y%m%d-%H%M%S"),
        "started": run.started.isoformat(timespec="seconds"),
        "device": device_name(run.device),
        "device_type": run.device.type,
        "model": run.components.source,
        "weights_id": run.components.weights_id,
        "dtype": str(c.dtype).removeprefix("torch."),
        "steps": c.steps,
        "repeats": c.repeats,
        "warmup": c.warmup,
        "buckets": [f"{w}x{h}" for w, h in run.buckets],
        "contestants": [x.name for x in run.contestants],
        "baseline": BASELINE,
        "prompt": c.prompt,
        "seed": c.seed,
        "guidance": c.guidance,
        "memory_kind": run.memory_kind,
        "schedule": c.schedule,
        "deadline_s": c.deadline_s,
        "finished": run.finished,
        "load_s": run.load_seconds,
        "isolation": run.isolation,
        "versions": library_versions(),
        "notes": run.notes,
    }


def _stage_samples(entry: Entry, stage: str) -> list[float]:
    if stage == "step":
        return [t for s in entry.samples for t in s.step_times]
    return [s.stages[stage] for s in entry.samples if stage in s.stages]


def result_records(run: BenchRun) -> list[dict[str, Any]]:
    """One record per (contestant, bucket), ratios filled in against the baseline of the same bucket."""
    cfg = run.components.preset.transformer
    per_linear: dict[Any, dict[str, int]] = {}  # shape key -> FLOPs of each Linear, for FP8 contestants
    records = []
    for e in run.entries:
        if e.contestant.fp8_linears and e.shape_key not in per_linear:
            per_linear[e.shape_key] = linear_flops_by_name(run.components.transformer, e.shape_key)
        records.append(_entry_record(run, e, cfg, per_linear.get(e.shape_key, {})))
    base = {r["bucket"]: r for r in records if r["contestant"] == BASELINE}
    for r in records:
        b = base.get(r["bucket"])
        r["ratio_total"] = _ratio(b, r, "total")
        r["ratio_step"] = _ratio(b, r, "step")
    entries = {(e.contestant.name, f"{e.bucket[0]}x{e.bucket[1]}"): e for e in run.entries}
    for e, r in zip(run.entries, records, strict=True):
        r.update(step_cache_record(e, entries, r, records))
    return records


CACHE_NOTE = (
    "with random weights a threshold cache (fbc) hits as the random model dictates, not as the real one "
    "does; a schedule cache (magcache ratios, taylorseer interval) computes the same steps on any weights"
)


def step_cache_record(
    e: Entry, entries: dict[tuple[str, str], Entry], rec: dict[str, Any], records: list[dict[str, Any]]
) -> dict[str, Any]:
    """steps_computed, and for a +cache= contestant: the step cache, its end-to-end speed-up over the same
    contestant uncached (same bucket, when in the run) and its final latents' rel L2 and PSNR against it."""
    last = e.samples[-1] if e.samples else None
    out: dict[str, Any] = {"steps_computed": None if last is None else last.steps_computed}
    spec = e.contestant.step_cache
    if spec is None:
        return out
    uncached_name = e.contestant.name.partition("+" + STEP_CACHE)[0]
    plain = entries.get((uncached_name, rec["bucket"]))
    plain_rec = next(
        (r for r in records if r["contestant"] == uncached_name and r["bucket"] == rec["bucket"]), None
    )
    ref = plain.samples[-1].latents if plain is not None and plain.samples else None
    mine = None if last is None else last.latents
    same = ref is not None and mine is not None and ref.shape == mine.shape
    out["step_cache"] = {
        "spec": str(spec),
        "label": spec.label,
        "uncached": uncached_name if plain is not None else None,
        "speedup_total": _ratio(plain_rec, rec, "total") if plain_rec is not None else None,
        "latent_rel_l2": rel_l2(mine.float(), ref.float()) if same else None,  # type: ignore[union-attr]
        "latent_psnr_db": _finite(_latent_psnr(mine, ref)) if same else None,
        "note": CACHE_NOTE,
    }
    return out


def step_cache_lines(records: list[dict[str, Any]]) -> list[str]:
    """One line per +cache= record: steps computed, speed-up and final-latent error vs uncached."""
    out = []
    for r in records:
        c = r.get("step_cache")
        if not c or r["steps_computed"] is None:
            continue
        vs = c["uncached"] or "no uncached run of it here"
        out.append(
            f"{r['contestant']} {r['bucket']}: {r['steps_computed']} steps computed; vs {vs}: "
            f"x{_num(c['speedup_total'], '.2f')} end to end, final latents rel L2 "
            f"{_num(c['latent_rel_l2'], '.2e')}, PSNR {_num(c['latent_psnr_db'], '.1f')} dB"
        )
    return ["", "step caches:", *out, f"  ({CACHE_NOTE})"] if out else []


def _latent_psnr(x: Any, ref: Any) -> float:
    """PSNR of final latents over the uncached latents' range (max - min)."""
    r = ref.float()
    return psnr(x.float(), r, data_range=float(r.max() - r.min()))


def _ratio(base: dict[str, Any] | None, rec: dict[str, Any], stage: str) -> float | None:
    """baseline median / contestant median: > 1 means the contestant is faster."""
    if base is None or base["stages"][stage] is None or rec["stages"][stage] is None:
        return None
    return base["stages"][stage]["median_s"] / rec["stages"][stage]["median_s"]


def fp8_flops(e: Entry, flops: ForwardFlops, per_linear: dict[str, int]) -> int:
    """FLOPs of one forward that the contestant runs in FP8: its FP8 Linears (+ attention when FP8)."""
    linear = sum(per_linear.get(name, 0) for name in e.contestant.fp8_linears)
    return linear + (flops.attention if e.contestant.fp8_attention else 0)


def _peak(run: BenchRun, e: Entry, flops: ForwardFlops, f8: int) -> float | None:
    """The contestant's peak TFLOP/s: the bf16/FP8 mix it runs for torch FP8 contestants (f8 known), the
    precision's peak otherwise (an engine artifact's mix is not known here: its FP8 peak)."""
    if run.device.type != "cuda":
        return None
    if e.contestant.precision in FP8_PRECISIONS and f8:
        import torch

        bf16, fp8 = gpu_peaks(torch.cuda.get_device_name(run.device))
        return mixed_peak_tflops(bf16, fp8, f8, flops.total)
    return peak_tflops(run.device, e.contestant.precision)


def _entry_record(run: BenchRun, e: Entry, cfg: Any, per_linear: dict[str, int]) -> dict[str, Any]:
    stats = {s: summarize(_stage_samples(e, s)) for s in STAGES}
    flops = transformer_flops(cfg, e.shape_key)
    step = stats["step"]
    tflops = flops.total / step.median / 1e12 if step else None
    f8 = fp8_flops(e, flops, per_linear)
    peak = _peak(run, e, flops, f8)
    notes: dict[str, str] = {}
    for s in e.samples:
        notes.update(s.notes)
    q = e.quality
    median = median_total(e)
    cold = None
    if e.first_edit_s is not None and median is not None:
        # a first edit faster than the median (no compile: eager, ONNX Runtime) is timing noise, not a
        # negative start-up cost; it printed as negative "cold s" before
        cold = max(0.0, (e.load_s or 0.0) + e.first_edit_s - median)
    return {
        "record": "result",
        "run_id": run.started.strftime("%Y%m%d-%H%M%S"),
        "contestant": e.contestant.name,
        "backend": e.contestant.backend,
        "precision": e.contestant.precision,
        "baseline": e.contestant.is_baseline,
        "bucket": f"{e.bucket[0]}x{e.bucket[1]}",
        "shape_key": str(e.shape_key),
        "skipped": e.skipped,
        "stages": {s: (v.to_dict() if v else None) for s, v in stats.items()},
        "stage_notes": notes,
        "flops_per_step": {
            "linear": flops.linear,
            "attention": flops.attention,
            "total": flops.total,
            "fp8": f8,
        },
        "tflops": tflops,
        "peak_tflops": peak,
        "pct_of_peak": 100.0 * tflops / peak if tflops and peak else None,
        "peak_memory_bytes": max(e.peak_memory) if e.peak_memory else None,  # above the shared weights
        "weights_bytes": e.weights_bytes,  # what opening it added: its own weights
        "dynamo": e.dynamo,
        "load_s": e.load_s,
        "first_edit_s": e.first_edit_s,
        "cold_start_s": cold,
        "memory_kind": run.memory_kind,
        "quality": None
        if q is None
        else {
            "reference": q.reference,
            "psnr_db": _finite(q.psnr_db),
            "psnr_identical": math.isinf(q.psnr_db),
            "step_rel_l2": [_finite(x) for x in q.step_rel_l2],
            "steps": list(q.steps),
            "step_rel_l2_max": _finite(q.rel_l2_max),
            "step_rel_l2_mean": _finite(q.rel_l2_mean),
            "method": QUALITY_METHOD,
        },
    }


# --------------------------------------------------------------------------- table

_COLUMNS = (
    ("contestant", 22),
    ("bucket", 9),
    ("text ms", 8),
    ("venc ms", 8),
    ("step ms", 9),
    ("p90", 8),
    ("vdec ms", 8),
    ("total ms", 9),
    ("p90", 9),
    ("x base", 7),
    ("x step", 7),
    ("TFLOP/s", 8),
    ("%peak", 6),
    ("peak MB", 8),
    ("wts MB", 7),
    ("cold s", 7),
    ("PSNR dB", 8),
    ("relL2 max", 10),
)


def _ms(stat: dict[str, Any] | None, key: str = "median_s") -> str:
    return "-" if stat is None else f"{1000 * stat[key]:.1f}"


def _num(x: float | None, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def _row(r: dict[str, Any]) -> list[str]:
    """The table cells of a measured record (see _COLUMNS)."""
    st, q = r["stages"], r["quality"]
    name = r["contestant"] + ("*" if r["stage_notes"] else "")
    psnr = "-" if q is None else ("inf" if q["psnr_identical"] else _num(q["psnr_db"], ".2f"))
    mem = r["peak_memory_bytes"]
    return [
        name,
        r["bucket"],
        _ms(st["text_encode"]),
        _ms(st["vae_encode"]),
        _ms(st["step"]),
        _ms(st["step"], "p90_s"),
        _ms(st["vae_decode"]),
        _ms(st["total"]),
        _ms(st["total"], "p90_s"),
        _num(r["ratio_total"], ".2f"),
        _num(r["ratio_step"], ".2f"),
        _num(r["tflops"], ".3g"),
        _num(r["pct_of_peak"], ".1f"),
        "-" if mem is None else f"{mem / 2**20:.0f}",
        "-" if r.get("weights_bytes") is None else f"{r['weights_bytes'] / 2**20:.0f}",
        _num(r["cold_start_s"], ".1f"),
        psnr,
        "-" if q is None else _num(q["step_rel_l2_max"], ".2e"),
    ]


def format_table(run_rec: dict[str, Any], records: list[dict[str, Any]]) -> str:
    """The human table: one row per contestant and bucket, then what each column means."""
    head = (
        f"kontext bench: {run_rec['model']} on {run_rec['device']}, {run_rec['dtype']}, "
        f"{run_rec['steps']} steps, median of {run_rec['repeats']} {run_rec['schedule']} rounds "
        f"(+{run_rec['warmup']} warm-up)"
    )
    lines = [head, ""]
    lines.append("  ".join(h.rjust(w) if i > 1 else h.ljust(w) for i, (h, w) in enumerate(_COLUMNS)))
    for r in records:
        if r["skipped"] and not r["stages"]["total"]:
            lines.append(f"{r['contestant']:<22}  {r['bucket']:<9}  skipped: {r['skipped']}")
            continue
        cells = _row(r)
        lines.append(
            "  ".join(
                c.rjust(w) if i > 1 else c.ljust(w)
                for i, (c, (_, w)) in enumerate(zip(cells, _COLUMNS, strict=True))
            )
        )
    ref = next((r["quality"]["reference"] for r in records if r["quality"]), "-")
    loaded = "all contestants loaded" if run_rec["schedule"] == "interleaved" else "one at a time"
    lines += [
        "",
        f"x base / x step: {BASELINE} median / this contestant's median, end to end / per transformer "
        "step (> 1: faster), same bucket, same run.",
        "step: one transformer forward. TFLOP/s: engine.flops (linear + attention) / median step; %peak "
        "against the peak of the precision mix run (FP8 Linears at the FP8 peak, the rest at bf16's).",
        f"peak MB: {run_rec['memory_kind']} above what was in use before the contestant opened (shared "
        f"weights excluded; {loaded}); "
        "wts MB: what opening it added (its own weights).",
        f"PSNR: final image vs the reference ({ref}), printed, not gated. relL2 max: worst replayed step, "
        "the contestant's transformer fed the reference trajectory's inputs ('-': the reference's own "
        "module); the quality gate.",
        "cold s: opening the contestant (copy, quantize, calibrate; its first bucket only) + its first "
        "edit - its median edit: compiles and graph captures (0 when the first edit was no slower). "
        "Within one run, graphs an earlier contestant compiled hit inductor's on-disk cache.",
    ]
    lines += step_cache_lines(records)
    noted = {(s, n) for r in records for s, n in r["stage_notes"].items()}
    if noted:
        names = {"text_encode": "text ms", "step": "step ms"}
        outside = {"text_encode": " (outside its end-to-end time)"}
        lines.append(
            "*: " + "; ".join(f"{names.get(s, s)} = {n}{outside.get(s, '')}" for s, n in sorted(noted))
        )
    counted = [r for r in records if r.get("dynamo") and r["dynamo"]["graphs"]]
    for r in {r["contestant"]: r for r in counted}.values():
        d = r["dynamo"]
        lines.append(
            f"dynamo {r['contestant']}: {d['graphs']} graphs, {d['graph_breaks']} graph breaks, "
            f"{d['recompiles']} recompiles"
        )
    lines += [f"note: {n}" for n in run_rec["notes"]]
    broken = {k: v for k, v in run_rec["isolation"].items() if v != "ok"}
    if run_rec["isolation"]:
        lines.append(
            "isolation: the baseline's transformer was unchanged after every contestant"
            if not broken
            else f"isolation BROKEN: {broken}"
        )
    if not run_rec["finished"]:
        lines.append("run not finished: results so far")
    lines += ["", format_goals(evaluate_goals(run_rec, records), goals_apply(run_rec))]
    return "\n".join(lines)


# --------------------------------------------------------------------------- files


def result_dir(out_root: Path, run: BenchRun) -> Path:
    """<out_root>/<device slug>/<YYYY-MM-DD>/"""
    return out_root / slug(device_name(run.device)) / run.started.strftime("%Y-%m-%d")


def write_results(
    run: BenchRun, out_root: Path, chart: bool = True, folder: Path | None = None
) -> tuple[str, ResultFiles]:
    """Write JSON lines, the table and the chart; return the table and the paths. `folder`: exactly
    there instead of result_dir(out_root, run) (the GPU script keeps one folder, named at its start)."""
    from .chart import draw_latency_chart

    run_rec = run_record(run)
    records = result_records(run)
    table = format_table(run_rec, records)
    folder = folder or result_dir(out_root, run)
    folder.mkdir(parents=True, exist_ok=True)
    stem = f"{slug(Path(str(run.config.model)).name)}-{run.started.strftime('%H%M%S')}"
    jsonl = folder / f"{stem}.jsonl"
    lines = "".join(json.dumps(r, allow_nan=False) + "\n" for r in [run_rec, *records])
    atomic_write_bytes(jsonl, lines.encode())
    table_path = folder / f"{stem}.txt"
    atomic_write_bytes(table_path, (table + "\n").encode())
    png = None
    if chart:
        png = folder / f"{stem}.png"
        buf = io.BytesIO()
        draw_latency_chart(run_rec, records).save(buf, format="PNG")
        atomic_write_bytes(png, buf.getvalue())
    profiles = [(e.contestant.name, e.profile) for e in run.entries if e.profile]
    profile_path = None
    if profiles:
        profile_path = folder / f"{stem}-profile.txt"
        text = "\n\n".join(f"== {name}: one transformer step ==\n{p}" for name, p in profiles)
        atomic_write_bytes(profile_path, (text + "\n").encode())
    log.info("wrote %s", folder)
    return table, ResultFiles(jsonl, table_path, png, profile_path)
