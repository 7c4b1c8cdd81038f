"""What a content checker is: the Checker protocol, its Verdict, and the role of a checked image."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal, Protocol

from PIL import Image

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
