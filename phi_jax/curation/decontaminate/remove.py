"""Benchmark decontamination: 13-gram cuts (GPT-3 / lm-eval's janitor) and phi-1's code checks.

    result = decontaminate(records, against=["humaneval", "evals/mmlu.jsonl"])   # in memory
    result.kept, result.removed                        # records kept (some cut); removed.jsonl rows
    run_stage(decontaminate_stage(["humaneval"]), "data/*.jsonl", "out/clean")

n-grams: texts are normalised as lm-eval's janitor does (`core.text.normalize`: ASCII lowercase,
`string.punctuation` deleted, split on whitespace) and every word 13-gram of a document that is
also a 13-gram of an evaluation item is a match (hashes found with one sorted search per batch,
then the words compared, so a hash collision never cuts). Each match cuts `window` (200)
characters of the original text on both sides; overlapping cuts merge. A document split more than
`max_splits` (10) times is dropped whole; of a cut document the pieces shorter than `min_piece`
(200) characters are discarded (GPT-3), the rest joined by a blank line. Evaluation items shorter
than 13 words cannot match and are counted in the manifest. Unlike lm-eval, which counts every
matching n-gram towards the 10, splits are counted after merging (a copied paragraph is one cut).

code: documents that are Python or hold fenced Python blocks have each function compared with the
benchmark functions (`code_similarity`): AST similarity >= `ast_threshold` (0.9: a renamed copy scores
1.0; of the embedded stdlib corpus's 15,116 functions the closest to a HumanEval solution scores
0.88) drops the document, as does, with an `embedder`, embedding cosine >= `embedding_threshold`
(0.95 by default, uncalibrated: set it for the model you embed with).

Every change is a row of removed.jsonl: the document, what was done (cut / dropped), and for every
cut the benchmark item and the n-gram that matched (or the function and its similarity).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import numpy as np

from phi_jax.curation.core.stage import Counts, Stage
from phi_jax.curation.core.text import normalize, word_spans
from phi_jax.curation.decontaminate import code_similarity, eval_sets
from phi_jax.curation.dedup import shingles
from phi_jax.errors import InputError

REMOVED = "removed.jsonl"


@dataclasses.dataclass(frozen=True)
class DecontamConfig:
    """What decides the output (see the module docstring)."""

    against: tuple[str, ...] = ("humaneval",)
    ngram: int = 13
    window: int = 200
    max_splits: int = 10
    min_piece: int = 200
    code_check: bool = True
    ast_threshold: float = 0.9
    min_ast_tokens: int = 24
    embedder: str | None = None
    embedding_threshold: float = 0.95
    embed_max_tokens: int = 512

    def __post_init__(self):
        object.__setattr__(self, "against", tuple(eval_sets.parse_specs(self.against)))
        for name, low in (("ngram", 1), ("window", 0), ("max_splits", 0), ("min_piece", 0), ("min_ast_tokens", 1)):
            if getattr(self, name) < low:
                raise InputError(f"--{name.replace('_', '-')}={getattr(self, name)}: must be >= {low}")
        for name in ("ast_threshold", "embedding_threshold"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise InputError(f"--{name.replace('_', '-')}={getattr(self, name)}: a similarity in (0, 1]")


class NgramIndex:
    """The normalised word n-grams of evaluation items: sorted unique hashes, and for each the
    first item and position it came from."""

    def __init__(self, items: Sequence[eval_sets.EvalItem], n: int):
        self.n, self.items = n, list(items)
        normalized = [normalize(item.text) for item in self.items]
        self.words = [t.split() for t in normalized]
        self.too_short = sum(len(w) < n for w in self.words)
        grams = shingles.ngram_hashes(normalized, n, short=False)
        item_of = np.repeat(np.arange(len(self.items)), np.diff(grams.offsets))
        self.hashes, first = np.unique(grams.hashes, return_index=True)
        self.item, self.start = item_of[first], grams.starts[first]

    def __len__(self) -> int:
        return len(self.hashes)

    def matches(self, normalized: Sequence[str]) -> list[list[tuple[int, int]]]:
        """For each normalised text, [(word position, item index)] of its matching n-grams."""
        grams = shingles.ngram_hashes(normalized, self.n, short=False)
        out: list[list[tuple[int, int]]] = [[] for _ in normalized]
        if not len(self.hashes) or not len(grams.hashes):
            return out
        at = np.minimum(np.searchsorted(self.hashes, grams.hashes), len(self.hashes) - 1)
        for flat in np.flatnonzero(self.hashes[at] == grams.hashes):
            doc = int(np.searchsorted(grams.offsets, flat, side="right") - 1)
            start, k = int(grams.starts[flat]), int(at[flat])
            item, item_start = int(self.item[k]), int(self.start[k])
            words = normalized[doc].split()[start:start + self.n]
            if words == self.words[item][item_start:item_start + self.n]:
                out[doc].append((start, item))
        return out


def cut_windows(spans: Sequence[tuple[int, int]], length: int, hits: Sequence[tuple[int, int]], n: int,
                window: int) -> list[list[int]]:
    """The merged [start, end) character windows cut around each n-gram match.

    Args:
      spans: `word_spans` of the text; length: its length in characters.
      hits: (word position, item) of each matching n-gram; n: words per n-gram.
    """
    windows = sorted((max(0, spans[w][0] - window), min(length, spans[w + n - 1][1] + window))
                     for w, _ in hits)
    merged: list[list[int]] = []
    for a, b in windows:
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    return merged


class Decontaminator:
    """The evaluation indexes and the per-batch check; `__call__(records, counts)` is the step."""

    def __init__(self, config: DecontamConfig, embedder=None):
        self.config = config
        self.items = eval_sets.load_eval_sets(config.against)
        self.ngrams = NgramIndex(self.items, config.ngram)
        code = [(item.name, item.code) for item in self.items if item.code]
        functions = [(name, unit) for name, unit in code_similarity.benchmark_functions(code)
                     if len(unit.tokens) >= config.min_ast_tokens]  # the rest match too much
        self.ast = (code_similarity.AstIndex(functions, config.min_ast_tokens)
                    if config.code_check and functions else None)
        self.embedding = None
        if functions and (embedder is not None or config.embedder is not None):
            self.embedding = code_similarity.EmbeddingIndex(embedder or _load_embedder(config), functions)

    def __call__(self, records: list[dict], counts: Counts) -> list[dict]:
        kept = []
        dropped = self._code_matches(records)
        survivors = [i for i in range(len(records)) if i not in dropped]
        normalized = {i: normalize(records[i]["text"]) for i in survivors}
        hits = dict(zip(survivors, self.ngrams.matches([normalized[i] for i in survivors])))
        for i, record in enumerate(records):
            if i in dropped:
                reason, row = dropped[i]
                counts.drop(reason)
                counts.log(row)
                continue
            found = hits[i]
            if not found:
                kept.append(record)
                continue
            kept_record = self._cut(record, normalized[i].split(), found, counts)
            if kept_record is not None:
                kept.append(kept_record)
        counts.add("kept", len(kept))
        return kept

    def _cut(self, record: dict, words: list[str], found: list[tuple[int, int]], counts: Counts) -> dict | None:
        c, text = self.config, record["text"]
        spans = word_spans(text)
        windows = cut_windows(spans, len(text), found, c.ngram, c.window)
        details = []
        for a, b in windows:
            seen, matches = set(), []
            for w, item in found:
                if a <= spans[w][0] < b and item not in seen:
                    seen.add(item)
                    matches.append({"benchmark": self.items[item].benchmark, "item": self.items[item].item,
                                    "ngram": " ".join(words[w:w + c.ngram])})
            details.append({"start": a, "end": b, "matches": matches})
        counts.add("ngram_matches", len(found))
        if len(windows) > c.max_splits:
            counts.drop("contaminated_split_more_than_max")
            counts.log({"id": record["id"], "action": "dropped",
                        "reason": f"split {len(windows)} times (> {c.max_splits})", "cuts": details})
            return None
        edges = [0] + [x for w in windows for x in w] + [len(text)]
        pieces = [text[edges[i]:edges[i + 1]] for i in range(0, len(edges), 2)]
        pieces = [p for p in pieces if len(p) >= c.min_piece]
        if not pieces:
            counts.drop("contaminated_nothing_left")
            counts.log({"id": record["id"], "action": "dropped",
                        "reason": f"no piece of {c.min_piece}+ characters left", "cuts": details})
            return None
        new_text = "\n\n".join(pieces)
        counts.add("cut", 1)
        counts.add("chars_removed", len(text) - sum(map(len, pieces)))
        counts.log({"id": record["id"], "action": "cut", "chars_before": len(text),
                    "chars_after": len(new_text), "cuts": details})
        meta = {**record["meta"], "decontamination": {
            "cuts": len(windows), "benchmarks": sorted({m["benchmark"] for d in details for m in d["matches"]})}}
        return {**record, "text": new_text, "meta": meta}

    def _code_matches(self, records: list[dict]) -> dict[int, tuple[str, dict]]:
        """{record index: (drop reason, removed.jsonl row)} of records with a benchmark function."""
        if self.ast is None and self.embedding is None:
            return {}
        c, out, units = self.config, {}, []
        for i, record in enumerate(records):
            for unit in code_similarity.function_units(record["text"]):
                units.append((i, unit))
                found = self.ast.best(unit.tokens, c.ast_threshold) if self.ast and i not in out else None
                if found is not None:
                    f, score = found
                    out[i] = ("code_ast_match", self._code_row(record, "ast", unit, self.ast.names[f], score))
        if self.embedding is not None:
            todo = [(i, u) for i, u in units if i not in out and len(u.tokens) >= c.min_ast_tokens]
            for (i, unit), (f, score) in zip(todo, self.embedding.best([u.source for _, u in todo])):
                if score >= c.embedding_threshold and i not in out:
                    row = self._code_row(records[i], "embedding", unit, self.embedding.names[f], score)
                    out[i] = ("code_embedding_match", row)
        return out

    @staticmethod
    def _code_row(record: dict, check: str, unit, name: str, score: float) -> dict[str, Any]:
        benchmark, _, item = name.partition("/")
        return {"id": record["id"], "action": "dropped", "reason": f"code {check} similarity",
                "matches": [{"benchmark": benchmark, "item": item, "function": unit.name,
                             "similarity": round(float(score), 4)}]}


def _load_embedder(config: DecontamConfig):
    from phi_jax.inference import loader
    from phi_jax.inference.embed import Embedder

    loaded = loader.load(config.embedder)
    loader.require_tokenizer(loaded, config.embedder)
    return Embedder(loaded.model, loaded.variables, loaded.tokenizer, max_tokens=config.embed_max_tokens)


# ---------------------------------------------------------------------------------- public API

@dataclasses.dataclass
class DecontamResult:
    """kept: records kept (cut ones with new text and meta.decontamination); removed: one row
    per record cut or dropped, as in removed.jsonl; counts: drops by reason and stage counters."""

    kept: list[dict]
    removed: list[dict]
    counts: dict[str, dict[str, int]]


def decontaminate(records: Sequence[dict], against: Sequence[str] | str = ("humaneval",), *,
                  embedder=None, **options) -> DecontamResult:
    """Decontaminate records held in memory; `options` are the other `DecontamConfig` fields.
    `embedder` (an `Embedder`, or any texts -> [N, D] callable) turns on the embedding check."""
    config = DecontamConfig(tuple(eval_sets.parse_specs(against)), **options)
    step, counts = Decontaminator(config, embedder), Counts()
    batch = [{**r, "id": str(r.get("id", i)), "meta": dict(r.get("meta") or {})} for i, r in enumerate(records)]
    kept = step(batch, counts)
    return DecontamResult(kept, counts.rows, {"dropped": dict(counts.dropped), "stage": dict(counts.stage)})


def decontaminate_stage(against: Sequence[str] | str = ("humaneval",), **options) -> Stage:
    """The stage for `run_stage`. The evaluation sets are read here too, so a bad --against fails
    before any shard runs, and their digest is a parameter (an edited set is a different run)."""
    config = DecontamConfig(tuple(eval_sets.parse_specs(against)), **options)
    probe = Decontaminator(dataclasses.replace(config, embedder=None))
    parameters = {**{k: v for k, v in dataclasses.asdict(config).items()}, "against": list(config.against),
                  "eval_items": len(probe.items), "eval_sha256": eval_sets.digest(probe.items),
                  "eval_ngrams": len(probe.ngrams), "eval_items_too_short": probe.ngrams.too_short,
                  "eval_functions": len(probe.ast.functions) if probe.ast else 0}
    return Stage("decontaminate", functools.partial(Decontaminator, config), parameters,
                 batch_size=256, log_name=REMOVED)
