"""The contestants of a benchmark and how each one runs an edit.

A contestant is a name plus a Denoiser factory run inside our KontextPipeline, except the baseline,
diffusers' FluxKontextPipeline, which runs its own loop. Engine contestants come from a build's manifest
(one per artifact: backend x precision) and are loaded through the runtime's loader.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from PIL import Image

from ..adapters import diffusers_call
from ..backends import Denoiser, DenoiserBase
from ..backends.fp8 import fp8_linears
from ..backends.torch import TorchDenoiser, dtype_name, torch_denoiser, weight_sharing_copy, with_vae_lever
from ..backends.torch_options import parse_spec
from ..caching import CACHE_OFF, CacheSpec, parse_cache_spec
from ..clock import synchronize, timed
from ..distributed import check_context_parallel, context_parallel_denoiser
from ..errors import ConfigError
from ..model.components import Components
from ..pipeline import KontextPipeline
from ..prompt_cache import PromptCache
from ..request import EditRequest
from .probes import TimedDenoiser, TimedTransformer, TimedVae
from .timing import CallClock

log = logging.getLogger(__name__)

BASELINE = "diffusers"
TORCH_PREFIX = "torch-"  # torch-{eager|compile}[-fp32|-bf16][+lever...][+cache] or torch-fp8[+lever...]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # torch-<mode>-<dtype>
CACHE_LEVER = "cache"  # bench-side lever: prompt embeddings cached across the contestant's edits
STEP_CACHE = "cache="  # +cache=SPEC: a step cache (engine/caching); ';' stands for ',' inside SPEC
CP_LEVER = "cp"  # bench-side lever cpN: each forward split over N processes (engine.distributed)
ENGINES = "engines"  # every artifact of the manifest
STAGES = ("text_encode", "vae_encode", "step", "denoise", "vae_decode", "total")

DenoiserFactory = Callable[[], Denoiser]


@dataclass(frozen=True)
class Contestant:
    """One entrant: its name, what it runs on, and how to make its Denoiser (None: the diffusers baseline)."""

    name: str
    backend: str  # "diffusers" | "torch" | "onnxruntime" | "tensorrt"
    precision: str  # "fp32" | "bf16" | "fp8" | "int8" ...
    make_denoiser: DenoiserFactory | None = None
    compile_vae: bool = False  # run its edits with the VAE's encoder and decoder compiled
    prompt_cache: bool = False  # keep prompt embeddings across its edits (a repeated prompt skips T5, CLIP)
    fp8_linears: frozenset[str] = frozenset()  # the Linears it runs in FP8 (for %peak's FLOP mix)
    fp8_attention: bool = False  # its attention matmuls run in FP8
    step_cache: CacheSpec | None = None  # +cache=SPEC: its edits run this step cache (None: none)

    @property
    def is_baseline(self) -> bool:
        return self.make_denoiser is None


@dataclass
class RunSample:
    """What one timed edit measured: seconds per stage (only the stages this runner measures)."""

    stages: dict[str, float]
    step_times: list[float]
    image: Image.Image
    notes: dict[str, str] = field(default_factory=dict)  # stage -> how it was measured, where it differs
    steps_computed: int | None = None  # full transformer passes per image (None: not known, diffusers)
    latents: torch.Tensor | None = None  # [B, N, 64] final latents (cached vs uncached comparisons)


class EditRunner(Protocol):
    """A loaded contestant, ready to run edits."""

    contestant: Contestant
    replay_denoiser: Denoiser  # its transformer alone, for the per-step quality check
    replay_is_reference: (
        bool  # True: the reference's own module, eager (its per-step error is 0 by construction)
    )

    def run(self, image: Image.Image, prompt: str, settings: EditRequest) -> RunSample: ...

    def close(self) -> None: ...


# --------------------------------------------------------------------------- runners


class PipelineRunner:
    """Our KontextPipeline around the contestant's Denoiser; each denoiser call is timed (= one step)."""

    def __init__(
        self,
        contestant: Contestant,
        components: Components,
        denoiser: Denoiser,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self.contestant = contestant
        self.replay_denoiser: Denoiser = denoiser
        self.replay_is_reference = False
        self.clock = CallClock(device)
        components = with_vae_lever(components, contestant.compile_vae)
        self.pipe = KontextPipeline(
            components,
            TimedDenoiser(denoiser, self.clock),
            device=str(device),
            dtype=dtype,
            prompt_cache=PromptCache() if contestant.prompt_cache else None,
        )

    def run(self, image: Image.Image, prompt: str, settings: EditRequest) -> RunSample:
        self.clock.drain()
        cache = self.contestant.step_cache or CACHE_OFF
        request = dataclasses.replace(settings, image=image, prompt=prompt, cache=cache)
        result = self.pipe.edit(request, progress=False)
        stages = {k: v for k, v in result.timings.items() if k in STAGES}
        step_times, notes = self.clock.drain(), {}
        if cache.enabled:  # a residual cache runs the split forward, which the clock does not see
            step_times = result.step_times
            notes["step"] = "every step of the loop, skipped ones included (step cache)"
        return RunSample(
            stages=stages,
            step_times=step_times,
            image=result.image,
            notes=notes,
            steps_computed=result.steps_computed,
            latents=result.latents,
        )

    def close(self) -> None:
        self.replay_denoiser.close()


class DiffusersRunner:
    """diffusers' FluxKontextPipeline over the same modules, with timed stand-ins for the transformer and VAE.

    Stages: transformer per step and VAE encode/decode from the stand-ins, end to end around the call;
    text encoding from a separate, identical pipe.encode_prompt call (outside the end-to-end time).
    """

    TEXT_NOTE = "separate pipe.encode_prompt call"

    def __init__(
        self, contestant: Contestant, components: Components, device: torch.device, dtype: torch.dtype
    ) -> None:
        self.contestant = contestant
        self.device = device
        self.max_sequence_length = components.preset.max_sequence_length
        self.step_clock, self.encode_clock, self.decode_clock = (CallClock(device) for _ in range(3))
        timed_components = dataclasses.replace(
            components,
            transformer=TimedTransformer(components.transformer, self.step_clock),
            vae=TimedVae(components.vae, self.encode_clock, self.decode_clock),
        )
        self.pipe = timed_components.diffusers_pipeline()
        self.pipe.set_progress_bar_config(disable=True)
        self.replay_denoiser: Denoiser = TorchDenoiser(
            components.transformer, name=f"diffusers-{dtype_name(dtype)}"
        )
        # The same transformer module as the reference, run eagerly: replaying it would only spend a
        # whole edit's time to measure a difference of 0.
        self.replay_is_reference = True

    def run(self, image: Image.Image, prompt: str, settings: EditRequest) -> RunSample:
        call = diffusers_call(
            dataclasses.replace(settings, image=image, prompt=prompt), self.max_sequence_length
        )
        stages: dict[str, float] = {}
        with torch.inference_mode(), timed(self.device, stages, "text_encode"):
            self.pipe.encode_prompt(
                prompt=prompt, prompt_2=None, device=self.device, max_sequence_length=self.max_sequence_length
            )
        for clock in (self.step_clock, self.encode_clock, self.decode_clock):
            clock.drain()
        with timed(self.device, stages, "total"):
            out = self.pipe(**call, output_type="pil")
        synchronize(self.device)
        stages["vae_encode"] = sum(self.encode_clock.drain())
        stages["vae_decode"] = sum(self.decode_clock.drain())
        return RunSample(
            stages=stages,
            step_times=self.step_clock.drain(),
            image=out.images[0],
            notes={"text_encode": self.TEXT_NOTE},
        )

    def close(self) -> None:
        """Nothing to free: the baseline runs the shared components."""


def open_runner(
    contestant: Contestant, components: Components, device: torch.device, dtype: torch.dtype
) -> EditRunner:
    """Load the contestant (build its Denoiser) and wrap it in the runner that times its edits."""
    if contestant.make_denoiser is None:
        return DiffusersRunner(contestant, components, device, dtype)
    return PipelineRunner(contestant, components, contestant.make_denoiser(), device, dtype)


# --------------------------------------------------------------------------- step caches


def split_step_cache(name: str) -> tuple[str, CacheSpec | None]:
    """'torch-eager+cache=magcache-kontext' -> ('torch-eager', its CacheSpec); no +cache=: (name, None).

    Contestant lists are comma separated, so a full spec writes ';' for its commas:
    torch-eager+cache=magcache:threshold=0.05;max_skip_steps=4. Presets have no commas."""
    head, sep, spec = name.partition("+" + STEP_CACHE)
    if not sep:
        return name, None
    return head, parse_cache_spec(spec.replace(";", ","))


def with_step_cache(contestant: Contestant, spec: CacheSpec | None) -> Contestant:
    """The contestant with its edits under `spec` (named NAME+cache=LABEL); unchanged when None or off."""
    if spec is None or not spec.enabled:
        return contestant
    label = spec.label.replace(",", ";")
    return dataclasses.replace(contestant, name=f"{contestant.name}+{STEP_CACHE}{label}", step_cache=spec)


# --------------------------------------------------------------------------- torch contestants


def split_dtype(head: str) -> tuple[str, torch.dtype | None]:
    """'torch-eager-bf16' -> ('torch-eager', torch.bfloat16); 'torch-fp8' -> ('torch-fp8', None)."""
    base, _, suffix = head.rpartition("-")
    if suffix in DTYPES and base.startswith(TORCH_PREFIX):
        return base, DTYPES[suffix]
    return head, None


class CastDenoiser(DenoiserBase):
    """A denoiser run in its own dtype inside a pipeline of another: inputs cast in, the output cast back
    (torch-eager-bf16 on a CPU, where the pipeline and the reference are fp32)."""

    def __init__(self, inner: Denoiser, dtype: torch.dtype, out_dtype: torch.dtype) -> None:
        self.inner = inner
        self.dtype = dtype
        self.out_dtype = out_dtype
        self.name = inner.name
        self.shape_keys = inner.shape_keys

    def run(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:  # -> [B, N + M, 64] in out_dtype
        cast = {k: v.to(self.dtype) if v.is_floating_point() else v for k, v in inputs.items()}
        return self.inner(**cast).to(self.out_dtype)

    def close(self) -> None:
        self.inner.close()


def torch_contestant(
    spec: str, components: Components, device: torch.device, dtype: torch.dtype
) -> Contestant:
    """A torch contestant from its name: torch-{eager|compile}[-fp32|-bf16][+lever...][+cache] or
    torch-fp8[+lever...], e.g. torch-fp8+qkv+graphs, torch-eager-bf16 (backends.torch_options.LEVERS;
    +cache is the benchmark's prompt cache; +cpN splits each forward over N processes). Without a dtype
    suffix a contestant runs in the bench's dtype.

    Each contestant runs its own transformer: a weight-sharing copy of the components' one, so levers
    that swap modules or weights (FP8, fused QKV, the attention kernel) change only that copy, and the
    baseline and the reference keep their bf16 modules (the runner checks this with fingerprints). A
    dtype other than the bench's gets a converted copy (its own weights), fed and read through casts.
    The hardware is checked when it is opened: a contestant this machine cannot run is skipped with a reason.
    """
    tokens = spec.split("+")
    head, own_dtype = split_dtype(tokens[0])
    cache = CACHE_LEVER in tokens[1:]
    cp = [t for t in tokens[1:] if t.startswith(CP_LEVER) and t[len(CP_LEVER) :].isdigit()]
    processes = int(cp[-1][len(CP_LEVER) :]) if cp else 1
    levers = [t for t in tokens[1:] if t != CACHE_LEVER and t not in cp]
    mode, options = parse_spec("+".join([head, *levers]))
    if own_dtype is not None and mode == "fp8":
        raise ConfigError(f"{spec!r}: torch-fp8 takes no dtype suffix (its unquantized layers run in bf16)")
    run_dtype = own_dtype or dtype
    precision = "fp8" if mode == "fp8" else dtype_name(run_dtype)
    base = "torch-fp8" if mode == "fp8" else f"torch-{mode}-{precision}"  # torch-eager-fp32, torch-fp8
    name = "+".join((base, *options.levers, *cp[-1:], *([CACHE_LEVER] if cache else [])))
    if processes > 1:  # refused in one line before anything loads
        check_context_parallel(processes, mode=mode, options=options, device=device)
        if own_dtype is not None:
            raise ConfigError(f"{spec!r}: context parallelism runs in the bench's dtype; drop the suffix")

    def make() -> Denoiser:
        if processes > 1:  # the workers get the plain transformer; rank 0 runs a weight-sharing copy
            return context_parallel_denoiser(components.transformer, processes, mode=mode, options=options)
        amax = None
        if options.fp8_scales == "static":
            from ..calibration import calibrate_amax

            amax = calibrate_amax(components, device=device, dtype=dtype)
        if run_dtype != dtype:  # .to() on a weight-sharing copy would convert the shared weights too
            own = copy.deepcopy(components.transformer).to(run_dtype)
            inner = torch_denoiser(own, mode=mode, device=device, dtype=run_dtype, options=options)
            return CastDenoiser(inner, run_dtype, dtype)
        own = weight_sharing_copy(components.transformer)
        return torch_denoiser(own, mode=mode, device=device, dtype=dtype, options=options, amax=amax)

    fp8 = frozenset(fp8_linears(components.transformer, options.fp8_filter)) if mode == "fp8" else frozenset()
    return Contestant(
        name,
        "torch",
        precision,
        make,
        compile_vae=options.compile_vae,
        prompt_cache=cache,
        fp8_linears=fp8,
        fp8_attention="fp8" in options.attention,
    )


# --------------------------------------------------------------------------- engine contestants


def engine_contestants(build_dir: Path, components: Components, device: torch.device) -> list[Contestant]:
    """One contestant per artifact of the build's manifest (backend x precision), loaded when opened.

    The runtime's loader checks each artifact against the manifest and this machine (weights, backend
    version, GPU, file hash) and refuses a mismatch with the command that rebuilds it.
    """
    from ..manifest import read_manifest

    manifest = read_manifest(build_dir)
    out = []
    for artifact in manifest.artifacts:
        name = f"{artifact.backend}-{artifact.precision}"
        out.append(
            Contestant(
                name,
                artifact.backend,
                artifact.precision,
                _artifact_loader(build_dir, artifact.backend, artifact.precision, components, device),
            )
        )
    return out


def _artifact_loader(
    build_dir: Path, backend: str, precision: str, components: Components, device: torch.device
) -> DenoiserFactory:
    def load() -> Denoiser:
        from ..config import LoadOptions
        from ..manifest import read_manifest
        from ..runtime import load_artifacts

        device_name = str(device) if backend == "tensorrt" else device.type
        options = LoadOptions(backend=backend, precision=precision, device=device_name)
        return load_artifacts(
            read_manifest(build_dir), build_dir, weights_id=components.weights_id, options=options
        )

    return load
