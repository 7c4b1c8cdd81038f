"""Content safety: the Checker protocol and its Verdict. The licence of FLUX.1 [dev] asks every
deployment to use filters or human review; checkers run on the prompt and input image before any GPU
work, and on the output image before it is written or served.

Built-in checkers: blocklist.py, nsfw.py, pixtral.py; policy.py composes them (`build_policy`), review.py
holds outputs for a person, models.py says where the filter models live.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

from PIL import Image

if TYPE_CHECKING:
    from .policy import SafetyPolicy, build_policy, resolve_policy

__all__ = ["Checker", "Role", "SafetyPolicy", "Verdict", "build_policy", "resolve_policy"]

Role = Literal["input", "output"]


@dataclass(frozen=True)
class Verdict:
    """One checker's answer on one prompt or image."""

    checker: str  # "nsfw", "pixtral", "blocklist", ...
    flagged: bool
    reason: str = ""  # human-readable, e.g. "nsfw score 0.93 >= 0.85" or "blocked term 'foo'"
    scores: Mapping[str, float] = field(default_factory=dict)

    def __str__(self) -> str:
        return f"{self.checker}: {self.reason or ('flagged' if self.flagged else 'ok')}"


class Checker(Protocol):
    """A content filter. Implementations must be safe to call from several threads."""

    name: str

    def check_prompt(self, text: str) -> Verdict: ...

    def check_image(self, image: Image.Image, role: Role) -> Verdict: ...


_LAZY = {"SafetyPolicy", "build_policy", "resolve_policy"}


def __getattr__(name: str) -> Any:
    """The policy is importable from here; it imports this module's Verdict, so it loads on first use."""
    if name in _LAZY:
        from . import policy

        return getattr(policy, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
