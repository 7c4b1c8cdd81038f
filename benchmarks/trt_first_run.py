"""The first run on a machine with TensorRT: the audit's checks G1-G9, one table, one JSON file.

No one on the team has run the TensorRT path yet (docs/tensorrt-audit.md read it against TensorRT's sources).
Run this first on any NVIDIA GPU with TensorRT 10 and send us the JSON it writes:

    .venv/bin/pip install -e '.[trt]'
    .venv/bin/python benchmarks/trt_first_run.py            # tiny, ~minutes; --model small for G2/G3 at scale

Every check is independent: an exception is recorded as that check's "error" and the next one runs,
and the JSON is rewritten after each check. The static-vs-dynamic rows (plan bytes, memory after
deserialize, build seconds, per-key latency) decide `kontext build --profiles`' default.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.metadata as md
import json
import logging
import platform
import statistics
import sys
import threading
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from engine.files import atomic_write_bytes

log = logging.getLogger("benchmarks.trt_first_run")

DEFAULT_OUT = Path("benchmarks/results/trt_first_run.json")
STATUSES = ("pass", "fail", "error", "info")


@dataclass
class Check:
    """One row of the report: a check of docs/tensorrt-audit.md's list, its verdict, and what it measured."""

    id: str  # "G1".."G9"
    title: str
    status: str = "info"  # pass | fail | error | info (measured, no verdict)
    summary: str = ""  # one line for the table
    data: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


# ----------------------------------------------------------------------------- pure parts (unit-tested)


def run_check(check_id: str, title: str, fn: Callable[[], tuple[str, str, dict[str, Any]]]) -> Check:
    """Run one check; fn returns (status, summary, data). An exception is that check's "error"."""
    t0 = time.perf_counter()
    try:
        status, summary, data = fn()
        if status not in STATUSES:
            raise ValueError(f"unknown status {status!r}")
    except Exception as e:  # every failure is a finding to report, not a reason to stop
        status, summary = "error", f"{type(e).__name__}: {e}"[:200]
        data = {"traceback": traceback.format_exc(limit=8)}
    return Check(check_id, title, status, summary, data, round(time.perf_counter() - t0, 3))


def format_table(checks: Sequence[Check]) -> str:
    """The checks as a fixed-width table (one line each)."""
    rows = [("check", "status", "seconds", "summary")]
    rows += [(f"{c.id} {c.title}", c.status, f"{c.seconds:.1f}", c.summary) for c in checks]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]}" for r in rows]
    lines.insert(1, "-" * max(len(line) for line in lines))
    return "\n".join(lines)


def write_report(path: Path, checks: Sequence[Check], meta: Mapping[str, Any]) -> None:
    report = {"meta": dict(meta), "checks": [asdict(c) for c in checks]}
    atomic_write_bytes(path, (json.dumps(report, indent=2, sort_keys=True, default=str) + "\n").encode())


def weights_shared(one_profile_bytes: int, n_profile_bytes: int, tolerance: float = 0.10) -> bool:
    """G2's reading: the N-profile plan holds one weight copy when it is within `tolerance` of the
    1-profile plan (kernels per profile add far less than a second copy of the weights)."""
    return n_profile_bytes <= one_profile_bytes * (1 + tolerance)


def profiles_verdict(static: Mapping[str, float], dynamic: Mapping[str, float], margin: float = 0.03) -> str:
    """Which `--profiles` default the per-key latencies (ms, same keys) support: static only when it is
    faster than dynamic by more than `margin` on the median key; dynamic otherwise (one weight copy)."""
    keys = sorted(set(static) & set(dynamic))
    if not keys:
        return "undecided (no common keys)"
    ratio = statistics.median(static[k] / dynamic[k] for k in keys)
    if ratio < 1 - margin:
        return f"static (median key {1 - ratio:.1%} faster)"
    return f"dynamic (static is {ratio - 1:+.1%} on the median key)"


def median_ms(samples: Sequence[float]) -> float:
    return round(1000 * statistics.median(samples), 4)


# ----------------------------------------------------------------------------- GPU parts


@dataclass
class Run:
    """Shared state of one run: the model, the builds made so far, and the results folder."""

    model: str
    work: Path
    repeats: int
    builds: dict[str, Path] = field(default_factory=dict)  # profile mode -> build folder
    build_seconds: dict[str, float] = field(default_factory=dict)


def _mem_used() -> int:
    import torch

    free, total = torch.cuda.mem_get_info()
    return int(total - free)


def _build(run: Run, mode: str, precision: str = "fp32") -> Path:
    from engine.builder.builder import BuildOptions, build
    from engine.builder.tensorrt_build import TensorRTOptions
    from engine.calibration import CalibrationSpec

    out = run.work / f"{run.model}-{mode}"
    if mode not in run.builds:
        options = BuildOptions(
            calibration=CalibrationSpec(edits=4, steps=2),
            tensorrt=TensorRTOptions(profiles=mode),
            progress=False,
        )
        t0 = time.perf_counter()
        build(run.model, out_dir=out, precisions=(precision,), backend="tensorrt", options=options)
        run.build_seconds[mode] = round(time.perf_counter() - t0, 1)
        run.builds[mode] = out
    return run.builds[mode]


def _denoiser(build_dir: Path, workers: int = 1, budget: int | None = None) -> Any:
    from engine.backends.tensorrt import load_tensorrt
    from engine.config import LoadOptions
    from engine.manifest import read_manifest

    m = read_manifest(build_dir)
    options = LoadOptions(backend="tensorrt", workers=workers, plan_memory_budget=budget)
    return load_tensorrt(m, build_dir, weights_id=m.weights_id, options=options)


def _keys(build_dir: Path) -> list[Any]:
    from engine.manifest import read_manifest

    return sorted({k for a in read_manifest(build_dir).artifacts for k in a.shape_keys()})


def _inputs(build_dir: Path, key: Any, seed: int = 0) -> dict[str, Any]:
    from engine.backends.inputs import dummy_inputs
    from engine.manifest import read_manifest

    return dummy_inputs(read_manifest(build_dir).transformer_config(), key, device="cuda", seed=seed)


def g1_profiles(run: Run) -> tuple[str, str, dict[str, Any]]:
    """Build both modes; loading checks every profile's (min, opt, max) against the manifest (P4/R8)."""
    data: dict[str, Any] = {}
    for mode in ("dynamic", "static"):
        d = _denoiser(_build(run, mode))
        for key in _keys(run.builds[mode]):
            d(**_inputs(run.builds[mode], key))  # deserializes and checks the profiles on first use
        plan = next(iter(d._plans.values())).engine
        data[mode] = {
            "num_optimization_profiles": plan.num_optimization_profiles,
            "keys": len(_keys(run.builds[mode])),
        }
        d.close()
    return (
        "pass",
        f"profiles dynamic {data['dynamic']['num_optimization_profiles']}, static "
        f"{data['static']['num_optimization_profiles']}; shapes match the manifests",
        data,
    )


def g2_weight_sharing(run: Run) -> tuple[str, str, dict[str, Any]]:
    """Plan bytes and device memory after deserialize: 1 dynamic profile vs N static ones (extra memory
    target 0 and 1)."""
    import tensorrt as trt
    import torch

    from engine.builder.tensorrt_build import TensorRTOptions, build_plan
    from engine.manifest import read_manifest

    src = _build(run, "dynamic")
    m = read_manifest(src)
    cfg, keys = m.transformer_config(), _keys(src)
    data: dict[str, Any] = {}
    for label, mode, extra in (
        ("dynamic", "dynamic", 0.0),
        ("static-emt0", "static", 0.0),
        ("static-emt1", "static", 1.0),
    ):
        plan = run.work / f"g2-{label}.plan"
        t0 = time.perf_counter()
        build_plan(
            src / "onnx/transformer.onnx",
            plan,
            cfg=cfg,
            keys=keys,
            family=m.family,
            mode=None,
            tf32=False,
            options=TensorRTOptions(profiles=mode, extra_memory_target=extra),
            timing_cache=run.work / "g2-timing.cache",
        )
        seconds = time.perf_counter() - t0
        torch.cuda.synchronize()
        before = _mem_used()
        engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(plan.read_bytes())
        assert engine is not None
        data[label] = {
            "plan_bytes": plan.stat().st_size,
            "build_seconds": round(seconds, 1),
            "device_bytes_after_deserialize": _mem_used() - before,
            "device_memory_size_v2": engine.device_memory_size_v2,
            "per_profile": [
                engine.get_device_memory_size_for_profile_v2(p)
                for p in range(engine.num_optimization_profiles)
            ],
        }
        del engine
    shared = weights_shared(data["dynamic"]["plan_bytes"], data["static-emt0"]["plan_bytes"])
    data["weights_shared_at_emt0"] = shared
    summary = ", ".join(f"{k} {v['plan_bytes'] / 1e6:.1f} MB" for k, v in data.items() if isinstance(v, dict))
    return "info", f"{summary}; one weight copy at target 0: {shared}", data


def g3_keys_vs_torch(run: Run) -> tuple[str, str, dict[str, Any]]:
    """Every key, both modes, against the fp32 torch transformer; per-key latency (eager and graphs)."""
    import torch

    from engine.backends.torch import TorchDenoiser
    from engine.metrics import rel_l2
    from engine.model.load import load_components

    comps = load_components(run.model, dtype=torch.float32, device="cuda")
    torch.backends.cuda.matmul.allow_tf32 = False
    reference = TorchDenoiser(comps.transformer)
    data: dict[str, Any] = {}
    worst = 0.0
    for mode in ("dynamic", "static"):
        build_dir = _build(run, mode)
        d = _denoiser(build_dir)
        rows: dict[str, Any] = {}
        for key in _keys(build_dir):
            x = _inputs(build_dir, key, seed=1)
            with torch.inference_mode():
                err = rel_l2(d(**x), reference(**x))
                eager = _time(lambda: d(**x), run.repeats)  # noqa: B023
                d.capture_graphs(key)
                graphs = _time(lambda: d(**x), run.repeats)  # noqa: B023
            worst = max(worst, err)
            rows[str(key)] = {"rel_l2": err, "eager_ms": median_ms(eager), "graph_ms": median_ms(graphs)}
        data[mode] = rows
        d.close()
    verdict = profiles_verdict(
        {k: v["graph_ms"] for k, v in data["static"].items()},
        {k: v["graph_ms"] for k, v in data["dynamic"].items()},
    )
    data["verdict"] = verdict
    data["build_seconds"] = dict(run.build_seconds)
    return ("pass" if worst <= 1e-4 else "fail"), f"worst fp32 rel L2 {worst:.2e}; default: {verdict}", data


def _time(fn: Callable[[], Any], repeats: int) -> list[float]:
    import torch

    fn()
    out = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        out.append(time.perf_counter() - t0)
    return out


def g4_profile_switches(run: Run) -> tuple[str, str, dict[str, Any]]:
    """Keys A, B, A, B on one worker (contexts sharing one block) equal fresh denoisers' outputs, bit
    for bit."""
    import torch

    data: dict[str, Any] = {}
    ok = True
    for mode in ("static", "dynamic"):
        build_dir = _build(run, mode)
        a, b = _keys(build_dir)[0], _keys(build_dir)[-1]
        xa, xb = _inputs(build_dir, a, seed=2), _inputs(build_dir, b, seed=3)
        fresh = {}
        for key, x in ((a, xa), (b, xb)):
            d = _denoiser(build_dir)
            fresh[key] = d(**x)
            d.close()
        d = _denoiser(build_dir)
        same = [torch.equal(d(**x), fresh[k]) for k, x in ((a, xa), (b, xb), (a, xa), (b, xb))]
        d.close()
        data[mode] = same
        ok = ok and all(same)
    return ("pass" if ok else "fail"), f"A/B/A/B bit-exact: {data}", data


def g5_graphs(run: Run) -> tuple[str, str, dict[str, Any]]:
    """Graph replay equals eager bit for bit; captures on one denoiser while another serves from a thread."""
    import torch

    build_dir = _build(run, "dynamic")
    keys = _keys(build_dir)
    serving, capturing = _denoiser(build_dir), _denoiser(build_dir, workers=2)
    inputs = {k: _inputs(build_dir, k, seed=4) for k in keys}
    eager = {k: capturing(**inputs[k]) for k in keys}
    errors: list[str] = []
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                for k in keys:
                    serving(**inputs[k])
            except Exception as e:
                errors.append(repr(e))
                return

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        for k in keys:
            capturing.capture_graphs(k)
    finally:
        stop.set()
        thread.join()
    exact = {str(k): torch.equal(capturing(**inputs[k]), eager[k]) for k in keys}
    serving.close()
    capturing.close()
    ok = all(exact.values()) and not errors
    return (
        ("pass" if ok else "fail"),
        f"replay == eager on {sum(exact.values())}/{len(keys)} keys; "
        f"{len(errors)} errors in the serving thread",
        {"exact": exact, "errors": errors},
    )


def g6_tf32(run: Run) -> tuple[str, str, dict[str, Any]]:
    """The fp32 plan with and without TF32 against torch fp32: sets the fp32 bound (RECIPES: 1e-4)."""
    import torch

    from engine.backends.tensorrt import TrtDenoiser
    from engine.backends.torch import TorchDenoiser
    from engine.builder.tensorrt_build import TensorRTOptions, build_plan
    from engine.manifest import read_manifest
    from engine.metrics import rel_l2
    from engine.model.load import load_components

    src = _build(run, "dynamic")
    m = read_manifest(src)
    art = m.artifacts[0]
    comps = load_components(run.model, dtype=torch.float32, device="cuda")
    torch.backends.cuda.matmul.allow_tf32 = False
    reference = TorchDenoiser(comps.transformer)
    data: dict[str, Any] = {}
    for tf32 in (False, True):
        plan = run.work / f"g6-tf32-{tf32}.plan"
        build_plan(
            src / "onnx/transformer.onnx",
            plan,
            cfg=m.transformer_config(),
            keys=_keys(src),
            family=m.family,
            mode=None,
            tf32=tf32,
            options=TensorRTOptions(),
            timing_cache=run.work / "g6.cache",
        )
        d = TrtDenoiser([(art, plan)], transformer=m.transformer_config())
        with torch.inference_mode():
            errs = [rel_l2(d(**x), reference(**x)) for x in (_inputs(src, k, seed=5) for k in _keys(src))]
        d.close()
        data[f"tf32={tf32}"] = max(errs)
    ok = data["tf32=False"] <= 1e-4
    return ("pass" if ok else "fail"), ", ".join(f"{k}: worst rel L2 {v:.2e}" for k, v in data.items()), data


def g7_timing_cache(run: Run) -> tuple[str, str, dict[str, Any]]:
    """A second build with the cache is faster and the cache is accepted; a corrupt cache is discarded."""
    import tensorrt as trt

    from engine.builder.tensorrt_build import TensorRTOptions, build_plan, set_timing_cache
    from engine.manifest import read_manifest

    src = _build(run, "dynamic")
    m = read_manifest(src)
    cache = run.work / "g7.cache"
    cache.unlink(missing_ok=True)
    seconds = []
    for i in range(2):
        t0 = time.perf_counter()
        build_plan(
            src / "onnx/transformer.onnx",
            run.work / f"g7-{i}.plan",
            cfg=m.transformer_config(),
            keys=_keys(src),
            family=m.family,
            mode=None,
            tf32=False,
            options=TensorRTOptions(),
            timing_cache=cache,
        )
        seconds.append(round(time.perf_counter() - t0, 1))
    config = trt.Builder(trt.Logger(trt.Logger.WARNING)).create_builder_config()
    accepted = set_timing_cache(config, cache)
    cache.write_bytes(b"\x00corrupt" * 64)
    corrupt_used = set_timing_cache(config, cache)
    data = {
        "build_seconds": seconds,
        "valid_cache_used": accepted,
        "corrupt_cache_used": corrupt_used,
        "corrupt_cache_deleted": not cache.exists(),
    }
    ok = accepted and not corrupt_used
    return (
        ("pass" if ok else "fail"),
        f"builds {seconds} s; cache reused {accepted}; corrupt refused {not corrupt_used}",
        data,
    )


def g8_eviction(run: Run) -> tuple[str, str, dict[str, Any]]:
    """Two families under a budget that holds one plan: memory after each switch stays one plan's."""
    from engine.builder.builder import BuildOptions, build
    from engine.calibration import CalibrationSpec
    from engine.manifest import read_manifest, write_manifest

    first = _build(run, "dynamic")
    other = run.work / f"{run.model}-other-family"
    m1 = read_manifest(first)
    family = "small" if m1.family != "small" else "tiny"
    build(
        run.model,
        out_dir=other,
        precisions=(m1.artifacts[0].precision,),
        family=family,
        backend="tensorrt",
        options=BuildOptions(calibration=CalibrationSpec(edits=4, steps=2), progress=False),
    )
    m2 = read_manifest(other)
    merged = run.work / "g8-both"
    (merged / "tensorrt").mkdir(parents=True, exist_ok=True)
    for m, d in ((m1, first), (m2, other)):
        for a in m.artifacts:
            target = merged / a.path
            if not target.exists():
                target.symlink_to((d / a.path).resolve())
    write_manifest(merged, dataclasses.replace(m1, artifacts=m1.artifacts + m2.artifacts))
    budget = max(a.bytes for a in m1.artifacts + m2.artifacts)
    d = _denoiser(merged, workers=2, budget=budget)
    used = []
    for key in [_keys(first)[0], _keys(other)[0]] * 2:
        d(**_inputs(merged, key))
        used.append(_mem_used())
    d.close()
    growth = used[-1] - used[1]
    return (
        "info",
        f"device memory after each switch (MB): {[round(u / 1e6) for u in used]}; "
        f"growth {growth / 1e6:.0f} MB",
        {"used_bytes": used, "budget": budget},
    )


def g9_versions(run: Run) -> tuple[str, str, dict[str, Any]]:
    import tensorrt as trt
    import torch

    wheels = {}
    for dist in (
        "tensorrt",
        "tensorrt-cu12",
        "tensorrt-cu13",
        "tensorrt-lean",
        "torch",
        "onnx",
        "nvidia-modelopt",
    ):
        with contextlib.suppress(md.PackageNotFoundError):
            wheels[dist] = md.version(dist)
    data = {
        "tensorrt": trt.__version__,
        "torch_cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name(0),
        "capability": ".".join(map(str, torch.cuda.get_device_capability(0))),
        "python": platform.python_version(),
        "wheels": wheels,
    }
    return "info", f"TensorRT {data['tensorrt']}, torch CUDA {data['torch_cuda']}, {data['gpu']}", data


CHECKS: tuple[tuple[str, str, Callable[[Run], tuple[str, str, dict[str, Any]]]], ...] = (
    ("G9", "versions", g9_versions),
    ("G1", "profile shapes", g1_profiles),
    ("G2", "weights across profiles", g2_weight_sharing),
    ("G3", "keys vs torch, latency", g3_keys_vs_torch),
    ("G4", "profile switches", g4_profile_switches),
    ("G5", "CUDA graphs", g5_graphs),
    ("G6", "fp32 and TF32", g6_tf32),
    ("G7", "timing cache", g7_timing_cache),
    ("G8", "eviction", g8_eviction),
)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--model", default="tiny", help="tiny (minutes) or small")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--work", type=Path, default=Path("build/trt_first_run"), help="where the plans are built")
    p.add_argument("--repeats", type=int, default=20, help="timed calls per key and mode")
    p.add_argument("--only", default=None, help="comma list of check ids, e.g. G1,G5")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from engine.backends.tensorrt_plans import require_tensorrt
    from engine.errors import KontextError

    try:
        require_tensorrt()  # a clear message on a machine without CUDA or TensorRT
    except KontextError as e:  # one line, as the CLI answers, not a traceback
        print(f"trt_first_run: {e}", file=sys.stderr)
        return 2
    run = Run(args.model, args.work, args.repeats)
    run.work.mkdir(parents=True, exist_ok=True)
    only = set(args.only.split(",")) if args.only else None
    meta = {
        "model": args.model,
        "argv": sys.argv,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    checks: list[Check] = []
    for check_id, title, fn in CHECKS:
        if only is not None and check_id not in only:
            continue
        log.info("%s %s ...", check_id, title)
        checks.append(run_check(check_id, title, lambda: fn(run)))  # noqa: B023
        write_report(args.out, checks, meta)
    print(format_table(checks))
    print(f"\nwrote {args.out}: please send it to the Kontext engine team")
    return 0 if all(c.status in ("pass", "info") for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
