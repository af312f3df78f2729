"""phi-1's code decontamination: AST similarity and embedding distance to benchmark solutions.

n-grams miss paraphrased code: a HumanEval solution with its variables renamed shares no 13-gram
with the original. phi-1 therefore also compared code by the edit distance between ASTs and by the
distance between embeddings. Here:

  * `function_units(text)`: every function defined in a document, which is Python as a whole or
    holds fenced ```python blocks (synthetic textbooks);
  * `ast_tokens(fn)`: the function's AST as a token sequence with identifiers numbered by first
    appearance (so a consistent renaming changes nothing), literals reduced to their type,
    docstrings and type hints dropped; attribute and keyword names are kept (they name an API);
  * `similarity(a, b)` = 1 - Levenshtein(a, b) / max(len): 1.0 for a renamed copy;
  * `AstIndex.best(tokens)`: the most similar benchmark function, pruned by a multiset bound
    (edit similarity <= shared tokens / max length) so most pairs never reach the edit distance;
  * `EmbeddingIndex`: cosine similarity of mean-pooled embeddings (`phi_jax.inference.embed`) of
    any --embedder model. Its threshold has to be set for that model; none is calibrated here.
"""

from __future__ import annotations

import ast
import dataclasses
import re
from typing import Iterator, Sequence

import numpy as np

_FENCE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)```", re.S | re.I)
_SKIP = (ast.expr_context,)
_UNTYPED = ("annotation", "returns", "type_comment")  # type hints are left out: adding them is a paraphrase


@dataclasses.dataclass(frozen=True)
class FunctionUnit:
    name: str
    source: str
    tokens: tuple[str, ...]


def function_units(text: str) -> list[FunctionUnit]:
    """The functions (methods and nested ones too) of a Python text or its fenced code blocks."""
    if "def " not in text:
        return []
    whole = _parse(text)
    trees = [(text, whole)] if whole is not None else [
        (m.group(1), _parse(m.group(1))) for m in _FENCE.finditer(text)]
    units = []
    for source, tree in trees:
        if tree is None:
            continue
        lines = source.splitlines()
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                segment = "\n".join(lines[node.lineno - 1:node.end_lineno])
                units.append(FunctionUnit(node.name, segment, tuple(ast_tokens(node))))
    return units


def benchmark_functions(items: Sequence[tuple[str, str]]) -> list[tuple[str, FunctionUnit]]:
    """(item name, function) for every function of every (item name, python source)."""
    return [(name, unit) for name, source in items for unit in function_units(source)]


def _parse(text: str) -> ast.AST | None:
    try:
        return ast.parse(text)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None


def ast_tokens(node: ast.AST) -> list[str]:
    """The normalised pre-order token sequence of `node` (see the module docstring)."""
    names: dict[str, str] = {}
    out: list[str] = []

    def name(identifier: str) -> str:
        return names.setdefault(identifier, f"#{len(names)}")

    def visit(n: ast.AST) -> None:
        out.append(type(n).__name__)
        if isinstance(n, ast.Name):
            out.append(name(n.id))
        elif isinstance(n, ast.arg):
            out.append(name(n.arg))
        elif isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out.append(name(n.name))
        elif isinstance(n, (ast.Global, ast.Nonlocal)):
            out.extend(name(x) for x in n.names)
        elif isinstance(n, ast.Attribute):
            out.append("." + n.attr)
        elif isinstance(n, ast.keyword):
            out.append(f"{n.arg}=")
        elif isinstance(n, ast.Constant):
            out.append(type(n.value).__name__)
        body = getattr(n, "body", None)
        docstring = (isinstance(body, list) and body and isinstance(body[0], ast.Expr)
                     and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str))
        for field, value in ast.iter_fields(n):
            if field in _UNTYPED:
                continue
            for child in value if isinstance(value, list) else [value]:
                if isinstance(child, ast.AST) and not isinstance(child, _SKIP) and not (docstring and child is body[0]):
                    visit(child)

    visit(node)
    return out


def levenshtein(a: Sequence, b: Sequence) -> int:
    """Edit distance of two sequences: Myers / Hyyro's bit-parallel algorithm (O(len(a)) big-int
    operations of len(b) bits)."""
    if len(a) < len(b):
        a, b = b, a
    m = len(b)
    if m == 0:
        return len(a)
    peq: dict = {}
    for i, c in enumerate(b):
        peq[c] = peq.get(c, 0) | (1 << i)
    full, top = (1 << m) - 1, 1 << (m - 1)
    pv, mv, score = full, 0, m
    for c in a:
        eq = peq.get(c, 0)
        xv = eq | mv
        xh = (((eq & pv) + pv) ^ pv) | eq
        ph = (mv | ~(xh | pv)) & full
        mh = pv & xh
        if ph & top:
            score += 1
        elif mh & top:
            score -= 1
        ph = ((ph << 1) | 1) & full
        mh = (mh << 1) & full
        pv = (mh | ~(xv | ph)) & full
        mv = ph & xv
    return score


def similarity(a: Sequence, b: Sequence) -> float:
    longest = max(len(a), len(b))
    return 1.0 - levenshtein(a, b) / longest if longest else 1.0


class AstIndex:
    """Benchmark functions, for `best(tokens)`.

    Args:
      functions: (benchmark item name, function) pairs (see `benchmark_functions`).
      min_tokens: functions shorter than this are not indexed (and units shorter are not
        compared): a one-line body matches too many unrelated functions.
    """

    def __init__(self, functions: Sequence[tuple[str, FunctionUnit]], min_tokens: int = 24):
        self.min_tokens = min_tokens
        kept = [(name, unit) for name, unit in functions if len(unit.tokens) >= min_tokens]
        self.skipped = len(functions) - len(kept)
        self.names = [name for name, _ in kept]
        self.functions = [unit.tokens for _, unit in kept]
        vocab = sorted({t for f in self.functions for t in f})
        self._vocab = {t: i for i, t in enumerate(vocab)}
        self._bags = np.zeros((len(self.functions), len(vocab) + 1), np.int32)  # [F, V+1]
        for row, tokens in enumerate(self.functions):
            np.add.at(self._bags[row], self._ids(tokens), 1)
        self._lengths = np.array([len(f) for f in self.functions], np.float64)

    def _ids(self, tokens: Sequence[str]) -> np.ndarray:
        other = len(self._vocab)
        return np.array([self._vocab.get(t, other) for t in tokens], np.int64)

    def best(self, tokens: Sequence[str], threshold: float) -> tuple[int, float] | None:
        """(function index, similarity) of the first function reaching `threshold`, trying them in
        order of their upper bound; None when none does."""
        if len(tokens) < self.min_tokens or not self.functions:
            return None
        bag = np.bincount(self._ids(tokens), minlength=self._bags.shape[1])
        bag[-1] = 0  # tokens no benchmark function has are shared with none
        shared = np.minimum(self._bags, bag[None]).sum(axis=1)
        bound = shared / np.maximum(self._lengths, len(tokens))
        for f in np.argsort(-bound, kind="stable"):
            if bound[f] < threshold:
                break
            score = similarity(tokens, self.functions[f])
            if score >= threshold:
                return int(f), score
        return None


class EmbeddingIndex:
    """Cosine similarity of embeddings to the benchmark functions' (an `Embedder` from
    phi_jax.inference.embed, or any callable texts -> [N, D] array)."""

    def __init__(self, embedder, functions: Sequence[tuple[str, FunctionUnit]]):
        self.embed = embedder
        self.names = [name for name, _ in functions]
        self._vectors = self._unit(embedder([unit.source for _, unit in functions]))  # [F, D]

    @staticmethod
    def _unit(x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, np.float64)
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

    def best(self, sources: Sequence[str]) -> Iterator[tuple[int, float]]:
        """(index of the most similar benchmark item, its cosine) for each source."""
        if not len(sources) or not self.names:
            return iter(())
        cos = self._unit(self.embed(list(sources))) @ self._vectors.T  # [U, F]
        best = np.argmax(cos, axis=1)
        return zip(best.tolist(), cos[np.arange(len(best)), best].tolist())
