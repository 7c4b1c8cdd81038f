"""The `blocklist` checker: prompt terms from a file, matched case-insensitively on word boundaries after
Unicode normalisation, so that width, case, accents, zero-width characters and common look-alike letters
do not slip a listed term past it."""

from __future__ import annotations

import logging
import re
import unicodedata
from collections.abc import Iterable
from pathlib import Path

from PIL import Image

from ..errors import ConfigError
from .checker import Role, Verdict

log = logging.getLogger(__name__)

# Cyrillic and Greek letters that render like a Latin lowercase letter (a subset of Unicode's
# confusables.txt, UTS #39, for the letters a-z; the full skeleton needs that 600 KB table).
_CONFUSABLES = str.maketrans(
    {
        "а": "a", "ɑ": "a", "α": "a",  # Cyrillic a, Latin alpha, Greek alpha
        "в": "b", "ь": "b",
        "с": "c", "ϲ": "c",
        "ԁ": "d",
        "е": "e", "ё": "e", "ε": "e",
        "ғ": "f",
        "ɡ": "g",
        "һ": "h",
        "і": "i", "ι": "i", "ı": "i", "ӏ": "i",
        "ј": "j", "ϳ": "j",
        "κ": "k", "к": "k",
        "м": "m",
        "п": "n", "η": "n",
        "о": "o", "ο": "o", "σ": "o",
        "р": "p", "ρ": "p",
        "ԛ": "q",
        "г": "r",
        "ѕ": "s",
        "т": "t", "τ": "t",
        "υ": "u", "ս": "u",
        "ν": "v", "ѵ": "v",
        "ԝ": "w", "ω": "w",
        "х": "x", "χ": "x",
        "у": "y", "γ": "y",
        "ᴢ": "z",
    }
)  # fmt: skip
_WORD = re.compile(r"[^\W_]+")  # runs of letters and digits; everything else separates words


def normalize(text: str) -> str:
    """The form both the prompt and the terms are compared in.

    1. NFKC: compatibility forms fold to their plain letters (fullwidth `ｂａｄ`, ligature `ﬁ`, `①`).
    2. Drop format characters (category Cf): zero-width space/joiners, word joiner, soft hyphen, BOM,
       bidi controls, which are invisible and would otherwise split a word.
    3. casefold (`ß` -> `ss`, `Σ` -> `σ`).
    4. Strip diacritics: NFD, drop combining marks (category Mn), so `bàd` and `bad` compare equal.
    5. Map Cyrillic/Greek look-alikes of Latin letters to Latin (`раypal` -> `paypal`).
    """
    text = unicodedata.normalize("NFKC", text)
    text = "".join(c for c in text if unicodedata.category(c) != "Cf")
    text = unicodedata.normalize("NFD", text.casefold())
    text = "".join(c for c in text if unicodedata.category(c) != "Mn")
    return unicodedata.normalize("NFC", text).translate(_CONFUSABLES)


def words(text: str) -> tuple[str, ...]:
    """The normalised words of `text`, in order (punctuation, spaces and underscores separate them)."""
    return tuple(_WORD.findall(normalize(text)))


def read_blocklist(path: str | Path) -> list[str]:
    """Terms from a UTF-8 file, one per line; blank lines and lines starting with `#` are skipped."""
    p = Path(path)
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"--blocklist {p}: cannot read it as UTF-8 text ({e}); one term per line") from e
    terms = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not terms:
        raise ConfigError(f"--blocklist {p}: no terms in it (one term per line, # starts a comment)")
    return terms


class BlocklistChecker:
    """Flags a prompt that contains any listed term as whole words: `cat` matches "a Cat!" but not
    "concatenate"; a term of several words matches them in order, whatever separates them."""

    name = "blocklist"
    subjects = frozenset({"prompt"})

    def __init__(self, terms: Iterable[str]) -> None:
        self._terms: dict[str, list[tuple[int, tuple[str, ...]]]] = {}  # first word -> (number, words)
        count = 0
        for number, term in enumerate(terms, start=1):
            ws = words(term)
            if not ws:
                log.warning(
                    "blocklist term #%d has no letters or digits after normalisation; skipped", number
                )
                continue
            self._terms.setdefault(ws[0], []).append((number, ws))
            count += 1
        if count == 0:
            raise ConfigError("the blocklist has no usable terms (each needs at least one letter or digit)")
        self.size = count

    @classmethod
    def from_file(cls, path: str | Path) -> BlocklistChecker:
        return cls(read_blocklist(path))

    def match(self, text: str) -> int | None:
        """The number (1-based line among the terms) of the first listed term in `text`, or None."""
        ws = words(text)
        for i, w in enumerate(ws):
            for number, term in self._terms.get(w, ()):
                if ws[i : i + len(term)] == term:
                    return number
        return None

    def check_prompt(self, text: str) -> Verdict:
        number = self.match(text)
        if number is None:
            return Verdict(self.name, False)
        # The term itself is not echoed: a reason reaches logs and API clients, and naming the
        # matched term would teach a client how to get around the list.
        return Verdict(self.name, True, f"prompt matches blocklist term #{number}", {"term": float(number)})

    def check_image(self, image: Image.Image, role: Role) -> Verdict:
        return Verdict(self.name, False, "checks prompts only")
