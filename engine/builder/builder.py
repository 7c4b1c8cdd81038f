"""`kontext build`: export -> calibrate -> golden -> quantize -> compile -> verify, recorded in a manifest.

`build()` is the library entry point (the CLI, the tests and the benchmarks call it): a sequence of
named stage functions over one BuildContext. Each stage is skipped when its input hash and files
match the manifest; the manifest is rewritten after every stage that ran (complete=False until the
end), so an interrupted build resumes. A request identical to the last complete build returns its
manifest without loading the model (the no-op fast path). What decides that, the request hash, and
the manifest draft the stages fill in are request.py; the options are options.py.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..backends import DENOISER_INPUTS
from ..backends.tensorrt_plans import family_profiles, plan_name, require_tensorrt
from ..buckets import ShapeKey, family_scale, family_shape_keys
from ..config import PRESETS
from ..errors import BuildError
from ..manifest import Artifact, Manifest, Stage, write_manifest
from ..model.components import Components
from ..model.layout import model_name
from ..model.load import load_components
from ..model.lora import fuse_loras
from . import calibrate, export, ort_compile, quantize, verify
from .backend import choose_backend
from .export import EXPORT_VERSION
from .options import DEFAULT_REFS, BuildOptions
from .request import (
    Target,
    draft_manifest,
    previous_artifact,
    read_previous,
    refuse_another_recipe,
    request_hash,
    tool_versions,
    up_to_date,
)
from .stages import StageResult, T, build_lock, rename_stage, run_stage
from .tensorrt_build import allows_tf32, build_plan

__all__ = ["BuildOptions", "build", "build_keys", "default_out_dir"]

log = logging.getLogger(__name__)

GOLDEN_STEPS = 3
ONNX_REL = "onnx/transformer.onnx"
CALIBRATION_REL = "calibration/samples.npz"
GOLDEN_REL = "verify/golden.npz"
LEGACY_GOLDEN = ("reference", {"verify/reference.npz": GOLDEN_REL})  # its stage and file, renamed
TIMING_CACHE_REL = "tensorrt/timing.cache"


def build_keys(family: str, text_tokens: int, refs: Sequence[int], batches: Sequence[int]) -> list[ShapeKey]:
    """The shape keys a build serves, sorted: the union over refs x batches of family_shape_keys."""
    keys: set[ShapeKey] = set()
    for r in refs:
        for b in batches:
            keys |= family_shape_keys(family, text_tokens, batch=b, refs=r)
    return sorted(keys)


@dataclass
class BuildContext:
    """One build: what it builds from, where, and the manifest being assembled (written after every
    stage that ran)."""

    root: Path
    components: Components
    options: BuildOptions
    family: str
    keys: list[ShapeKey]
    force: bool
    facts: Manifest  # request.draft_manifest: what the build is made from and for
    stages: dict[str, Stage]
    previous: Manifest | None
    bar: Any  # tqdm
    onnx_sha256: str = ""  # the export stage's graph, once it has run or been reused
    artifacts: list[Artifact] = field(default_factory=list)
    _samples: list[calibrate.Sample] | None = None
    _golden: dict[str, list[calibrate.Sample]] | None = None

    @property
    def backend(self) -> str:
        return self.facts.backend

    def manifest(self, *, complete: bool, seconds: float = 0.0, pending: Sequence[Artifact] = ()) -> Manifest:
        """pending: compiled artifacts whose verification is recorded but not passed (never served)."""
        return dataclasses.replace(
            self.facts,
            onnx_sha256=self.onnx_sha256,
            artifacts=tuple(self.artifacts),
            stages=dict(self.stages),
            pending=tuple(pending),
            complete=complete,
            build_seconds=round(seconds, 3),
        )

    def samples(self) -> list[calibrate.Sample]:
        if self._samples is None:
            self._samples = calibrate.load_samples(self.root / CALIBRATION_REL)[0]
        return self._samples

    def golden(self) -> dict[str, list[calibrate.Sample]]:
        if self._golden is None:
            self._golden = calibrate.load_golden(self.root / GOLDEN_REL)
        return self._golden


def default_out_dir(model: str) -> Path:
    """build/<model>: build/tiny, or build/<folder name> for a local checkpoint (a cache snapshot's
    repository name; <folder name>-bfl for BFL's single file)."""
    name = str(model)
    return Path("build") / (name if name in PRESETS else model_name(Path(name)))


def default_precisions(backend: str) -> tuple[str, ...]:
    return ("fp8",) if backend == "tensorrt" else ("fp32", "int8")


def build(
    model: str,
    *,
    out_dir: Path | None = None,
    precisions: Sequence[str] | None = None,
    family: str | None = None,
    backend: str = "auto",
    force: bool = False,
    options: BuildOptions | None = None,
    components: Components | None = None,
) -> Manifest:
    """Build (or bring up to date) the engine of `model` into `out_dir`; return the final manifest.

    precisions: recipe names (default fp32 + int8 for ONNX Runtime, fp8 for TensorRT);
    family: bucket family (default: the preset's); backend: auto | tensorrt | onnxruntime.
    components: already loaded components (their weights_id keys the stages); options.loras are fused
    into them in place (fuse_loras), so pass a copy to keep the base weights.
    """
    t_start = time.perf_counter()
    opts = (options or BuildOptions()).resolved()
    chosen, why = choose_backend(backend)
    log.info("backend %s (%s)", chosen, why)
    precisions = tuple(dict.fromkeys(precisions or default_precisions(chosen)))
    recipes = _recipes(precisions, chosen, opts)
    root = Path(out_dir) if out_dir is not None else default_out_dir(model)
    if out_dir is None:
        refuse_another_recipe(root, opts)
    target, versions = Target.of(chosen), tool_versions()
    request = request_hash(model, components, precisions, family, target, versions, recipes, opts)
    if not force and (done := up_to_date(root, request)) is not None:
        log.info("build %s: up to date (nothing to do)", root)
        return done
    dtype = torch.bfloat16 if opts.dtype == "bf16" else torch.float32
    comps = components or load_components(model, device=opts.device or "cpu", dtype=dtype)
    if opts.loras:
        comps = fuse_loras(comps, opts.loras)  # a new weights_id: export .. verify run again
    fam = family or comps.preset.bucket_family
    family_scale(fam)  # validates the name
    with build_lock(root):
        previous = read_previous(root)
        stages = dict(previous.stages) if previous else {}
        rename_stage(root, stages, LEGACY_GOLDEN[0], "golden", LEGACY_GOLDEN[1])
        ctx = BuildContext(
            root=root,
            components=comps,
            options=opts,
            family=fam,
            keys=build_keys(fam, comps.preset.max_sequence_length, opts.refs, opts.batches),
            force=force,
            facts=draft_manifest(comps, target, fam, recipes, versions, request, opts),
            stages=stages,
            previous=previous,
            bar=tqdm(
                total=3 + sum(2 + r.quantized for r in recipes),
                desc=f"build {root}",
                unit="stage",
                disable=not opts.progress,
            ),
        )
        if chosen == "tensorrt":
            family_profiles(ctx.keys, opts.tensorrt.profiles)  # too many static profiles: refuse now
        ctx.onnx_sha256 = _export(ctx).output_sha256[ONNX_REL]
        _calibrate(ctx)
        _golden(ctx)
        for recipe in recipes:
            src_rel, src_sha = _quantize(ctx, recipe)
            artifact = _compile(ctx, recipe, src_rel, src_sha)
            ctx.artifacts.append(_verify(ctx, recipe, artifact))
        ctx.bar.close()
        final = ctx.manifest(complete=True, seconds=time.perf_counter() - t_start)
        write_manifest(root, final)
    log.info("build %s: %d artifact(s) verified in %.1fs", root, len(final.artifacts), final.build_seconds)
    return final


# ----------------------------------------------------------------------------- stages


def _stage(
    ctx: BuildContext,
    name: str,
    inputs: Mapping[str, Any],
    work: Callable[[], tuple[Sequence[Path], T]],
    *,
    still_valid: bool = True,
) -> StageResult[T]:
    """Run one stage (or skip it when up to date), record it, and write the manifest if it ran."""
    res = run_stage(name, ctx.root, inputs, ctx.stages.get(name), ctx.force, work, still_valid)
    ctx.stages[name] = res.stage
    if res.ran:
        write_manifest(ctx.root, ctx.manifest(complete=False))
    ctx.bar.update()
    return res


def _files(write: Callable[[], Sequence[Path]]) -> Callable[[], tuple[Sequence[Path], None]]:
    """A stage whose only result is its files."""
    return lambda: (write(), None)


def _export(ctx: BuildContext) -> Stage:
    inputs = {
        "weights": ctx.components.weights_id,
        "transformer": ctx.facts.transformer,
        "opset": ctx.options.opset,
        "torch": ctx.facts.tool_versions["torch"],
        "v": EXPORT_VERSION,
    }
    return _stage(ctx, "export", inputs, _files(partial(_write_export, ctx))).stage


def _write_export(ctx: BuildContext) -> list[Path]:
    with _float32(ctx.components.transformer):
        result = export.export_transformer(
            ctx.components.transformer,
            ctx.root / ONNX_REL,
            cfg=ctx.components.preset.transformer,
            opset=ctx.options.opset,
            text_tokens=ctx.keys[0].text_tokens,
        )
    return list(result.files)


@contextmanager
def _float32(*modules: Any) -> Iterator[None]:
    """The modules in float32 for the block, cast in place on their device and back after (bf16 -> fp32
    -> bf16 is exact). The graph is exported in fp32, and the golden trajectory runs the sampling
    loop in fp32 (calibrate.py's pipeline): the transformer and the VAE take its fp32 tensors, while the
    text encoders take token ids and stay in the build's dtype (their outputs are cast). Calibration
    runs in the build's dtype."""
    dtypes = [next(m.parameters()).dtype for m in modules]
    for m in modules:
        torch.nn.Module.to(m, dtype=torch.float32)
    try:
        yield
    finally:
        for m, dtype in zip(modules, dtypes, strict=True):
            torch.nn.Module.to(m, dtype=dtype)


def _calibrate(ctx: BuildContext) -> Stage:
    inputs = {"weights": ctx.components.weights_id, "calibration": ctx.facts.calibration_sha256}
    dtype = next(ctx.components.transformer.parameters()).dtype
    if dtype != torch.float32:  # other samples; fp32 is the default, left out of the hash
        inputs["dtype"] = str(dtype).removeprefix("torch.")
    return _stage(ctx, "calibrate", inputs, _files(partial(_write_samples, ctx))).stage


def _write_samples(ctx: BuildContext) -> list[Path]:
    c = ctx.components
    # calibration runs in the weights' dtype (bf16 in a GPU build); export and the golden trajectory in fp32
    samples = calibrate.capture_calibration(
        c, ctx.options.calibration, ctx.family, ctx.options.device or "cpu", progress=ctx.options.progress
    )
    calibrate.save_samples(ctx.root / CALIBRATION_REL, samples)
    return [ctx.root / CALIBRATION_REL]


def _golden(ctx: BuildContext) -> Stage:
    inputs = {
        "weights": ctx.components.weights_id,
        "family": ctx.family,
        "steps": GOLDEN_STEPS,
        "keys": [str(k) for k in ctx.keys],
    }
    if ctx.options.refs != DEFAULT_REFS:  # which reference count builds each key's edit (default: left out)
        inputs["refs"] = list(ctx.options.refs)
    return _stage(ctx, "golden", inputs, _files(partial(_write_golden, ctx))).stage


def _write_golden(ctx: BuildContext) -> list[Path]:
    c, device = ctx.components, ctx.options.device or "cpu"
    with _float32(c.transformer, c.vae):
        golden = calibrate.capture_golden(
            c,
            ctx.family,
            GOLDEN_STEPS,
            device,
            keys=ctx.keys,
            refs=ctx.options.refs,
            progress=ctx.options.progress,
        )
    calibrate.save_golden(ctx.root / GOLDEN_REL, golden)
    return [ctx.root / GOLDEN_REL]


def _quantize(ctx: BuildContext, recipe: quantize.Recipe) -> tuple[str, str]:
    """The graph the recipe compiles from, (path relative to the build, sha256): the exported graph,
    or its Q/DQ-quantized copy."""
    if not recipe.quantized:
        return ONNX_REL, ctx.onnx_sha256
    rel = f"onnx/transformer_{recipe.name}.onnx"
    inputs = {
        "onnx": ctx.onnx_sha256,
        "recipe": recipe.to_dict(),
        "samples": ctx.stages["calibrate"].output_sha256[CALIBRATION_REL],
        "modelopt": ctx.facts.tool_versions["nvidia-modelopt"],
    }
    work = _files(partial(_write_quantized, ctx, recipe, rel))
    return rel, _stage(ctx, f"quantize:{recipe.name}", inputs, work).stage.output_sha256[rel]


def _write_quantized(ctx: BuildContext, recipe: quantize.Recipe, rel: str) -> list[Path]:
    eps = ["cuda:0", "cpu"] if ctx.backend == "tensorrt" else ["cpu"]
    quantize.quantize_onnx(
        ctx.root / ONNX_REL, ctx.root / rel, recipe, ctx.samples(), DENOISER_INPUTS, calibration_eps=eps
    )
    return _files_of(ctx.root / rel)


def _compile(ctx: BuildContext, recipe: quantize.Recipe, src_rel: str, src_sha: str) -> Artifact:
    """The compile stage of one recipe; returns its (unverified) artifact."""
    build_options: dict[str, Any] = {}
    if recipe.quantized:
        build_options["qdq"] = quantize.qdq_counts(ctx.root / src_rel)
    inputs: dict[str, Any] = {
        "source": src_sha,
        "backend": ctx.backend,
        "version": ctx.facts.backend_version,
    }
    if ctx.backend == "onnxruntime":
        rel = f"onnxruntime/transformer_{recipe.name}.onnx"
        runtime = ort_compile.ort_runtime_options(recipe)
        mode = "dynamic"
        inputs["runtime"] = runtime
        work = _files(partial(_write_ort, ctx, recipe, src_rel, rel))
    else:
        require_tensorrt()
        rel = f"tensorrt/{plan_name(recipe.name, ctx.family, ctx.facts.backend_version, str(ctx.facts.gpu))}"
        runtime = {}
        mode = ctx.options.tensorrt.profiles
        build_options["tensorrt"] = dataclasses.asdict(ctx.options.tensorrt)
        build_options["tf32"] = allows_tf32(recipe.mode, recipe.high_precision_dtype)
        inputs.update(
            gpu=ctx.facts.gpu,
            capability=ctx.facts.compute_capability,
            options=build_options["tensorrt"],
            tf32=build_options["tf32"],
        )
        work = _files(partial(_write_plan, ctx, recipe, src_rel, rel))
    profiles = family_profiles(ctx.keys, mode)
    inputs["profiles"] = profiles
    stage = _stage(ctx, f"compile:{recipe.name}", inputs, work).stage
    return Artifact(
        path=rel,
        sha256=stage.output_sha256[rel],
        bytes=(ctx.root / rel).stat().st_size,
        backend=ctx.backend,
        precision=recipe.name,
        family=ctx.family,
        profiles=profiles,
        profile_mode=mode,
        runtime_options=runtime,
        source_sha256=src_sha,
        build_options=build_options,
    )


def _write_ort(ctx: BuildContext, recipe: quantize.Recipe, src_rel: str, rel: str) -> list[Path]:
    ort_compile.compile_onnxruntime(ctx.root / src_rel, ctx.root / rel, recipe)
    return _files_of(ctx.root / rel)


def _write_plan(ctx: BuildContext, recipe: quantize.Recipe, src_rel: str, rel: str) -> list[Path]:
    build_plan(
        ctx.root / src_rel,
        ctx.root / rel,
        cfg=ctx.components.preset.transformer,
        keys=ctx.keys,
        family=ctx.family,
        mode=recipe.mode,
        tf32=allows_tf32(recipe.mode, recipe.high_precision_dtype),
        options=ctx.options.tensorrt,
        timing_cache=ctx.root / TIMING_CACHE_REL,
    )
    return [ctx.root / rel]


def _verify(ctx: BuildContext, recipe: quantize.Recipe, artifact: Artifact) -> Artifact:
    """The artifact with its verification: reused from the last build of the same file, or measured
    through the runtime's Denoiser (the errors are recorded even when they exceed the bound)."""
    old = previous_artifact(ctx.previous, artifact)
    inputs = {
        "artifact": artifact.sha256,
        "golden": ctx.stages["golden"].output_sha256[GOLDEN_REL],
        "bound": recipe.bound_rel_l2,
        "runtime": artifact.runtime_options,
    }
    res = _stage(
        ctx,
        f"verify:{recipe.name}",
        inputs,
        partial(_measure, ctx, recipe, artifact),
        still_valid=old is not None,
    )
    verified = res.value if res.ran else old
    if verified is None:
        raise BuildError(f"no verification results for {recipe.name}; rebuild with --force")
    return verified


def _measure(ctx: BuildContext, recipe: quantize.Recipe, artifact: Artifact) -> tuple[list[Path], Artifact]:
    """The artifact with its measured errors; the manifest keeps them (as pending) before a failure is
    raised, so a failed build still says by how much."""
    denoiser = verify.artifact_denoiser(ctx.root, artifact, ctx.components.preset.transformer)
    try:
        results = verify.verify(
            denoiser,
            ctx.golden(),
            sorted(artifact.profiles),
            recipe.bound_rel_l2,
            recipe.name,
            progress=ctx.options.progress,
        )
    finally:
        denoiser.close()
    checked = dataclasses.replace(artifact, verification=results)
    write_manifest(ctx.root, ctx.manifest(complete=False, pending=(checked,)))  # kept even on failure
    verify.check(results, f"{recipe.name} ({artifact.path})")
    return [], checked


# ----------------------------------------------------------------------------- helpers


def _recipes(precisions: Sequence[str], backend: str, opts: BuildOptions) -> list[quantize.Recipe]:
    """The recipes of `precisions` for `backend`, refusing those it cannot build."""
    known = {**quantize.RECIPES, **(opts.recipes or {})}
    selected = []
    for name in precisions:
        recipe = known[name] if name in known else quantize.get_recipe(name)  # raises with the known names
        if opts.fp8_attention and recipe.mode == "fp8":
            recipe = dataclasses.replace(recipe, attention=True)
        selected.append(quantize.for_backend(recipe, backend))
    if backend == "onnxruntime" and (tt := [r.name for r in selected if r.tensorrt_only]):
        raise BuildError(
            f"{', '.join(tt)} has no ONNX Runtime artifact (no useful CPU kernels); "
            "build fp32 or int8 here, or use --backend tensorrt on a GPU"
        )
    if any(r.mode is None and r.high_precision_dtype != "fp32" for r in selected):
        raise BuildError(
            "bf16 needs the graph converted to bf16 (modelopt.onnx.autocast), which this build "
            "step does not do yet; build fp8 or int8 (or fp32) instead"
        )
    return selected


def _files_of(path: Path) -> list[Path]:
    """A graph and its external data files."""
    return sorted(path.parent.glob(path.name + "*"))
