"""`kontext info`: what this machine can run (libraries, GPU, presets, buckets), and what a build folder
holds and whether this machine can run it."""

from __future__ import annotations

import importlib.metadata as md
import importlib.util
from pathlib import Path

from .buckets import FAMILIES, buckets, tokens
from .config import PRESETS
from .errors import BackendUnavailableError, ManifestError
from .manifest import MachineFacts, Manifest, check_manifest, lora_arg, read_manifest


def _version(dist: str) -> str | None:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def gpu_summary() -> dict[str, str | None]:
    """torch build, CUDA device name and compute capability (None where absent)."""
    import torch

    out: dict[str, str | None] = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "gpu": None,
        "capability": None,
    }
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(0)
        major, minor = torch.cuda.get_device_capability(0)
        out["capability"] = f"{major}.{minor}"
    return out


def library_summary() -> dict[str, str | None]:
    """Versions of the optional libraries each backend or build stage needs (None: not installed)."""
    libs = {
        "diffusers": _version("diffusers"),
        "onnx": _version("onnx"),
        "onnxruntime": _version("onnxruntime") or _version("onnxruntime-gpu"),
        "nvidia-modelopt": _version("nvidia-modelopt"),
        "torchao": _version("torchao"),
        "tensorrt": None,
    }
    # Importing tensorrt is safe without a GPU (deserializing is not). Type stubs or tensorrt-lean
    # import too, without a Builder: only a full TensorRT counts.
    if importlib.util.find_spec("tensorrt") is not None:
        from .backends.tensorrt_plans import tensorrt_module

        trt = tensorrt_module()
        libs["tensorrt"] = (
            str(trt.__version__) if trt is not None else "present, but no Builder (stubs or lean)"
        )
    return libs


def machine_report(build_dir: Path | None = None) -> str:
    lines = ["machine:"]
    lines += [f"  {k:<16} {v or '-'}" for k, v in gpu_summary().items()]
    lines.append("libraries:")
    lines += [f"  {k:<16} {v or 'not installed'}" for k, v in library_summary().items()]
    lines.append("presets:")
    for p in PRESETS.values():
        t = p.transformer
        kind = "local path" if not p.synthetic else "synthetic (seeded random weights)"
        if p.init == "scaled":
            kind = "synthetic, built on the GPU (random weights: its images are noise)"
        lines.append(
            f"  {p.name:<12} hidden {t.hidden_size}, {t.num_layers}+{t.num_single_layers} blocks, "
            f"family {p.bucket_family}, {kind}"
        )
    lines.append("bucket families:")
    for f in FAMILIES:
        bs = buckets(f)
        toks = sorted({tokens(*b) for b in bs})
        lines.append(f"  {f:<7} {len(bs):>2} buckets, {len(toks)} token counts {toks[0]}..{toks[-1]}")
    if build_dir is not None:
        lines.append(describe(build_dir))
    return "\n".join(lines)


def describe(build_dir: Path) -> str:
    """A summary of a build folder's manifest: model, backend, and each artifact's size and error."""
    m = read_manifest(build_dir)
    lines = [
        f"build {build_dir}:",
        f"  model {m.model} (weights {m.weights_id}), backend {m.backend} "
        f"{m.backend_version}, opset {m.opset}",
    ]
    if m.gpu:
        lines.append(f"  built on {m.gpu} (compute capability {m.compute_capability})")
    refs = ",".join(str(r) for r in m.refs)
    batches = ",".join(str(b) for b in m.batches)
    lines.append(
        f"  serves {refs} reference image(s), batch {batches} (kontext build --refs {refs} --batch {batches})"
    )
    for x in m.loras:
        lines.append(
            f"  LoRA {x['path']} at scale {x['scale']:g} (sha256 {x['sha256'][:12]}...): load with "
            f"--lora {lora_arg(x)}"
        )
    for a in m.artifacts:
        worst = max((v.rel_l2 for v in a.verification.values()), default=float("nan"))
        mode = f" ({a.profile_mode} profiles)" if a.backend == "tensorrt" else ""
        lines.append(
            f"  {a.precision:<5} {a.path} ({a.bytes / 1e6:.1f} MB), {len(a.profiles)} shape keys{mode}, "
            f"family {a.family}, worst rel L2 {worst:.2e}"
        )
    return "\n".join(lines)


def build_report(build_dir: Path) -> str:
    """The buckets each artifact serves and whether this machine can run it.

    Checks what loading would check (backend library and version, GPU, files, sha256), except the
    weights, which are only fingerprinted when loaded.
    """
    from .buckets import MAX_REFERENCES
    from .dispatch import served_buckets

    m = read_manifest(build_dir)
    machine, why = _machine_for(m)
    lines = ["served by this build:"]
    for a in m.artifacts:
        bs = ", ".join(f"{w}x{h}" for w, h in served_buckets(a.shape_keys(), a.family)) or "none"
        with_refs = [  # multi-reference keys (kontext build --refs): the buckets served with r references
            f"{r} reference(s): " + ", ".join(f"{w}x{h}" for w, h in served)
            for r in range(1, MAX_REFERENCES + 1)
            if (served := served_buckets(a.shape_keys(), a.family, r))
        ]
        if with_refs:
            bs += "; with " + "; ".join(with_refs)
        status = f"no: {why}" if machine is None else "yes"
        if machine is not None:
            try:
                check_manifest(m, build_dir, a, machine)
            except ManifestError as e:  # says why and how to rebuild
                status = f"no: {e}"
        lines.append(f"  {a.backend}-{a.precision}: buckets {bs}")
        lines.append(f"    runs on this machine: {status}")
    return "\n".join(lines)


def _machine_for(m: Manifest) -> tuple[MachineFacts | None, str]:
    """This machine as the manifest's backend sees it (with the manifest's weights), or why it cannot."""
    try:
        if m.backend == "tensorrt":
            import torch

            from .backends.tensorrt import machine_facts

            return machine_facts(m.weights_id, torch.device("cuda")), ""
        from .backends.onnxruntime import ort_version

        return MachineFacts(m.weights_id, ort_version()), ""
    except BackendUnavailableError as e:
        return None, str(e)


def memory_report(model: str, vram: float | str) -> str:
    """The memory plan of `model` on a card of `vram` GiB ("auto": this GPU), as `kontext plan` prints it
    (the same plan `kontext serve --vram` makes at start and shows on /readyz)."""
    import torch

    from .errors import ConfigError
    from .memory.plan import plan_memory
    from .memory.planning import card_gib, parse_vram

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gib = card_gib(parse_vram(vram) or "auto", device)
    if gib is None:
        raise ConfigError(
            "--vram auto reads this machine's GPU, and it has none: pass a size, e.g. --vram 24"
        )
    return plan_memory(model, vram=gib).describe()
