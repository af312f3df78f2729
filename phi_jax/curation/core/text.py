"""The one word rule of curation: what a "word" is wherever curation counts words.

    words("Don't stop: e.g. x_1 = Été 42")    -> ["dont", "stop", "eg", "x1", "Été", "42"]
    normalize("Don't  PANIC!\\n42")            -> "dont panic 42"
    word_spans("Don't -- stop")                -> [(0, 5), (9, 13)]

Dedup's shingles, decontamination's 13-grams, the synthesis gates (distinct-n, repeated openings)
and the Orca-2 leak check all split text here, so a document's words are the same words in every
room ("don't" is one word, "dont", everywhere; it used to be three different splits).

The rule is lm-eval's decontamination janitor's (itself GPT-3's), because decontamination must
find exactly the 13-grams that reference finds: ASCII letters are lowercased, ASCII punctuation
(`string.punctuation`, which includes "_" and "'") is deleted, and words are what `str.split()`
separates (any Unicode whitespace). So an apostrophe or a dot inside a word joins its halves
("don't" -> "dont", "e.g." -> "eg", "x.append(y)" -> "xappendy", "snake_case" -> "snakecase"), a
token of punctuation only vanishes ("--"), digits stay ("3.14" -> "314"), and non-ASCII characters
are left exactly as they are, case and typographic apostrophes included ("ÉTÉ" -> "ÉtÉ", "don’t",
"straße", "中文"). Changing the rule changes
every MinHash signature and every decontamination match: the tests hold it to lm-eval's janitor.
"""

from __future__ import annotations

import re
import string

_TABLE = str.maketrans(string.ascii_uppercase, string.ascii_lowercase, string.punctuation)
_CHUNK = re.compile(r"\S+")


def words(text: str) -> list[str]:
    """The words of `text` under the rule above."""
    return text.translate(_TABLE).split()


def normalize(text: str) -> str:
    """The words of `text` joined by single spaces: the form dedup hashes and n-grams are cut from."""
    return " ".join(words(text))


def word_spans(text: str) -> list[tuple[int, int]]:
    """[start, end) in `text` of each of its `words` (so a cut can be made in the original text)."""
    return [m.span() for m in _CHUNK.finditer(text) if m.group().translate(_TABLE)]
