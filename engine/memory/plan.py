"""The memory plan: before any weight is read, where each component lives and what the peak will be.

`plan_memory(model, precision, vram)` counts each component on the meta device (sizes.py), adds the
activation peak of the family's largest bucket (activations.py) per phase of an edit (text encoding,
denoising, VAE) and walks the ladder of levers, fastest first, keeping the first that fits:

  everything resident -> T5 released after each new prompt, then T5 on the CPU -> + transformer weights
  stored in FP8 -> + VAE tiled -> + transformer blocks streamed from pinned CPU memory

(each lever added to those before it; at every rung T5 released is tried before T5 on the CPU). A card
of V GiB offers V x 2^30 x (1 - MARGIN) - CONTEXT_BYTES to torch's allocator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..config import ModelPreset
from ..errors import ConfigError
from .activations import largest_shape, text_activation, transformer_activation, vae_activation
from .sizes import COMPONENTS, ModelSizes, model_sizes

GIB = 1 << 30
PRECISIONS = ("bf16", "fp8")
T5_PLACES = ("resident", "released", "cpu")
# Outside torch's allocator: the CUDA context, cuBLAS/cuDNN handles and kernels (an allowance, not a
# measurement; benchmarks/memory_phase.py records what the allocator reserved).
CONTEXT_BYTES = 512 << 20
MARGIN = 0.05  # of the card, for the allocator's fragmentation (reserved over allocated)
STREAM_GROUP = 1  # blocks per streamed group; two groups on the card (running + prefetched)

Placement = Literal["resident", "released", "cpu", "streamed", "tiled"]


@dataclass(frozen=True)
class Levers:
    """What a plan changes, against everything resident at the asked precision."""

    t5: str = "resident"  # resident | released (run on the card, then moved off) | cpu (run there)
    fp8: bool = False  # transformer weights stored in FP8 (fp8_storage.py)
    vae_tiled: bool = False
    streamed: bool = False  # transformer blocks streamed from pinned CPU memory

    def names(self) -> tuple[str, ...]:
        out = [] if self.t5 == "resident" else [f"t5-{self.t5}"]
        out += [
            n
            for n, on in (("fp8", self.fp8), ("vae-tiled", self.vae_tiled), ("streamed", self.streamed))
            if on
        ]
        return tuple(out)


def ladder(precision: str) -> list[Levers]:
    """Every lever set the planner tries, fastest first."""
    rungs = [Levers()]
    stages = [Levers(fp8=precision == "fp8")]
    if precision == "bf16":
        stages.append(Levers(fp8=True))
    stages += [Levers(fp8=True, vae_tiled=True), Levers(fp8=True, vae_tiled=True, streamed=True)]
    for stage in stages:
        for t5 in ("released", "cpu"):
            rungs.append(Levers(t5, stage.fp8, stage.vae_tiled, stage.streamed))
    if precision == "fp8":
        rungs[0] = Levers(fp8=True)
    return rungs


@dataclass(frozen=True)
class ComponentPlan:
    placement: Placement
    dtype: str  # bf16 | fp8 (E4M3 storage + float32 scales)
    bytes: int  # its weights at that dtype, wherever they live

    def to_json(self) -> dict[str, Any]:
        return {"placement": self.placement, "dtype": self.dtype, "bytes": self.bytes}


@dataclass(frozen=True)
class MemoryPlan:
    """Where each component lives and the expected peak of torch's allocator (bytes)."""

    model: str
    precision: str
    vram_bytes: int  # the card
    budget_bytes: int  # what torch's allocator may use on it
    levers: Levers
    components: dict[str, ComponentPlan]
    phases: dict[str, int]  # expected peak per phase: text, denoise, vae
    transformer_card_bytes: int = 0  # the transformer's bytes on the card (streamed: fixed part + window)
    stream_window_bytes: int = 0  # streamed blocks on the card at once (0: not streamed)
    stream_group: int = 0
    fp8_compute: bool = False  # FP8 GEMMs (compute capability >= 8.9); else FP8 storage, bf16 compute
    smallest_card_gib: int = 0  # the smallest card that would fit (set when this plan does not)
    terms: dict[str, int] = field(default_factory=dict)  # the activation terms, for the docs and CLI

    @property
    def peak_bytes(self) -> int:
        return max(self.phases.values())

    @property
    def fits(self) -> bool:
        return self.peak_bytes <= self.budget_bytes

    @property
    def resident(self) -> bool:
        """Nothing moves: every component on the card, untiled, at the asked precision."""
        return not self.levers.names() or self.levers.names() == (("fp8",) if self.precision == "fp8" else ())

    def to_json(self) -> dict[str, Any]:
        return {
            "fits": self.fits,
            "peak_bytes": self.peak_bytes,
            "components": {name: self.components[name].to_json() for name in COMPONENTS},
        }

    def describe(self) -> str:
        """The plan as the CLI prints it: each component's place and bytes, the expected peak."""
        gib = round(self.vram_bytes / GIB, 3)
        head = f"memory plan: {self.model} in {self.precision} on a {gib:g} GiB card"
        lines = [f"{head} ({', '.join(self.levers.names()) or 'everything resident'})"]
        for name in COMPONENTS:
            c = self.components[name]
            lines.append(f"  {name:<15} {c.placement:<9} {c.dtype:<5} {c.bytes / GIB:7.2f} GiB")
        if self.stream_group:
            lines.append(
                f"  streaming: {self.stream_group} block(s) per group, "
                f"{self.stream_window_bytes / GIB:.2f} GiB on the card "
                "(running + prefetched on a second CUDA stream)"
            )
        phases = ", ".join(f"{k} {v / GIB:.2f}" for k, v in self.phases.items())
        lines.append(
            f"  expected peak {self.peak_bytes / GIB:.2f} GiB of {self.budget_bytes / GIB:.2f} usable "
            f"({phases})"
        )
        if not self.fits:
            lines.append(f"  does not fit: the smallest card that would has {self.smallest_card_gib} GiB")
        return "\n".join(lines)

    def refusal(self) -> str:
        """One line: why nothing fits, and the smallest card that would."""
        return (
            f"{self.model} in {self.precision} does not fit a {round(self.vram_bytes / GIB, 3):g} GiB card "
            f"under any plan (at best {size(self.peak_bytes)} peak); the smallest card that fits has "
            f"{self.smallest_card_gib} GiB: pass --vram {self.smallest_card_gib} or more"
        )


def size(nbytes: int) -> str:
    """Bytes as GiB (two decimals), or MiB below a tenth of a GiB (the small presets)."""
    return f"{nbytes / GIB:.2f} GiB" if nbytes >= GIB // 10 else f"{nbytes / 2**20:.1f} MiB"


def budget(vram_bytes: int) -> int:
    return int(vram_bytes * (1 - MARGIN)) - CONTEXT_BYTES


def card_for(peak: int) -> int:
    """The smallest whole-GiB card whose budget holds `peak`."""
    return math.ceil((peak + CONTEXT_BYTES) / (1 - MARGIN) / GIB)


def evaluate(
    sizes: ModelSizes,
    levers: Levers,
    vram_bytes: int,
    *,
    precision: str = "bf16",
    fp8_compute: bool = False,
    batch: int = 1,
    family: str | None = None,
) -> MemoryPlan:
    """The plan of one lever set: bytes per component, peak per phase."""
    p: ModelPreset = sizes.preset
    t = p.transformer
    shape = largest_shape(family or p.bucket_family, p.max_sequence_length, batch)
    d_model, d_ff, heads, length = sizes.t5
    terms = {
        "denoise": transformer_activation(t.hidden_size, t.num_attention_heads, t.attention_head_dim, shape),
        "text": text_activation(d_model, d_ff, heads, length),
        "vae": vae_activation(sizes.vae_channels, shape, levers.vae_tiled),
    }
    fp8 = levers.fp8
    t_bytes = sizes.transformer_fp8 if fp8 else sizes.bf16["transformer"]
    window = 0
    if levers.streamed:
        blocks = sizes.blocks_fp8 if fp8 else sizes.blocks_bf16
        window = 2 * STREAM_GROUP * max(blocks)
        t_gpu = (sizes.transformer_fixed_fp8 if fp8 else sizes.transformer_fixed_bf16) + window
    else:
        t_gpu = t_bytes
    t5 = sizes.bf16["text_encoder_2"]
    always = t_gpu + sizes.bf16["text_encoder"] + sizes.bf16["vae"] + (t5 if levers.t5 == "resident" else 0)
    text_t5 = t5 if levers.t5 == "released" else 0
    phases = {
        "text": always + text_t5 + (terms["text"] if levers.t5 != "cpu" else 0),
        "denoise": always + terms["denoise"],
        "vae": always + terms["vae"],
    }
    components = {
        "transformer": ComponentPlan(
            "streamed" if levers.streamed else "resident", "fp8" if fp8 else "bf16", t_bytes
        ),
        "text_encoder": ComponentPlan("resident", "bf16", sizes.bf16["text_encoder"]),
        "text_encoder_2": ComponentPlan(levers.t5, "bf16", t5),  # type: ignore[arg-type]
        "vae": ComponentPlan("tiled" if levers.vae_tiled else "resident", "bf16", sizes.bf16["vae"]),
    }
    return MemoryPlan(
        model=p.name,
        precision=precision,
        vram_bytes=vram_bytes,
        budget_bytes=budget(vram_bytes),
        levers=levers,
        components=components,
        phases=phases,
        transformer_card_bytes=t_gpu,
        stream_window_bytes=window,
        stream_group=STREAM_GROUP if levers.streamed else 0,
        fp8_compute=fp8 and fp8_compute,
        terms=terms,
    )


def plan_memory(
    model: str | Path | ModelPreset | ModelSizes,
    *,
    vram: float,
    precision: str = "bf16",
    fp8_compute: bool = False,
    batch: int = 1,
    family: str | None = None,
    fp8_filter: str = "all",
) -> MemoryPlan:
    """The fastest plan of `model` (a preset name, a Kontext folder, or counted sizes) that fits a card of
    `vram` GiB (2^30 bytes, as cards report themselves). Never raises for a card too small: the returned
    plan then has fits False, the smallest-peak plan, and smallest_card_gib (callers refuse with
    plan.refusal()). fp8_compute: the GPU has FP8 GEMMs (cc >= 8.9)."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if not vram > 0:
        raise ConfigError(f"vram must be a positive number of GiB, got {vram!r}")
    sizes = model if isinstance(model, ModelSizes) else model_sizes(model, fp8_filter)
    vram_bytes = int(vram * GIB)
    kw: dict[str, Any] = {
        "precision": precision,
        "fp8_compute": fp8_compute,
        "batch": batch,
        "family": family,
    }
    plans = [evaluate(sizes, levers, vram_bytes, **kw) for levers in ladder(precision)]
    for plan in plans:
        if plan.fits:
            return plan
    best = min(plans, key=lambda x: x.peak_bytes)
    return _with_card(best, card_for(best.peak_bytes))


def _with_card(plan: MemoryPlan, gib: int) -> MemoryPlan:
    from dataclasses import replace

    return replace(plan, smallest_card_gib=gib)
