"""`kontext bench` end to end on the tiny preset (1 step, 1 round, 1 bucket): the records, the derived
columns (ratios, quality) recomputed from what was recorded, the files. Speeds are never asserted."""

from __future__ import annotations

import json
import math

import pytest
import torch
from PIL import Image

from engine.backends import DenoiserBase
from engine.backends.torch import TorchDenoiser
from engine.bench import BenchConfig, default_buckets, run_bench, write_results
from engine.bench.contestants import BASELINE, Contestant, torch_contestant
from engine.bench.machine import cpu_has_bf16, peak_for_gpu
from engine.bench.runner import select_contestants
from engine.bench.timing import summarize
from engine.cli import main
from engine.errors import ConfigError
from engine.flops import transformer_flops

BUCKET = (128, 128)
SCALE = 1.01  # the scaled contestant's output is the reference's times SCALE: rel L2 = 0.01 exactly


class ScaledDenoiser(DenoiserBase):
    """A known-wrong contestant: the torch transformer's output times SCALE."""

    def __init__(self, inner: TorchDenoiser, shape_keys=None) -> None:
        self.inner = inner
        self.name = "scaled"
        self.shape_keys = shape_keys

    def run(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.inner(**inputs) * SCALE


@pytest.fixture(scope="module")
def bench_out(tiny, tmp_path_factory):
    config = BenchConfig(model="tiny", steps=1, repeats=1, warmup=0, buckets=(BUCKET,), progress=False)
    cpu, fp32 = torch.device("cpu"), torch.float32
    contestants = [
        Contestant(BASELINE, "diffusers", "fp32"),
        torch_contestant("torch-eager", tiny, cpu, fp32),
        Contestant("scaled", "torch", "fp32", lambda: ScaledDenoiser(TorchDenoiser(tiny.transformer))),
        Contestant(
            "no-shapes", "torch", "fp32", lambda: ScaledDenoiser(TorchDenoiser(tiny.transformer), frozenset())
        ),
    ]
    run = run_bench(config, tiny, contestants)
    out = tmp_path_factory.mktemp("results")
    table, files = write_results(run, out)
    lines = [json.loads(x) for x in files.jsonl.read_text().splitlines()]
    return run, table, files, lines


def _results(lines):
    return {r["contestant"]: r for r in lines if r["record"] == "result"}


def test_jsonl_has_a_run_line_and_one_result_per_contestant(bench_out):
    _, _, _, lines = bench_out
    assert lines[0]["record"] == "run"
    assert lines[0]["steps"] == 1 and lines[0]["buckets"] == ["128x128"]
    results = _results(lines)
    assert set(results) == {BASELINE, "torch-eager-fp32", "scaled", "no-shapes"}
    for r in results.values():
        assert r["bucket"] == "128x128"
        assert set(r["stages"]) == {"text_encode", "vae_encode", "step", "denoise", "vae_decode", "total"}


def test_stages_measured_and_honest_about_gaps(bench_out):
    results = _results(bench_out[3])
    base, ours = results[BASELINE], results["torch-eager-fp32"]
    for stage in ("text_encode", "vae_encode", "step", "vae_decode", "total"):
        assert base["stages"][stage]["median_s"] > 0
        assert ours["stages"][stage]["median_s"] > 0
    assert base["stages"]["denoise"] is None  # not measured for diffusers: null, "-" in the table
    assert "text_encode" in base["stage_notes"]  # its text encoding is a separate call, and says so
    assert ours["stages"]["step"]["n"] == 1  # 1 step x 1 round


def test_ratios_are_computed_from_recorded_medians(bench_out):
    results = _results(bench_out[3])
    base = results[BASELINE]
    for r in results.values():
        if r["skipped"]:
            continue
        for stage, key in (("total", "ratio_total"), ("step", "ratio_step")):
            expect = base["stages"][stage]["median_s"] / r["stages"][stage]["median_s"]
            assert r[key] == pytest.approx(expect, rel=1e-12)
    assert base["ratio_total"] == 1.0


def test_flops_and_tflops_follow_the_flop_model(bench_out):
    run, _, _, lines = bench_out
    r = _results(lines)["torch-eager-fp32"]
    key = run.entries[0].shape_key
    flops = transformer_flops(run.components.preset.transformer, key)
    assert r["flops_per_step"] == {
        "linear": flops.linear,
        "attention": flops.attention,
        "total": flops.total,
        "fp8": 0,
    }
    assert r["tflops"] == pytest.approx(flops.total / r["stages"]["step"]["median_s"] / 1e12)
    assert r["pct_of_peak"] is None  # no known peak on a CPU


def test_quality_against_the_reference(bench_out):
    results = _results(bench_out[3])
    ref = results["torch-eager-fp32"]["quality"]
    assert ref["psnr_identical"] and ref["psnr_db"] is None  # the reference itself: identical, inf dB
    assert ref["step_rel_l2"] == [0.0]
    base = results[BASELINE]["quality"]
    assert base["psnr_identical"] or base["psnr_db"] > 60  # diffusers is at parity with our loop
    scaled = results["scaled"]["quality"]
    assert scaled["step_rel_l2"] == [pytest.approx(SCALE - 1, rel=1e-4)]  # replayed on the reference's inputs
    assert math.isfinite(scaled["psnr_db"])
    assert scaled["reference"] == "torch-eager-fp32"


def test_contestant_that_cannot_serve_the_shape_is_skipped(bench_out):
    r = _results(bench_out[3])["no-shapes"]
    assert "not served" in r["skipped"]
    assert r["stages"]["total"] is None and r["ratio_total"] is None and r["quality"] is None


def test_table_and_chart_written(bench_out):
    _, table, files, _ = bench_out
    assert "x base" in table and "torch-eager-fp32" in table and "skipped" in table
    assert files.table.read_text().strip() == table.strip()
    assert files.chart is not None and files.chart.stat().st_size > 2000
    with Image.open(files.chart) as png:
        assert png.width >= 800 and png.height >= 100
        lo, hi = png.convert("L").getextrema()
        assert lo < 100 < hi  # something drawn on white


def test_results_folder_is_device_and_date(bench_out):
    run, _, files, _ = bench_out
    assert files.jsonl.parent.name == run.started.strftime("%Y-%m-%d")
    assert files.jsonl.parent.parent.name.endswith("cores")


def test_stats_median_and_p90():
    s = summarize([5.0, 1.0, 3.0, 2.0, 4.0])
    assert s.median == 3.0 and s.p90 == pytest.approx(4.6) and s.n == 5
    assert summarize([]) is None


def test_default_buckets_square_and_extremes():
    assert default_buckets("tiny") == ((128, 128), (80, 192), (192, 80))


def test_contestant_names_resolve_without_a_build(tiny, tmp_path):
    notes: list[str] = []
    cs = select_contestants(None, tiny, torch.device("cpu"), torch.float32, tmp_path / "none", notes)
    bf16 = ["torch-eager-bf16"] if cpu_has_bf16() else []  # this CPU's flags decide (tested below)
    assert [c.name for c in cs] == [BASELINE, "torch-eager-fp32", *bf16]
    assert notes and "manifest" in notes[0]
    with pytest.raises(ConfigError, match="unknown-thing"):
        select_contestants(("unknown-thing",), tiny, torch.device("cpu"), torch.float32, tmp_path, [])


def test_bad_settings_are_typed_errors():
    with pytest.raises(ConfigError):
        BenchConfig(repeats=0)
    with pytest.raises(ConfigError):
        BenchConfig(steps=0)


@pytest.mark.slow  # a whole kontext bench run
def test_cli_bench_prints_the_table(tmp_path, capsys):
    argv = [
        "bench",
        "--steps",
        "1",
        "--repeats",
        "1",
        "--warmup",
        "0",
        "--buckets",
        "192x80",
        "--contestants",
        "diffusers,torch-eager",
        "--build",
        str(tmp_path / "none"),
        "--out",
        str(tmp_path),
        "--no-progress",
        "--no-chart",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "torch-eager-fp32" in out and "192x80" in out and "wrote" in out
    assert list(tmp_path.rglob("*.jsonl")) and not list(tmp_path.rglob("*.png"))


def test_cli_bench_rejects_a_bucket_outside_the_family(tmp_path, capsys):
    assert main(["bench", "--buckets", "100x100", "--out", str(tmp_path), "--no-progress"]) == 2
    assert "not in the model's family" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("name", "precision", "peak"),
    [
        ("NVIDIA H100 80GB HBM3", "bf16", 989.0),
        ("NVIDIA H100 80GB HBM3", "fp8", 1979.0),
        ("NVIDIA H100 PCIe", "bf16", 756.0),
        ("NVIDIA H200", "fp8", 1979.0),
        ("NVIDIA L40S", "bf16", 362.0),
        ("NVIDIA L4", "bf16", 121.0),
        ("NVIDIA A100-SXM4-80GB", "fp8", None),
        ("Some Future GPU", "bf16", None),
    ],
)
def test_gpu_peaks_by_name(name, precision, peak):
    assert peak_for_gpu(name, precision) == peak


@pytest.mark.slow  # a bench run over the built engines
def test_engine_contestants_come_from_the_manifest(tiny, tiny_build, tmp_path):
    """Every artifact of a build is a contestant, loaded through the runtime's loader, timed and checked."""
    config = BenchConfig(
        model="tiny",
        steps=1,
        repeats=1,
        warmup=0,
        buckets=((80, 192),),
        build_dir=tiny_build,
        contestants=("diffusers", "engines"),
        progress=False,
    )
    run = run_bench(config, tiny)
    _, files = write_results(run, tmp_path, chart=False)
    results = _results([json.loads(x) for x in files.jsonl.read_text().splitlines()])
    engines = {n: r for n, r in results.items() if r["backend"] == "onnxruntime"}
    assert {r["precision"] for r in engines.values()} >= {"fp32", "int8"}
    for r in engines.values():
        assert r["skipped"] is None
        assert r["ratio_step"] == pytest.approx(
            results[BASELINE]["stages"]["step"]["median_s"] / r["stages"]["step"]["median_s"]
        )
        assert r["quality"]["step_rel_l2"][0] < 0.2  # fp32 ~1e-6, int8 a few percent
    assert engines["onnxruntime-fp32"]["quality"]["step_rel_l2"][0] < 1e-4


# ----------------------------------------------------------------------------- sequential schedule, goals


def test_sequential_deadline_skips_whole_contestants_and_reports_progress(tiny):
    """deadline 0: nothing fits, every contestant is skipped with the reason, and progress is reported
    after each one and at the end (what lets a killed GPU run keep its results)."""
    config = BenchConfig(
        model="tiny",
        steps=1,
        repeats=1,
        warmup=0,
        buckets=(BUCKET,),
        progress=False,
        schedule="sequential",
        deadline_s=0.0,
    )
    cpu, fp32 = torch.device("cpu"), torch.float32
    contestants = [
        Contestant(BASELINE, "diffusers", "fp32"),
        torch_contestant("torch-eager+qkv", tiny, cpu, fp32),
    ]
    seen: list[int] = []
    run = run_bench(config, tiny, contestants, on_progress=lambda r: seen.append(len(r.entries)))
    assert seen == [1, 2, 2] and run.finished
    assert all(e.skipped and e.skipped.startswith("deadline") for e in run.entries)
    with pytest.raises(ConfigError, match="sequential"):
        BenchConfig(deadline_s=10.0)


def test_sequential_reports_each_timed_round_so_a_killed_contestant_keeps_them(tiny, tmp_path):
    """Progress after every timed round (and after the contestant, and at the end): `kontext bench`
    writes its files there, so a phase killed mid-contestant leaves the rounds already timed."""
    config = BenchConfig(
        model="tiny",
        steps=1,
        repeats=2,
        warmup=0,
        buckets=(BUCKET,),
        progress=False,
        schedule="sequential",
    )
    contestants = [torch_contestant("torch-eager", tiny, torch.device("cpu"), torch.float32)]
    rounds: list[int] = []
    written: list[int] = []

    def save(run) -> None:  # what `kontext bench` does: the files, rewritten
        rounds.append(len(run.entries[0].samples))
        _, files = write_results(run, tmp_path, chart=False, folder=tmp_path / "one")
        assert files.jsonl.parent == tmp_path / "one"  # exactly the folder asked for, no <device>/<date>
        rows = [json.loads(x) for x in files.jsonl.read_text().splitlines()]
        stats = rows[1]["stages"]["total"]
        written.append(stats["n"] if stats else 0)

    run_bench(config, tiny, contestants, on_progress=save)
    assert rounds == [1, 2, 2, 2]  # round 1, round 2, the contestant done, the run done
    assert written == [1, 2, 2, 2]  # each round on disk as soon as it was timed


def test_cold_start_column_is_load_plus_first_edit_minus_median(bench_out):
    results = _results(bench_out[3])
    for r in results.values():
        if r["skipped"]:
            continue
        median = r["stages"]["total"]["median_s"]
        want = max(0.0, (r["load_s"] or 0.0) + r["first_edit_s"] - median)  # never negative (noise)
        assert r["cold_start_s"] == pytest.approx(want) and r["cold_start_s"] >= 0.0


def _goal_records(total_s: float, base_s: float, psnr: float, rel: float = 0.05) -> tuple[dict, list[dict]]:
    def rec(name: str, seconds: float, baseline: bool) -> dict:
        quality = {"psnr_db": psnr, "psnr_identical": False, "step_rel_l2_max": rel}
        return {
            "contestant": name,
            "bucket": "1024x1024",
            "baseline": baseline,
            "stages": {"total": {"median_s": seconds}},
            "ratio_total": base_s / seconds,
            "quality": None if baseline else quality,
        }

    run = {"device_type": "cuda", "buckets": ["1024x1024"], "steps": 28}
    return run, [
        rec(BASELINE, base_s, True),
        rec("torch-fp8", total_s, False),
        rec("torch-eager", base_s, False),
    ]


def test_goals_pass_and_fall_short_on_known_numbers():
    from engine.bench.goals import evaluate_goals, format_goals, goals_apply

    run, records = _goal_records(total_s=4.5, base_s=12.0, psnr=31.0)
    cold = {"peak_memory_gb": 28.0, "cold_start_s": 75.0, "contestant": "fp8+dynamic"}
    goals = {g.name: g for g in evaluate_goals(run, records, cold)}
    assert goals["end to end (must)"].passed is True and goals["end to end (aim)"].passed is False
    assert goals["end to end (must)"].by.startswith("torch-fp8")  # the fastest of ours, not the baseline
    assert goals["speed-up over diffusers eager"].measured == pytest.approx(12.0 / 4.5)
    assert goals["speed-up over diffusers eager"].passed is True
    assert goals["per-step rel L2 vs our bf16 eager"].passed is True  # 0.05 <= 0.15
    assert goals["PSNR vs our bf16 eager (not gated)"].passed is None  # printed, never a verdict
    assert goals["FP8 path peak GPU memory"].passed is True
    assert goals["9 keys from a fresh process (warm cache)"].passed is False
    text = format_goals(list(goals.values()), goals_apply(run))
    assert "SHORT" in text and "PASS" in text and "applies: no" not in text
    no_cold = {g.name: g for g in evaluate_goals(run, records)}
    assert no_cold["FP8 path peak GPU memory"].passed is None  # not measured: never a PASS
    _, drifting = _goal_records(total_s=4.5, base_s=12.0, psnr=45.0, rel=0.2)
    gate = {g.name: g for g in evaluate_goals(run, drifting)}["per-step rel L2 vs our bf16 eager"]
    assert gate.passed is False  # high PSNR does not save a per-step error above the bound
    cached = _goal_records(total_s=4.5, base_s=12.0, psnr=31.0)[1]
    cached.append({**cached[1], "contestant": "torch-fp8+qkv+cache=magcache-kontext",
                   "stages": {"total": {"median_s": 2.5}}, "ratio_total": 12.0 / 2.5})  # fmt: skip
    with_cache = {g.name: g for g in evaluate_goals(run, cached, cold)}
    assert with_cache["end to end (must)"].measured == 4.5  # a step cache never meets a no-skip goal
    assert with_cache["step-cached end to end (skips steps)"].measured == 2.5
    assert with_cache["step-cached end to end (skips steps)"].by.startswith("torch-fp8+qkv+cache=")
    assert with_cache["step-cached speed-up (skips steps)"].measured == pytest.approx(4.8)
    assert goals["step-cached end to end (skips steps)"].passed is None  # none ran: NOT MEASURED
    cpu_run = {"device_type": "cpu", "buckets": ["1024x1024"], "steps": 28}
    off = format_goals(evaluate_goals(cpu_run, records, cold), goals_apply(cpu_run))
    assert "applies: no" in off and "PASS" not in off and "SHORT" not in off and "4.5 s" in off


# ----------------------------------------------------------------------------- survival, memory, bf16


class FailingDenoiser:
    """A contestant that raises what a GPU run can raise mid-edit (not a KontextError)."""

    name = "failing"
    shape_keys = None

    def __call__(self, **inputs: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("CUDA graph capture failed (injected)")


class WeightyDenoiser:
    """The reference transformer plus 64 MiB of its own 'weights', touched so they are resident."""

    name = "weighty"
    shape_keys = None

    def __init__(self, inner: TorchDenoiser) -> None:
        self.inner = inner
        self.weights = torch.ones(16 * 2**20)  # 64 MiB of fp32

    def __call__(self, **inputs: torch.Tensor) -> torch.Tensor:
        return self.inner(**inputs)


def _unopenable() -> TorchDenoiser:
    raise AssertionError("torchao assert while quantizing (injected)")


@pytest.mark.slow  # a bench run per schedule
@pytest.mark.parametrize("schedule", ["sequential", "interleaved"])
def test_a_failing_contestant_is_recorded_and_the_next_one_runs(tiny, schedule):
    """Failing contestants between good ones: each failure is its result, both good ones are measured."""
    config = BenchConfig(
        model="tiny", steps=1, repeats=1, warmup=0, buckets=(BUCKET,), progress=False, schedule=schedule
    )
    contestants = [
        torch_contestant("torch-eager", tiny, torch.device("cpu"), torch.float32),
        Contestant("fails-mid-edit", "torch", "fp32", FailingDenoiser),
        Contestant("fails-to-open", "torch", "fp32", _unopenable),
        Contestant("scaled", "torch", "fp32", lambda: ScaledDenoiser(TorchDenoiser(tiny.transformer))),
    ]
    run = run_bench(config, tiny, contestants)
    entries = {e.contestant.name: e for e in run.entries}
    assert run.finished
    for good in ("torch-eager-fp32", "scaled"):
        assert entries[good].skipped is None and len(entries[good].samples) == 1
        assert entries[good].quality is not None
    assert entries["fails-mid-edit"].skipped == "failed: RuntimeError: CUDA graph capture failed (injected)"
    assert entries["fails-to-open"].skipped.startswith("failed to open: AssertionError: torchao assert")
    assert any("fails-to-open" in n for n in run.notes)


@pytest.mark.slow  # a bench run
def test_peak_memory_excludes_shared_weights_and_reports_own_weights_apart(tiny, tmp_path):
    config = BenchConfig(
        model="tiny", steps=1, repeats=1, warmup=0, buckets=(BUCKET,), progress=False, schedule="sequential"
    )
    contestants = [
        Contestant(BASELINE, "diffusers", "fp32"),
        Contestant("weighty", "torch", "fp32", lambda: WeightyDenoiser(TorchDenoiser(tiny.transformer))),
    ]
    run = run_bench(config, tiny, contestants)
    _, files = write_results(run, tmp_path, chart=False)
    results = _results([json.loads(x) for x in files.jsonl.read_text().splitlines()])
    weighty, base = results["weighty"], results[BASELINE]
    assert weighty["weights_bytes"] >= 60 * 2**20  # its own 64 MiB
    assert base["weights_bytes"] < 16 * 2**20  # the baseline runs the shared modules: nothing of its own
    assert weighty["peak_memory_bytes"] >= weighty["weights_bytes"]  # its peak holds its own weights...
    assert weighty["peak_memory_bytes"] < run.entries[0].memory_base  # ...and not the shared process


@pytest.mark.slow  # a bench run in bf16
def test_bf16_contestant_on_cpu_reports_its_error_against_fp32(tiny):
    """torch-eager-bf16 runs a bf16 copy inside the fp32 pipeline; its per-step error is bf16's, the
    shared fp32 transformer is left as it was (isolation)."""
    config = BenchConfig(
        model="tiny", steps=2, repeats=1, warmup=0, buckets=(BUCKET,), progress=False, schedule="sequential"
    )
    c = torch_contestant("torch-eager-bf16", tiny, torch.device("cpu"), torch.float32)
    assert (c.name, c.precision) == ("torch-eager-bf16", "bf16")
    run = run_bench(config, tiny, [c])
    (entry,) = run.entries
    assert entry.skipped is None and entry.quality is not None
    assert len(entry.quality.step_rel_l2) == 2
    # bf16 rounding on the random tiny model (measured ~0.1 at 128x128): not fp32's ~1e-7, not broken (~1)
    assert 1e-3 < entry.quality.rel_l2_max < 0.3
    assert run.isolation == {"torch-eager-bf16": "ok"}
    assert next(tiny.transformer.parameters()).dtype == torch.float32
    with pytest.raises(ConfigError, match="no dtype suffix"):
        torch_contestant("torch-fp8-bf16", tiny, torch.device("cpu"), torch.float32)


def test_cpu_bf16_hardware_from_cpuinfo_flags():
    from engine.bench.machine import cpu_flags
    from engine.bench.runner import default_contestants

    amx = "processor\t: 0\nflags\t\t: fpu sse2 avx512f amx_bf16 amx_tile\n"
    assert cpu_has_bf16(cpu_flags(amx)) and "amx_bf16" in cpu_flags(amx)
    assert cpu_has_bf16(cpu_flags("flags\t: avx2 avx512_bf16\n"))
    assert not cpu_has_bf16(cpu_flags("flags\t: fpu avx2 avx512f\n")) and cpu_flags("") == frozenset()
    cpu = torch.device("cpu")
    assert default_contestants(cpu, bf16_cpu=True)[-1] == "torch-eager-bf16"
    assert "torch-eager-bf16" not in default_contestants(cpu, bf16_cpu=False)


def test_dynamo_counters_count_graphs_and_breaks():
    from engine.bench.sequential import dynamo_counters, reset_dynamo_counters

    def f(x: torch.Tensor) -> torch.Tensor:
        y = x * 2
        torch._dynamo.graph_break()
        return y + 1

    torch._dynamo.reset()
    reset_dynamo_counters()
    torch.compile(f, backend="eager")(torch.ones(3))
    counts = dynamo_counters()
    assert counts["graphs"] == 2 and counts["graph_breaks"] == 1  # one break splits it in two
    reset_dynamo_counters()
    assert dynamo_counters()["graphs"] == 0
    torch._dynamo.reset()


def test_quality_replays_spread_steps():
    from engine.bench.quality import spread_steps

    assert spread_steps(28, 7) == (0, 4, 9, 14, 18, 22, 27)
    assert spread_steps(2, 7) == (0, 1) and spread_steps(5, None) == (0, 1, 2, 3, 4)
    assert spread_steps(28, 1) == (27,)
