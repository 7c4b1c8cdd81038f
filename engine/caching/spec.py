"""Step-cache specs: `NAME[:key=value,...]`, a preset name, or `off` -> one typed CacheSpec.

Methods (their semantics are diffusers 0.42.1's hooks; docs/caching.md says what each does here):
  fbc         first-block cache (FirstBlockCacheConfig): threshold
  taylorseer  TaylorSeer on the velocity (TaylorSeerCacheConfig, lite mode): cache_interval,
              disable_cache_before_step, disable_cache_after_step, max_order
  magcache    MagCache (MagCacheConfig): threshold, max_skip_steps, retention_ratio, ratios (kontext |
              flux), on (auto | residual | velocity: what is cached; auto = residual where the backend
              splits the forward, else velocity)
Presets (PRESETS) are comma-free names, so they fit in a comma-separated bench contestant list; a full
spec with several keys is given where one value is expected (`--cache`, EditRequest.cache, load(cache=)).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

from ..errors import ConfigError

OFF_NAMES = ("off", "none")
RATIO_SETS = ("kontext", "flux")
MAG_TARGETS = ("auto", "residual", "velocity")


@dataclass(frozen=True)
class FbcConfig:
    """First-block cache: skip the blocks after the first while the first block's residual changes by at
    most `threshold` (mean |r - r_prev| / mean |r_prev|) since the last full pass. 0.08: ParaAttention's."""

    threshold: float = 0.08

    def check(self) -> None:
        _positive("fbc threshold", self.threshold, allow_zero=True)


@dataclass(frozen=True)
class TaylorSeerConfig:
    """TaylorSeer on the model's output: full passes at steps < disable_cache_before_step, every
    cache_interval steps after it and at steps >= disable_cache_after_step; a Taylor series of order
    `max_order` (finite differences of the full passes) predicts the others."""

    cache_interval: int = 5
    disable_cache_before_step: int = 3
    disable_cache_after_step: int | None = None
    max_order: int = 1

    def check(self) -> None:
        if self.cache_interval < 1:
            raise ConfigError(f"taylorseer cache_interval must be >= 1, got {self.cache_interval}")
        if self.disable_cache_before_step < 0:
            raise ConfigError(
                f"taylorseer disable_cache_before_step must be >= 0, got {self.disable_cache_before_step}"
            )
        if self.disable_cache_after_step is not None and self.disable_cache_after_step < 0:
            raise ConfigError(
                f"taylorseer disable_cache_after_step must be >= 0, got {self.disable_cache_after_step}"
            )
        if not 0 <= self.max_order <= 4:
            raise ConfigError(f"taylorseer max_order must be 0..4, got {self.max_order}")


@dataclass(frozen=True)
class MagCacheConfig:
    """MagCache: past the first retention_ratio of the steps, skip while the accumulated error of the
    calibrated magnitude ratios stays <= threshold, at most max_skip_steps in a row. Defaults: diffusers'
    MagCacheConfig, with the Kontext ratios (MagCache4FLUX_Kontext's calibration)."""

    threshold: float = 0.06
    max_skip_steps: int = 3
    retention_ratio: float = 0.2
    ratios: str = "kontext"
    on: str = "auto"

    def check(self) -> None:
        _positive("magcache threshold", self.threshold, allow_zero=True)
        if self.max_skip_steps < 0:
            raise ConfigError(f"magcache max_skip_steps must be >= 0, got {self.max_skip_steps}")
        if not 0.0 <= self.retention_ratio <= 1.0:
            raise ConfigError(f"magcache retention_ratio must be in [0, 1], got {self.retention_ratio}")
        if self.ratios not in RATIO_SETS:
            raise ConfigError(f"magcache ratios must be one of {', '.join(RATIO_SETS)}, got {self.ratios!r}")
        if self.on not in MAG_TARGETS:
            raise ConfigError(f"magcache on must be one of {', '.join(MAG_TARGETS)}, got {self.on!r}")


MethodConfig = FbcConfig | TaylorSeerConfig | MagCacheConfig
METHODS: dict[str, type[Any]] = {"fbc": FbcConfig, "taylorseer": TaylorSeerConfig, "magcache": MagCacheConfig}


@dataclass(frozen=True)
class CacheSpec:
    """One step-cache choice. method "off": no cache (an explicit off overrides an engine default)."""

    method: str  # off | fbc | taylorseer | magcache
    config: MethodConfig | None = None  # None when off
    preset: str | None = None  # the preset it came from, if any

    @property
    def enabled(self) -> bool:
        return self.method != "off"

    def __str__(self) -> str:
        """The canonical spec text (every key, in field order); parse_cache_spec(str(s)) == s less preset."""
        if self.config is None:
            return "off"
        items = [f"{f.name}={getattr(self.config, f.name)}" for f in fields(self.config)]
        items = [i for i in items if not i.endswith("=None")]
        return f"{self.method}:{','.join(items)}"

    @property
    def label(self) -> str:
        """The preset name when it came from one, else the canonical text (for logs and metadata)."""
        return self.preset or str(self)


CACHE_OFF = CacheSpec("off")

# name -> (spec text, source). docs/caching.md has each source's published speed-up and metric.
PRESETS: dict[str, tuple[str, str]] = {
    "fbc": ("fbc:threshold=0.08", "ParaAttention doc/fastest_flux.md (FBCache 0.08, FLUX.1-dev)"),
    "fbc-fast": ("fbc:threshold=0.12", "ParaAttention doc/fastest_flux.md (FBCache 0.12, FLUX.1-dev)"),
    "magcache-kontext": (
        "magcache:threshold=0.05,max_skip_steps=4,retention_ratio=0.2,ratios=kontext",
        "MagCache4FLUX_Kontext/magcache_flux_kontext.py (E005K4R02)",
    ),
    "magcache-flux": (
        "magcache:threshold=0.06,max_skip_steps=3,retention_ratio=0.2,ratios=flux",
        "diffusers 0.42.1 MagCacheConfig defaults with FLUX_MAG_RATIOS",
    ),
    "taylorseer": (
        "taylorseer:cache_interval=5,disable_cache_before_step=3,max_order=1",
        "diffusers 0.42.1 TaylorSeerCacheConfig defaults (its FLUX example)",
    ),
}


def parse_cache_spec(text: str | CacheSpec | None) -> CacheSpec:
    """`off` | `none` | a preset name | `NAME[:key=value,...]` -> CacheSpec; ConfigError (one line) else.
    None and "" mean off. A CacheSpec passes through."""
    if isinstance(text, CacheSpec):
        return text
    if text is None or not text.strip():
        return CACHE_OFF
    raw = text.strip()
    if raw.lower() in OFF_NAMES:
        return CACHE_OFF
    if raw in PRESETS:
        return replace(parse_cache_spec(PRESETS[raw][0]), preset=raw)
    name, _, rest = raw.partition(":")
    name = name.strip()
    kind = METHODS.get(name)
    if kind is None:
        raise ConfigError(
            f"unknown cache {name!r}: use off, a preset ({', '.join(PRESETS)}) or "
            f"NAME[:key=value,...] with NAME one of {', '.join(METHODS)}"
        )
    types = {f.name: f.type for f in fields(kind)}
    values: dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, value = (s.strip() for s in item.partition("="))
        if not eq or key not in types:
            raise ConfigError(
                f"cache {name}: bad item {item!r}; keys are {', '.join(types)} (key=value, comma separated)"
            )
        values[key] = _convert(name, key, value, str(types[key]))
    config = kind(**values)
    config.check()
    return CacheSpec(name, config)


def _convert(method: str, key: str, value: str, type_name: str) -> Any:
    try:
        if type_name.startswith("int"):
            return None if value.lower() == "none" and "None" in type_name else int(value)
        if type_name.startswith("float"):
            return float(value)
    except ValueError:
        kind = type_name.split()[0]
        raise ConfigError(f"cache {method}: {key} must be {kind}, got {value!r}") from None
    return value


def _positive(what: str, value: float, *, allow_zero: bool = False) -> None:
    if not (value > 0 or (allow_zero and value == 0)) or value != value:
        raise ConfigError(f"{what} must be {'>= 0' if allow_zero else '> 0'}, got {value}")
