"""The blocklist: Unicode normalisation and word boundaries, as a table of cases."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.errors import ConfigError, ModeratedError
from engine.safety import build_policy
from engine.safety.blocklist import BlocklistChecker, normalize, read_blocklist

TERMS = ["cat", "red hat", "Straße", "naïve", "paypal", "x-ray"]

# (prompt, the 1-based number of the term it matches, or None)
CASES = [
    ("a cat", 1),
    ("A CAT!", 1),  # case
    ("cat.", 1),  # punctuation is a boundary
    ("concatenate", None),  # inside a word: no match
    ("cats", None),  # a word boundary, not a stem: plurals are their own terms
    ("bobcat", None),
    ("cat_walk", 1),  # underscore separates words
    ("ｃａｔ", 1),  # fullwidth (NFKC)
    ("c\u200bat", 1),  # zero-width space
    ("c\u00adat", 1),  # soft hyphen
    ("c\u2060a\ufefft", 1),  # word joiner, BOM
    ("сat", 1),  # Cyrillic с (U+0441)
    ("càt", 1),  # a diacritic
    ("c\u0301at", 1),  # a combining accent
    ("a red hat", 2),  # several words
    ("a red  hat", 2),  # any separator between them
    ("a red-hat", 2),
    ("a RED\nHAT", 2),
    ("a red, then a hat", None),  # not in order and adjacent
    ("a reddish hat", None),
    ("STRASSE", 3),  # casefold: ß -> ss
    ("strasse", 3),
    ("naive", 4),  # a listed diacritic also matches without it
    ("NAÏVE", 4),
    ("pаypаl", 5),  # two Cyrillic а
    ("рaypal", 5),  # Cyrillic р
    ("x ray", 6),  # a hyphenated term matches any separator
    ("xray", None),  # but not the words run together (documented)
    ("c a t", None),  # spaced-out letters are separate words (documented)
    ("", None),
]


@pytest.mark.parametrize(("prompt", "expected"), CASES)
def test_blocklist_cases(prompt: str, expected: int | None) -> None:
    assert BlocklistChecker(TERMS).match(prompt) == expected


def test_normalize_steps() -> None:
    assert normalize("Ｆｉ\u200b") == "fi"  # fullwidth F, i; zero-width space dropped
    assert normalize("ﬁ") == "fi"  # ligature
    assert normalize("Ⅻ") == "xii"  # Roman numeral (NFKC)
    assert normalize("Λambda") == "λambda"  # Greek lambda looks like no Latin letter: kept...
    assert normalize("οmega") == "omega"  # ...Greek omicron looks like o


def test_verdict_does_not_echo_the_term(tmp_path: Path) -> None:
    path = tmp_path / "terms.txt"
    path.write_text("# comment\n\nsecret word\n  cat  \n", encoding="utf-8")
    assert read_blocklist(path) == ["secret word", "cat"]
    policy = build_policy("blocklist", blocklist=path)
    with pytest.raises(ModeratedError) as e:
        policy.check_request("a SECRET-word please")
    v = e.value.verdict
    assert e.value.stage == "request" and v.checker == "blocklist" and v.flagged
    assert "secret" not in str(e.value).lower() and "#1" in v.reason
    policy.check_request("a secretive wording")
    assert policy.counts() == {("blocklist", "prompt", "flagged"): 1, ("blocklist", "prompt", "passed"): 1}


def test_blocklist_refusals(tmp_path: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="no terms"):
        read_blocklist(empty)
    with pytest.raises(ConfigError, match="cannot read"):
        read_blocklist(tmp_path / "missing.txt")
    with pytest.raises(ConfigError, match="needs --blocklist"):
        build_policy("blocklist")
    with pytest.raises(ConfigError, match="no usable terms"):
        BlocklistChecker(["!!!", "\u200b"])
