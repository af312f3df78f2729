"""MinHash signatures (rensa) and the LSH banding chosen from a Jaccard threshold.

    lsh = LshParams.choose(threshold=0.8, num_perm=256)   # 21 bands x 12 rows
    print(lsh.describe())                                 # the S-curve's key points
    sig = signatures(ngram_hashes(texts, 5), 256)         # [N, 256] uint32
    keys = band_keys(sig, lsh)                            # [N, 21] uint64: equal key = candidate

Two documents whose n-gram sets have Jaccard similarity J share a band (become candidates) with
probability P(J) = 1 - (1 - J^rows)^bands, the S-curve. `LshParams.choose` picks bands x rows
<= num_perm minimising the weighted area of false positives (P below the threshold) and false
negatives (1 - P above it), datasketch's `_optimal_param` rule. The default weights (0.2 / 0.8)
count a missed duplicate four times a wrongly caught one: with equal weights, at threshold 0.8 and
256 permutations, P(0.85) is only 0.79, so a fifth of the pairs 0.05 above the threshold survive;
with 0.2 / 0.8 it is 0.96 and P(0.6) is 0.045 (`describe` prints the points).

Signatures come from rensa's `RMinHash` (Rust; one flat buffer of pre-hashed n-grams per batch,
no Python object per n-gram), measured against datasketch in benchmarks/dedup.py. The fraction of
equal signature entries estimates J (standard error sqrt(J(1-J)/num_perm)); tests hold it to the
exact Jaccard of the n-gram sets.
"""

from __future__ import annotations

import array
import dataclasses
import functools
import math

import numpy as np

from phi_jax.curation.dedup.shingles import Ngrams, mix64
from phi_jax.errors import InputError, require

CURVE_POINTS = (0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 1.0)
_GRID = np.linspace(0.0, 1.0, 2001)


def probability(j, bands: int, rows: int):
    """P(two documents of Jaccard j share at least one band)."""
    return 1.0 - (1.0 - np.asarray(j, np.float64) ** rows) ** bands


def _integral(y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Trapezoid rule along the last axis."""
    if len(x) < 2:
        return np.zeros(y.shape[:-1])
    return np.sum((y[..., 1:] + y[..., :-1]) * np.diff(x) / 2.0, axis=-1)


@dataclasses.dataclass(frozen=True)
class LshParams:
    """A banding of MinHash signatures: `bands` bands of `rows` rows out of `num_perm` entries."""

    threshold: float
    num_perm: int
    bands: int
    rows: int
    fp_weight: float = 0.2
    fn_weight: float = 0.8

    @classmethod
    def choose(cls, threshold: float, num_perm: int = 256, fp_weight: float = 0.2,
               fn_weight: float = 0.8) -> "LshParams":
        """bands x rows <= num_perm minimising fp_weight * FP area + fn_weight * FN area."""
        return _choose(cls, float(threshold), int(num_perm), float(fp_weight), float(fn_weight))

    def probability(self, j):
        return probability(j, self.bands, self.rows)

    def areas(self) -> tuple[float, float]:
        """(false positive area below the threshold, false negative area above it)."""
        below, above = _GRID[_GRID <= self.threshold], _GRID[_GRID >= self.threshold]
        return (float(_integral(self.probability(below), below)),
                float(_integral(1.0 - self.probability(above), above)))

    def curve(self) -> dict[str, float]:
        """P(candidate | J) at the key points (and threshold - 0.2, threshold + 0.05)."""
        points = sorted({*CURVE_POINTS, round(self.threshold - 0.2, 4), round(min(self.threshold + 0.05, 1), 4),
                         self.threshold} - {x for x in CURVE_POINTS if x < self.threshold - 0.3})
        return {f"{j:g}": round(float(self.probability(j)), 4) for j in points if j > 0}

    def describe(self) -> str:
        fp, fn = self.areas()
        mid = (1.0 / self.bands) ** (1.0 / self.rows)
        points = "  ".join(f"J={j}: {p:.3f}" for j, p in self.curve().items())
        return (f"MinHash LSH: {self.bands} bands x {self.rows} rows ({self.bands * self.rows} of "
                f"{self.num_perm} permutations) for Jaccard threshold {self.threshold:g}; "
                f"S-curve midpoint {mid:.3f}\n  P(candidate | J)  {points}\n"
                f"  false positive area {fp:.4f}, false negative area {fn:.4f} (weights "
                f"{self.fp_weight:g} / {self.fn_weight:g})")

    def to_json(self) -> dict:
        fp, fn = self.areas()
        return {**dataclasses.asdict(self), "curve": self.curve(), "fp_area": round(fp, 6),
                "fn_area": round(fn, 6)}


@functools.lru_cache(maxsize=64)
def _choose(cls, threshold: float, num_perm: int, fp_weight: float, fn_weight: float) -> LshParams:
    if not 0.0 < threshold < 1.0:
        raise InputError(f"--threshold={threshold}: a Jaccard similarity strictly between 0 and 1 "
                         "(e.g. 0.8; exact duplicates are always removed)")
    if not 2 <= num_perm <= 4096:
        raise InputError(f"--num-perm={num_perm}: give 2..4096 permutations (e.g. 256)")
    if min(fp_weight, fn_weight) < 0 or fp_weight + fn_weight <= 0:
        raise InputError(f"false positive / negative weights {fp_weight}, {fn_weight}: give "
                         "non-negative weights, not both 0 (e.g. 0.2 and 0.8)")
    below, above = _GRID[_GRID <= threshold], _GRID[_GRID >= threshold]
    best = None
    for bands in range(1, num_perm + 1):
        rows = np.arange(1, num_perm // bands + 1)[:, None]
        fp = _integral(probability(below[None], bands, rows), below)
        fn = _integral(1.0 - probability(above[None], bands, rows), above)
        error = fp_weight * fp + fn_weight * fn
        i = int(np.argmin(error))
        if best is None or error[i] < best[0] - 1e-12:
            best = (float(error[i]), bands, i + 1)
    return cls(threshold, num_perm, best[1], best[2], fp_weight, fn_weight)


def signatures(grams: Ngrams, num_perm: int, seed: int = 0) -> np.ndarray:
    """MinHash signatures [N, num_perm] uint32 of each document's n-gram set (rensa's RMinHash).

    A document without n-grams (an empty text) gets the all-0xFFFFFFFF signature, so empty
    documents are each other's duplicates and nothing else's.
    """
    rensa = require("rensa", extra="data", purpose="MinHash deduplication")
    count = len(grams.offsets) - 1
    if count == 0:
        return np.zeros((0, num_perm), np.uint32)
    matrix = rensa.RMinHash.digest_matrix_from_flat_token_hashes(
        grams.hashes, grams.offsets.astype(np.uint64), num_perm, seed)
    flat = b"".join(array.array("I", row).tobytes() for row in matrix.to_rows())
    return np.frombuffer(flat, np.uint32).reshape(count, num_perm).copy()


def band_keys(sig: np.ndarray, lsh: LshParams) -> np.ndarray:
    """[N, bands] uint64: a hash of each band's rows, salted with the band's index so that equal
    rows in different bands never collide."""
    n = len(sig)
    rows = sig[:, :lsh.bands * lsh.rows].reshape(n, lsh.bands, lsh.rows).astype(np.uint64)
    with np.errstate(over="ignore"):
        weights = mix64(np.arange(1, lsh.rows + 1, dtype=np.uint64)) | np.uint64(1)
        salt = mix64(np.arange(1, lsh.bands + 1, dtype=np.uint64) + np.uint64(1 << 32))
        keys = np.sum(mix64(rows) * weights, axis=2, dtype=np.uint64) ^ salt
    return mix64(keys)


def estimate_jaccard(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The fraction of equal entries of two signatures (or rows of two [N, P] arrays)."""
    return np.mean(np.asarray(a) == np.asarray(b), axis=-1)


def standard_error(j: float, num_perm: int) -> float:
    return math.sqrt(max(j * (1.0 - j), 0.0) / num_perm)
