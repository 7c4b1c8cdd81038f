"""Known third-party noise, dropped where engine imports those libraries: log lines that say nothing
about the user's input or our results, printed by torchao, torch and diffusers on every import or load.
Each is one exact logger and one message start, so nothing else those libraries say is hidden, and no
warning filter is set process-wide. `show(True)` (the CLI's -v) lets them through again.

- torchao: "Failed to load .../_C_cutlass_90a.abi3.so" (its CUDA kernels, on a machine without them);
- torch: "<enum ...> is an Enum subclass and is now natively supported by torch.compile" (torchao's
  pytree registration, deprecated in torch 2.13);
- diffusers: "Unable to import `torchao` Tensor objects" (the same missing libraries) and "There are
  modules in ... that should be kept in float32: []." (an empty list: nothing to keep).
"""

from __future__ import annotations

import logging

KNOWN: dict[str, tuple[str, ...]] = {  # logger name -> message starts (and an end, for the float32 note)
    "torchao": ("Failed to load ",),
    "torch.utils._pytree": ("%s is an Enum subclass and is now natively supported",),
    "diffusers.quantizers.torchao.torchao_quantizer": ("Unable to import `torchao` Tensor objects",),
    "diffusers.models.modeling_utils": ("There are modules in ",),
}
_FLOAT32_NOTE_END = "should be kept in float32: []. "


class _KnownNoise(logging.Filter):
    shown = False

    def __init__(self, starts: tuple[str, ...]) -> None:
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        if _KnownNoise.shown:
            return True
        text = str(record.msg)
        if not text.startswith(self.starts):
            return True
        if text.startswith("There are modules in "):
            return _FLOAT32_NOTE_END not in text  # a non-empty list is a real note
        return False


def install() -> None:
    """Attach the filters to their loggers (once; the loggers exist before their libraries import)."""
    for name, starts in KNOWN.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _KnownNoise) for f in logger.filters):
            logger.addFilter(_KnownNoise(starts))


def show(enabled: bool) -> None:
    """Let the known noise through (True: the CLI's -v) or drop it again (False, the default)."""
    _KnownNoise.shown = enabled
