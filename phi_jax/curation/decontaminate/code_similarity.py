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
        tokens, functions = _tokens(tree)
        for node, start, end in functions:
            segment = "\n".join(lines[node.lineno - 1:node.end_lineno])
            units.append(FunctionUnit(node.name, segment, _numbered(tokens[start:end])))
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
    return list(_numbered(_tokens(node)[0]))


_FUNCTIONS = (ast.FunctionDef, ast.AsyncFunctionDef)
_IDENTIFIER = "\x00"  # marks a raw identifier until `_numbered` replaces it
_LABELS = {  # node type -> its tokens besides the type name
    ast.Name: lambda n: (_IDENTIFIER + n.id,), ast.arg: lambda n: (_IDENTIFIER + n.arg,),
    ast.FunctionDef: lambda n: (_IDENTIFIER + n.name,), ast.AsyncFunctionDef: lambda n: (_IDENTIFIER + n.name,),
    ast.ClassDef: lambda n: (_IDENTIFIER + n.name,),
    ast.Global: lambda n: tuple(_IDENTIFIER + x for x in n.names),
    ast.Nonlocal: lambda n: tuple(_IDENTIFIER + x for x in n.names),
    ast.Attribute: lambda n: ("." + n.attr,), ast.keyword: lambda n: (f"{n.arg}=",),
    ast.Constant: lambda n: (type(n.value).__name__,),
}
_FIELDS: dict[type, tuple[str, ...]] = {}


def _tokens(tree: ast.AST) -> tuple[list[str], list[tuple[ast.AST, int, int]]]:
    """One pre-order pass: the tokens (identifiers raw) and each function's [start, end) in them
    (a subtree's tokens are contiguous in pre-order)."""
    out: list[str] = []
    functions: list[tuple[ast.AST, int, int]] = []

    def visit(n: ast.AST) -> None:
        cls = type(n)
        start = len(out)
        out.append(cls.__name__)
        label = _LABELS.get(cls)
        if label is not None:
            out.extend(label(n))
        fields = _FIELDS.get(cls)
        if fields is None:
            fields = _FIELDS[cls] = tuple(f for f in cls._fields if f not in _UNTYPED)
        for field in fields:
            value = getattr(n, field, None)
            if type(value) is list:
                if field == "body" and value and _is_docstring(value[0]):
                    value = value[1:]
                for child in value:
                    if isinstance(child, ast.AST) and not isinstance(child, _SKIP):
                        visit(child)
            elif isinstance(value, ast.AST) and not isinstance(value, _SKIP):
                visit(value)
        if cls in _FUNCTIONS:
            functions.append((n, start, len(out)))

    visit(tree)
    functions.sort(key=lambda f: f[1])
    return out, functions


def _is_docstring(node: ast.AST) -> bool:
    return (type(node) is ast.Expr and type(node.value) is ast.Constant
            and isinstance(node.value.value, str))


def _numbered(tokens: Sequence[str]) -> tuple[str, ...]:
    """Identifiers replaced by #0, #1, ... in order of first appearance."""
    names: dict[str, str] = {}
    return tuple(names.setdefault(t, f"#{len(names)}") if t[:1] == _IDENTIFIER else t for t in tokens)


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
