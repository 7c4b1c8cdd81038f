"""The synthetic presets' tokenizers: character-level CLIP and T5 tokenizers built in memory (no files,
no downloads). Local checkpoints bring their own tokenizer files (checkpoints.py)."""

from __future__ import annotations

import string
from typing import Any

from ..errors import WeightsError
from .components import CLIP_MAX_LENGTH


def build_tokenizers(clip_vocab: int | None = None, t5_vocab: int | None = None) -> tuple[Any, Any]:
    """Character-level CLIP (byte-level BPE, no merges) and T5 (unigram) tokenizers, built in memory.

    clip_vocab / t5_vocab: pad each vocabulary with never-produced `<|unusedN|>` / `<unusedN>` entries
    to that size (CLIP's start and end tokens stay last, at 49406 and 49407 for 49408, as in CLIP-L).
    The real T5 tokenizer has 32100 entries for 32128 embedding rows; ours fills all 32128.
    """
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer, T5Tokenizer  # T5Tokenizer is the fast (tokenizers) one in 5.x

    chars = sorted(ByteLevel.alphabet())  # GPT-2/CLIP byte-level alphabet: 256 printable characters
    vocab: dict[str, int] = {}
    for suffix in ("", "</w>"):
        for c in chars:
            vocab[c + suffix] = len(vocab)
    specials = ("<|startoftext|>", "<|endoftext|>")
    for i in range(_padding(len(vocab) + len(specials), clip_vocab, "CLIP")):
        vocab[f"<|unused{i}|>"] = len(vocab)
    for s in specials:
        vocab[s] = len(vocab)
    clip = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=CLIP_MAX_LENGTH)

    alphabet = string.ascii_letters + string.digits + string.punctuation
    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("▁" + c, -2.0) for c in alphabet]
    pieces += [(c, -3.0) for c in alphabet]
    pieces.append(("▁", -4.0))
    pieces += [(f"<unused{i}>", -1000.0) for i in range(_padding(len(pieces), t5_vocab, "T5"))]
    t5 = T5Tokenizer(vocab=pieces, extra_ids=0)
    return clip, t5


def _padding(have: int, want: int | None, which: str) -> int:
    if want is None:
        return 0
    if want < have:
        raise WeightsError(f"a {which} vocabulary of {want} is smaller than the {have} entries it needs")
    return want - have
