"""Typed errors. Each one says what went wrong and the command or change that fixes it."""

from __future__ import annotations


class KontextError(Exception):
    """Base class of every error this package raises on purpose."""


class ConfigError(KontextError, ValueError):
    """A setting or argument is out of range (steps, guidance, size, preset name...)."""


class WeightsError(KontextError):
    """A checkpoint is missing, incomplete, or not in a format we load."""


class ImageError(KontextError, ValueError):
    """An input image cannot be used (format, size, corruption)."""


class BucketError(KontextError, ValueError):
    """A resolution or shape does not belong to any known bucket family."""


class ShapeNotServedError(KontextError):
    """An engine was asked to run a shape key it was not built for."""


class BuildError(KontextError):
    """A build stage failed (export, quantization, compilation, verification)."""


class VerificationError(BuildError):
    """A built artifact differs from the PyTorch reference beyond its recipe's bound."""


class ManifestError(KontextError):
    """A manifest is missing, unreadable, or does not match this machine or these weights."""


class BackendUnavailableError(KontextError):
    """A backend's library or hardware is not present on this machine."""


class ModeratedError(KontextError):
    """A safety checker flagged the request (the prompt or an input image: BFL's "Request Moderated") or
    the output image ("Content Moderated"). Nothing was written or returned; `verdict` says who and why."""

    def __init__(self, stage: str, verdict: object) -> None:
        if stage not in ("request", "content"):
            raise ValueError(f"stage must be 'request' or 'content', got {stage!r}")
        self.stage = stage  # "request": prompt or input image flagged, no GPU time spent; "content": output
        self.verdict = verdict  # engine.safety.Verdict
        super().__init__(f"{'request' if stage == 'request' else 'output'} moderated: {verdict}")


class FilterModelError(WeightsError):
    """A content-filter model (the NSFW classifier, Pixtral) is missing from --safety-models or unreadable.
    The message names the Hugging Face repository to download and the folder it must go to."""


class ProvenanceError(KontextError):
    """C2PA signing cannot be set up or failed: a certificate or key file is missing or unreadable, the
    algorithm is unknown, or c2pa-python refused the manifest."""
