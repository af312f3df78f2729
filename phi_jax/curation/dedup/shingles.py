"""Vectorised n-gram hashing of normalised text, shared by dedup and decontamination.

    normalize("Don't  PANIC!\\n42")            -> "dont panic 42"   (`core.text.normalize`)
    grams = ngram_hashes(["a b c d e f"], 5)   # word 5-grams: hashes [2], offsets [0, 2]

The normalisation is curation's one word rule, lm-eval's decontamination janitor's (itself GPT-3's):
ASCII letters are lowercased, ASCII punctuation (`string.punctuation`) is deleted (so "don't" ->
"dont"), and words are what `str.split()` separates (any Unicode whitespace). Non-ASCII letters
are left as they are (`phi_jax.curation.core.text`).
`normalize` is the definition; `ngram_hashes` computes the same words without a Python loop per
word or n-gram: the normalised texts are joined into one buffer, word (or character) boundaries
found with numpy, and every n-gram hashed in O(1) from a prefix polynomial hash (mod 2^64) of the
buffer, then mixed with splitmix64's finaliser. An n-gram never crosses a document boundary.

Letters: N documents, L buffer length (bytes for words, code points for characters), G n-grams.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Sequence

import numpy as np

UNITS = ("word", "char")
_BASE = np.uint64(0x9E3779B97F4A7C15)  # odd, so it has an inverse mod 2^64
_BASE_INV = np.uint64(pow(int(_BASE), -1, 1 << 64))
_POWERS: dict[str, np.ndarray] = {}


def exact_hashes(normalized: Sequence[str]) -> np.ndarray:
    """A 64-bit digest (blake2b) of each normalised text: equal texts, equal digests. [N] uint64."""
    return np.frombuffer(b"".join(hashlib.blake2b(t.encode("utf-8", "surrogatepass"), digest_size=8).digest()
                                  for t in normalized), np.uint64).copy()


@dataclasses.dataclass(frozen=True)
class Ngrams:
    """The n-grams of N documents, flat: document d's are hashes[offsets[d]:offsets[d+1]].

    Attributes:
      hashes: [G] uint64, in document order, then position order.
      offsets: [N+1] int64.
      starts: [G] int64, the first unit (word or character) of each n-gram within its document.
    """

    hashes: np.ndarray
    offsets: np.ndarray
    starts: np.ndarray


def ngram_hashes(normalized: Sequence[str], n: int, unit: str = "word", *, short: bool = True) -> Ngrams:
    """Hashes of every n-gram (of words or characters) of each normalised text.

    Args:
      normalized: texts already passed through `core.text.normalize`.
      n: units per n-gram (>= 1).
      unit: "word" or "char".
      short: a text with fewer than n units (but at least one) gives one n-gram of all of them
        (dedup: short documents still compare); False gives none (decontamination: a match must
        be n words long).
    """
    count = len(normalized)
    if count == 0:
        return Ngrams(np.zeros(0, np.uint64), np.zeros(1, np.int64), np.zeros(0, np.int64))
    # "\n" starts the buffer and ends every document (it never occurs inside a normalised one), so
    # every unit starts at >= 1 and the prefix sums below need no leading zero.
    joined = "\n" + "\n".join(normalized) + "\n"
    if unit == "word":
        buf = np.frombuffer(joined.encode("utf-8", "surrogatepass"), np.uint8)
        edge = np.diff(((buf == 32) | (buf == 10)).view(np.int8))  # -1: a word starts, +1: it ends
        starts = np.flatnonzero(edge == -1) + 1
        ends = np.flatnonzero(edge == 1) + 1
    elif unit == "char":
        buf = np.frombuffer(joined.encode("utf-32-le", "surrogatepass"), np.uint32)
        starts = np.flatnonzero(buf != 10)
        ends = starts + 1
    else:
        raise ValueError(f"unit={unit!r}; choose one of {', '.join(UNITS)}")
    doc_ends = np.flatnonzero(buf == 10)[1:]  # [N]
    unit_doc = np.searchsorted(doc_ends, starts)  # the document of each unit
    units = np.bincount(unit_doc, minlength=count).astype(np.int64)  # [N]
    first = np.concatenate([[0], np.cumsum(units)[:-1]]).astype(np.int64)
    within = np.arange(len(starts), dtype=np.int64) - first[unit_doc]
    last_start = units - n if not short else np.maximum(units - n, 0)
    w0 = np.flatnonzero(within <= last_start[unit_doc])  # an n-gram starts at this unit
    w1 = np.minimum(w0 + n - 1, (first + units - 1)[unit_doc[w0]])
    hashes = _span_hashes(buf, starts[w0], ends[w1])
    per_doc = np.bincount(unit_doc[w0], minlength=count)
    offsets = np.concatenate([[0], np.cumsum(per_doc)]).astype(np.int64)
    return Ngrams(hashes, offsets, within[w0])


def _span_hashes(buf: np.ndarray, s: np.ndarray, e: np.ndarray) -> np.ndarray:
    """splitmix64(sum_{j in [s, e)} (buf[j] + 1) * B^(j - s)) for each span (s >= 1), mod 2^64."""
    length = len(buf)
    with np.errstate(over="ignore"):
        prefix = buf.astype(np.uint64)
        prefix += np.uint64(1)
        prefix *= _powers("pow", _BASE, length)
        np.cumsum(prefix, out=prefix)  # prefix[i] = the sum over [0, i]
        h = prefix[e - 1] - prefix[s - 1]
        h *= _powers("inv", _BASE_INV, length)[s]
        return mix64(h)


def mix64(h: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser (a bijection of uint64 that scatters every input bit)."""
    with np.errstate(over="ignore"):
        h = h ^ (h >> np.uint64(30))
        h = h * np.uint64(0xBF58476D1CE4E5B9)
        h = h ^ (h >> np.uint64(27))
        h = h * np.uint64(0x94D049BB133111EB)
        return h ^ (h >> np.uint64(31))


def _powers(name: str, base: np.uint64, length: int) -> np.ndarray:
    """base^0 .. base^(length-1) mod 2^64, from a table grown by doubling and kept."""
    table = _POWERS.get(name)
    if table is None or len(table) < length:
        size = max(length, 2 * len(table) if table is not None else 1 << 16)
        table = np.full(size, base, np.uint64)
        table[0] = 1
        with np.errstate(over="ignore"):
            table = np.cumprod(table, dtype=np.uint64)
        _POWERS[name] = table
    return table[:length]
