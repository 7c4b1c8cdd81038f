"""SafetyPolicy: which checkers run, whether outputs are held for review, and the verdict counters. The
one object the CLI, the Python API and the server consult: `check_request` before any GPU work,
`check_output` before an image is written or served, `review` to hold what passed for a person."""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from ..errors import ConfigError, ModeratedError
from .checker import Checker, Verdict

log = logging.getLogger(__name__)

SAFETY_NAMES = ("pixtral", "nsfw", "blocklist", "review", "off")
_COST = {"blocklist": 0, "nsfw": 1, "pixtral": 2}  # cheapest first: a flag stops the rest

LICENCE_WARNING = (
    "content safety is OFF for the real FLUX.1 Kontext [dev] model: its licence requires content filters "
    "or human review of outputs before they are shared (use --safety pixtral|nsfw|blocklist|review)"
)


class SafetyPolicy:
    """Checkers (run in order, cheapest first, until one flags) and the review flag.

    Thread safety: the checkers are; the counters take a lock.
    """

    def __init__(self, checkers: Sequence[Checker] = (), *, review: bool = False) -> None:
        self.checkers = tuple(sorted(checkers, key=lambda c: _COST.get(c.name, 3)))
        self.review = review
        self._counts: Counter[tuple[str, str, str]] = Counter()
        self._lock = threading.Lock()

    @property
    def names(self) -> tuple[str, ...]:
        """What `--safety` would say to build this policy: ("off",) when nothing runs."""
        names = tuple(c.name for c in self.checkers) + (("review",) if self.review else ())
        return names or ("off",)

    @property
    def off(self) -> bool:
        return not self.checkers and not self.review

    def __repr__(self) -> str:
        return f"SafetyPolicy({','.join(self.names)})"

    # ------------------------------------------------------------------ the checks

    def check_request(self, prompt: str, images: Sequence[Image.Image] = ()) -> None:
        """Raise ModeratedError("request", verdict) if a checker flags the prompt or an input image."""
        for c in self.checkers:
            if _checks(c, "prompt"):
                self._settle(c.check_prompt(prompt), "prompt", "request")
        for image in images:
            for c in self.checkers:
                if _checks(c, "input"):
                    self._settle(c.check_image(image, "input"), "input", "request")

    def check_output(self, image: Image.Image) -> None:
        """Raise ModeratedError("content", verdict) if a checker flags the output image."""
        for c in self.checkers:
            if _checks(c, "output"):
                self._settle(c.check_image(image, "output"), "output", "content")

    def _settle(self, verdict: Verdict, subject: str, stage: str) -> None:
        with self._lock:
            self._counts[(verdict.checker, subject, "flagged" if verdict.flagged else "passed")] += 1
        if verdict.flagged:
            log.info("%s moderated: %s", subject, verdict)
            raise ModeratedError(stage, verdict)

    def counts(self) -> dict[tuple[str, str, str], int]:
        """Verdicts so far by (checker, subject: prompt|input|output, outcome: passed|flagged), for metrics.
        The free-text reason is in the log and the ModeratedError, not a label: it is unbounded."""
        with self._lock:
            return dict(self._counts)


def _checks(checker: Checker, subject: str) -> bool:
    return subject in getattr(checker, "subjects", ("prompt", "input", "output"))


def parse_names(names: str | Sequence[str]) -> tuple[str, ...]:
    """ "nsfw,blocklist" or ["nsfw", "blocklist"] -> ("nsfw", "blocklist"), checked."""
    items = names.split(",") if isinstance(names, str) else list(names)
    out = tuple(dict.fromkeys(n.strip().lower() for n in items if n.strip()))
    unknown = [n for n in out if n not in SAFETY_NAMES]
    if unknown or not out:
        raise ConfigError(f"--safety takes a comma list of {', '.join(SAFETY_NAMES)}; got {names!r}")
    if "off" in out and len(out) > 1:
        raise ConfigError(f"--safety off cannot be combined with other checkers; got {','.join(out)}")
    return out


def build_policy(
    names: str | Sequence[str],
    *,
    models_dir: str | Path | None = None,
    blocklist: str | Path | None = None,
    device: str = "cpu",
) -> SafetyPolicy:
    """The policy `--safety NAMES` asks for, its models loaded now (a missing one is a FilterModelError
    naming what to download). `pixtral` includes the NSFW classifier, as BFL's filter does, so `nsfw`
    beside it adds nothing. `blocklist` needs the `blocklist` file; `review` holds every output."""
    wanted = parse_names(names)
    checkers: list[Checker] = []
    if "blocklist" in wanted:
        if blocklist is None:
            raise ConfigError("--safety blocklist needs --blocklist FILE (one term per line)")
        from .blocklist import BlocklistChecker

        checkers.append(BlocklistChecker.from_file(blocklist))
    elif blocklist is not None:
        raise ConfigError("--blocklist is given but --safety does not include blocklist")
    if "pixtral" in wanted:
        from .pixtral import PixtralChecker

        checkers.append(PixtralChecker.from_models_dir(models_dir, device=device))
    elif "nsfw" in wanted:
        from .nsfw import NsfwChecker

        checkers.append(NsfwChecker.from_models_dir(models_dir, device=device))
    return SafetyPolicy(checkers, review="review" in wanted)


def default_names(synthetic: bool) -> tuple[str, ...]:
    """With no --safety: `off` for the random-weight presets (nothing to protect, and the quick start
    stays one command), `review` for the real model (its licence asks for filters or review)."""
    return ("off",) if synthetic else ("review",)


def resolve_policy(safety: SafetyPolicy | str | Sequence[str] | None, *, synthetic: bool) -> SafetyPolicy:
    """What `engine.load(..., safety=...)` runs: a policy as given, names built with build_policy (filters
    that need model folders or a blocklist must come as a built policy), or None for the default. Turning
    safety off for the real model is logged as a licence warning."""
    if isinstance(safety, SafetyPolicy):
        policy = safety
    else:
        policy = build_policy(default_names(synthetic) if safety is None else safety)
    if policy.off and not synthetic:
        log.warning(LICENCE_WARNING)
    elif policy.review and not synthetic:
        log.info("safety: outputs are held for human review (%s)", ",".join(policy.names))
    return policy
