"""The rules every prompt meets, wherever it comes from: `kontext edit`, EditRequest (the Python API) and
both HTTP APIs call `check_prompt`, so each refuses the same prompts with the same words. Light to import
(no torch): the CLI checks a prompt before it loads anything.

The length limit is in characters, BFL's API's. The text encoders read at most the model's
`max_sequence_length` T5 tokens (512 on the real model) and 77 CLIP tokens of it, as every FLUX pipeline
does; a prompt longer than that is accepted and its tail is not seen by the model.
"""

from __future__ import annotations

from .errors import ConfigError

MAX_PROMPT_CHARS = 4096


def check_prompt(prompt: object) -> str:
    """`prompt` if an edit may run it; else a ConfigError whose one line says what to send instead."""
    if prompt is None:
        raise ConfigError("a prompt is required: say what to change, e.g. 'add a small red hat'")
    if not isinstance(prompt, str):
        raise ConfigError(f"prompt must be a string, got {type(prompt).__name__}")
    if not prompt.strip():
        raise ConfigError("the prompt is empty: say what to change, e.g. 'add a small red hat'")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise ConfigError(
            f"the prompt is {len(prompt)} characters, over the limit of {MAX_PROMPT_CHARS}: shorten it"
        )
    return prompt
