"""`kontext build`: export -> calibrate -> reference -> quantize -> compile -> verify, recorded in a manifest.

`build()` is the library entry point (the CLI, the runtime's tests and the benchmarks call it).
Each stage is skipped when its input hash and files match the manifest; the manifest is rewritten
after every stage that ran (complete=False until the end), so an interrupted build resumes.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata as md
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ..backends import DENOISER_INPUTS
from ..buckets import family_scale, family_shape_keys
from ..config import PRESETS
from ..errors import BuildError, ManifestError
from ..weights import Components, load_components, source_signature
from . import calibrate, compile, export, quantize, verify
from .manifest import MANIFEST_NAME, Artifact, Manifest, Stage, read_manifest, write_manifest
from .stages import build_lock, input_hash, outputs_intact, run_stage
from .tensorrt_build import TensorRTOptions, build_plan, cuda_device, family_profiles, plan_name

log = logging.getLogger(__name__)

EXPORT_VERSION = 1  # bump when export.py changes what it writes
REFERENCE_STEPS = 3


@dataclass(frozen=True)
class BuildOptions:
    """Everything beyond (model, out_dir, precisions, family, backend, force)."""

    opset: int = export.DEFAULT_OPSET
    calibration: calibrate.CalibrationSpec = field(default_factory=calibrate.CalibrationSpec)
    tensorrt: TensorRTOptions = field(default_factory=TensorRTOptions)
    fp8_attention: bool = False
    recipes: Mapping[str, quantize.Recipe] | None = None  # overrides of quantize.RECIPES by name
    device: str = "cpu"  # where calibration and the reference run (torch)
    progress: bool = True


def default_out_dir(model: str) -> Path:
    """build/<model>: build/tiny, or build/<folder name> for a local checkpoint."""
    return Path("build") / Path(str(model)).name


def default_precisions(backend: str) -> tuple[str, ...]:
    return ("fp8",) if backend == "tensorrt" else ("fp32", "int8")


def _version(dist: str) -> str:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return "missing"


class _State:
    """The manifest being assembled; written after every stage that ran."""

    def __init__(self, root: Path, base: dict[str, Any], previous: Manifest | None) -> None:
        self.root = root
        self.base = base
        self.previous = previous
        self.stages: dict[str, Stage] = dict(previous.stages) if previous else {}
        self.artifacts: list[Artifact] = []
        self.pending: list[Artifact] = []

    def stage(self, name: str) -> Stage | None:
        return self.stages.get(name)

    def manifest(self, complete: bool, seconds: float = 0.0) -> Manifest:
        return Manifest(
            **self.base,
            artifacts=tuple(self.artifacts),
            stages=dict(self.stages),
            pending=tuple(self.pending),
            complete=complete,
            build_seconds=round(seconds, 3),
        )

    def record(self, name: str, stage: Stage, ran: bool) -> None:
        self.stages[name] = stage
        if ran:
            write_manifest(self.root, self.manifest(complete=False))


def _read_previous(root: Path) -> Manifest | None:
    if not (root / MANIFEST_NAME).is_file():
        return None
    try:
        return read_manifest(root)
    except ManifestError as e:
        log.warning("ignoring the old manifest (%s); every stage runs again", e)
        return None


def build(
    model: str,
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
    components: already loaded components (their weights_id keys the stages).
    """
    t_start = time.perf_counter()
    opts = options or BuildOptions()
    chosen, why = compile.choose_backend(backend)
    log.info("backend %s (%s)", chosen, why)
    precisions = tuple(dict.fromkeys(precisions or default_precisions(chosen)))
    recipes = {**quantize.RECIPES, **(opts.recipes or {})}
    selected = [quantize.for_backend(_recipe(recipes, p, opts.fp8_attention), chosen) for p in precisions]
    if chosen == "onnxruntime" and (tt := [r.name for r in selected if r.tensorrt_only]):
        raise BuildError(
            f"{', '.join(tt)} has no ONNX Runtime artifact (no useful CPU kernels); "
            "build fp32 or int8 here, or use --backend tensorrt on a GPU"
        )
    if any(r.mode is None and r.high_precision_dtype != "fp32" for r in selected):
        raise BuildError("bf16 needs the graph converted to bf16 (modelopt.onnx.autocast), which this build "
                         "step does not do yet; build fp8 or int8 (or fp32) instead")  # fmt: skip
    root = Path(out_dir) if out_dir is not None else default_out_dir(model)
    versions = {d: _version(d) for d in ("torch", "diffusers", "onnx", "onnxruntime", "nvidia-modelopt")}
    request = _request_hash(model, components, precisions, family, chosen, versions, selected, opts)
    if not force and (done := _up_to_date(root, request)) is not None:
        log.info("build %s: up to date (nothing to do)", root)
        return done
    comps = components or load_components(model, device=opts.device)
    fam = family or comps.preset.bucket_family
    family_scale(fam)  # validates the name
    keys = sorted(family_shape_keys(fam, comps.preset.max_sequence_length))
    calib_sha = calibrate.calibration_hash(opts.calibration, fam)
    cfg = comps.preset.transformer
    with build_lock(root):
        previous = _read_previous(root)
        base = {
            "model": comps.source,
            "weights_id": comps.weights_id,
            "transformer": dataclasses.asdict(cfg),
            "backend": chosen,
            "backend_version": compile.backend_version(chosen),
            "opset": opts.opset,
            "onnx_sha256": "",
            "calibration_sha256": calib_sha,
            "recipes": {r.name: r.to_dict() for r in selected},
            "tool_versions": versions,
            "family": fam,
            "calibration": dataclasses.asdict(opts.calibration),
            "request": request,
        }
        if chosen == "tensorrt":
            device = cuda_device()
            if device is not None:
                base["gpu"], base["compute_capability"] = device[0], f"{device[1][0]}.{device[1][1]}"
        st = _State(root, base, previous)
        n_stages = 3 + sum(2 + r.quantized for r in selected)
        bar = tqdm(total=n_stages, desc=f"build {root}", unit="stage", disable=not opts.progress)

        def step(name: str, inputs: dict[str, Any], work: Any, still_valid: bool = True) -> Stage:
            res = run_stage(name, root, inputs, st.stage(name), force, work, still_valid)
            st.record(name, res.stage, res.ran)
            bar.update()
            return res.stage

        onnx_rel = "onnx/transformer.onnx"
        s_export = step(
            "export",
            {
                "weights": comps.weights_id,
                "transformer": base["transformer"],
                "opset": opts.opset,
                "torch": versions["torch"],
                "v": EXPORT_VERSION,
            },
            lambda: (
                export.export_transformer(
                    comps.transformer, root / onnx_rel, opset=opts.opset, text_tokens=keys[0].text_tokens
                ).files
            ),
        )
        onnx_sha = s_export.output_sha256[onnx_rel]
        st.base["onnx_sha256"] = onnx_sha

        calib_rel = "calibration/samples.npz"
        s_calib = step(
            "calibrate",
            {"weights": comps.weights_id, "calibration": calib_sha},
            lambda: _write_samples(
                root / calib_rel, calibrate.capture_calibration(comps, opts.calibration, fam, opts.device)
            ),
        )
        ref_rel = "verify/reference.npz"
        s_ref = step(
            "reference",
            {
                "weights": comps.weights_id,
                "family": fam,
                "steps": REFERENCE_STEPS,
                "keys": [str(k) for k in keys],
            },
            lambda: _write_reference(
                root / ref_rel, calibrate.capture_reference(comps, fam, REFERENCE_STEPS, opts.device)
            ),
        )
        samples: list[calibrate.Sample] = []
        reference = None
        dims = (cfg.in_channels, cfg.joint_attention_dim, cfg.pooled_projection_dim)
        for recipe in selected:
            src_rel, src_sha = onnx_rel, onnx_sha
            if recipe.quantized:
                src_rel = f"onnx/transformer_{recipe.name}.onnx"

                def do_quantize(r: quantize.Recipe = recipe, rel: str = src_rel) -> list[Path]:
                    if not samples:
                        samples.extend(calibrate.load_samples(root / calib_rel)[0])
                    quantize.quantize_onnx(
                        root / onnx_rel,
                        root / rel,
                        r,
                        samples,
                        DENOISER_INPUTS,
                        calibration_eps=_calibration_eps(chosen),
                    )
                    return sorted((root / rel).parent.glob(Path(rel).name + "*"))

                s_q = step(
                    f"quantize:{recipe.name}",
                    {
                        "onnx": onnx_sha,
                        "recipe": recipe.to_dict(),
                        "samples": s_calib.output_sha256[calib_rel],
                        "modelopt": versions["nvidia-modelopt"],
                    },
                    do_quantize,
                )
                src_sha = s_q.output_sha256[src_rel]
            art = _compile(step, root, recipe, src_rel, src_sha, chosen, fam, keys, dims, opts)
            reference = reference or calibrate.load_reference(root / ref_rel)
            old = _previous_artifact(previous, art)

            def do_verify(a: Artifact = art, r: quantize.Recipe = recipe, ref: Any = reference) -> list[Path]:
                run = (
                    verify.ort_runner(root / a.path, a.runtime_options)
                    if a.backend == "onnxruntime"
                    else verify.tensorrt_runner(root / a.path, a.profiles)
                )
                results = verify.verify(run, ref, sorted(a.profiles), r.bound_rel_l2, r.name)
                checked = dataclasses.replace(a, verification=results)
                st.pending = [p for p in st.pending if p.precision != a.precision] + [checked]
                write_manifest(root, st.manifest(complete=False))  # the errors are kept even on failure
                verify.check(results, f"{r.name} ({a.path})")
                return []

            s_v = step(
                f"verify:{recipe.name}",
                {
                    "artifact": art.sha256,
                    "reference": s_ref.output_sha256[ref_rel],
                    "bound": recipe.bound_rel_l2,
                    "runtime": art.runtime_options,
                },
                do_verify,
                still_valid=old is not None,
            )
            verified = next((p for p in st.pending if p.precision == art.precision), old)
            if verified is None:
                raise BuildError(f"no verification results for {recipe.name}; rebuild with --force")
            st.pending = [p for p in st.pending if p.precision != art.precision]
            st.artifacts.append(verified)
            del s_v
        bar.close()
        final = st.manifest(complete=True, seconds=time.perf_counter() - t_start)
        write_manifest(root, final)
    log.info("build %s: %d artifact(s) verified in %.1fs", root, len(final.artifacts), final.build_seconds)
    return final


def _request_hash(
    model: str,
    components: Components | None,
    precisions: Sequence[str],
    family: str | None,
    backend: str,
    versions: Mapping[str, str],
    recipes: Sequence[quantize.Recipe],
    opts: BuildOptions,
) -> str:
    """Everything a build's result depends on, hashed without loading the model (see source_signature)."""
    options = {k: v for k, v in dataclasses.asdict(opts).items() if k != "progress"}
    return input_hash(
        {
            "model": str(model),
            "source": components.weights_id if components is not None else source_signature(model),
            "precisions": list(precisions),
            "family": family,
            "backend": backend,
            "backend_version": compile.backend_version(backend),
            "gpu": cuda_device() if backend == "tensorrt" else None,
            "versions": dict(versions),
            "recipes": [r.to_dict() for r in recipes],
            "options": options,
            "calibration_set": calibrate.calibration_hash(opts.calibration, family or _default_family(model)),
            "export": EXPORT_VERSION,
        }
    )


def _default_family(model: str) -> str:
    name = str(model)
    return PRESETS[name].bucket_family if name in PRESETS else PRESETS["kontext-dev"].bucket_family


def _up_to_date(root: Path, request: str) -> Manifest | None:
    """The previous manifest when it is complete, was built from this very request, and every file it
    recorded is intact on disk (size + mtime, else sha256): then there is nothing to do."""
    previous = _read_previous(root)
    if previous is None or not previous.complete or previous.request != request:
        return None
    if not all(outputs_intact(root, stage) for stage in previous.stages.values()):
        return None
    return previous


def _recipe(recipes: Mapping[str, quantize.Recipe], name: str, fp8_attention: bool) -> quantize.Recipe:
    if name not in recipes:
        return quantize.get_recipe(name)  # raises with the known names
    r = recipes[name]
    return dataclasses.replace(r, attention=True) if fp8_attention and r.mode == "fp8" else r


def _calibration_eps(backend: str) -> list[str]:
    return ["cuda:0", "cpu"] if backend == "tensorrt" else ["cpu"]


def _write_samples(path: Path, samples: list[calibrate.Sample]) -> list[Path]:
    calibrate.save_samples(path, samples)
    return [path]


def _write_reference(path: Path, reference: dict[Any, list[calibrate.Sample]]) -> list[Path]:
    calibrate.save_reference(path, reference)
    return [path]


def _previous_artifact(previous: Manifest | None, art: Artifact) -> Artifact | None:
    """The verified artifact of the last build with the same file, to reuse its verification."""
    if previous is None:
        return None
    for a in previous.artifacts:
        if a.precision == art.precision and a.sha256 == art.sha256 and a.path == art.path:
            return dataclasses.replace(art, verification=a.verification)
    return None


def _compile(
    step: Any,
    root: Path,
    recipe: quantize.Recipe,
    src_rel: str,
    src_sha: str,
    backend: str,
    family: str,
    keys: list[Any],
    dims: tuple[int, int, int],
    opts: BuildOptions,
) -> Artifact:
    """The compile stage of one recipe; returns its (unverified) artifact."""
    build_options: dict[str, Any] = {}
    if recipe.quantized:
        build_options["qdq"] = quantize.qdq_counts(root / src_rel)
    if backend == "onnxruntime":
        rel = f"onnxruntime/transformer_{recipe.name}.onnx"
        runtime = compile.ort_runtime_options(recipe)
        profiles = {str(k): 0 for k in keys}
        inputs: dict[str, Any] = {
            "source": src_sha,
            "backend": backend,
            "version": compile.backend_version(backend),
            "runtime": runtime,
        }
        s = step(
            f"compile:{recipe.name}",
            inputs,
            lambda: (
                compile.compile_onnxruntime(root / src_rel, root / rel, recipe),
                sorted((root / rel).parent.glob(Path(rel).name + "*")),
            )[1],
        )
    else:
        from .tensorrt_build import check_tensorrt

        trt, gpu, cap = check_tensorrt()
        rel = f"tensorrt/{plan_name(recipe.name, family, str(trt.__version__), gpu)}"
        runtime = {}
        profiles = family_profiles(keys)
        build_options["tensorrt"] = dataclasses.asdict(opts.tensorrt)
        inputs = {
            "source": src_sha,
            "backend": backend,
            "version": str(trt.__version__),
            "gpu": gpu,
            "capability": list(cap),
            "profiles": profiles,
            "options": build_options["tensorrt"],
        }
        s = step(
            f"compile:{recipe.name}", inputs, lambda: [_plan(root, src_rel, rel, keys, dims, recipe, opts)]
        )
    return Artifact(
        path=rel,
        sha256=s.output_sha256[rel],
        bytes=(root / rel).stat().st_size,
        backend=backend,
        precision=recipe.name,
        family=family,
        profiles=profiles,
        runtime_options=runtime,
        source_sha256=src_sha,
        build_options=build_options,
    )


def _plan(
    root: Path,
    src_rel: str,
    rel: str,
    keys: list[Any],
    dims: tuple[int, int, int],
    recipe: quantize.Recipe,
    opts: BuildOptions,
) -> Path:
    build_plan(
        root / src_rel, root / rel, keys, dims, recipe.mode, opts.tensorrt, root / "tensorrt" / "timing.cache"
    )
    return root / rel
