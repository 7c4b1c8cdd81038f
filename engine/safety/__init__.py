"""Content safety: the Checker protocol and its Verdict. The licence of FLUX.1 [dev] asks every
deployment to use filters or human review; checkers run on the prompt and input image before any GPU
work, and on the output image before it is written or served.

Built-in checkers: blocklist.py, nsfw.py, pixtral.py; policy.py composes them (`build_policy`), review.py
holds outputs for a person, models.py says where the filter models live.
"""

from __future__ import annotations

from .checker import Checker, Role, Verdict
from .policy import SafetyPolicy, build_policy, resolve_policy

__all__ = ["Checker", "Role", "SafetyPolicy", "Verdict", "build_policy", "resolve_policy"]
