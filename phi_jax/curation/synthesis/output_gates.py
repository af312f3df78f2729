"""Quality gates on a generated set: drop duplicates and contaminated records, flag repetition.

    decisions = decide(all_records, GateConfig())         # whole-set: {id: Decision}
    run_stage(gate_stage(decisions, config), generated_dir, kept_dir)

Gates that need the whole set (duplicates, repeated openings) are decided once over every record,
then applied shard by shard by a plain stage, so drops land in the manifest by reason like every
other stage's and a rerun resumes per shard.

Dropped (reason in the manifest):
  * duplicates (`exact_duplicate`, `near_duplicate`: `phi_jax.curation.dedup`) and benchmark overlap
    (`contaminated_ngram`, `contaminated_code`: `phi_jax.curation.decontaminate`), see
    `drop_duplicates_and_contaminated`;
  * any flag listed in `GateConfig.drop_flagged`.
Flagged (`meta.flags`, counted as `flagged_<flag>`; kept unless asked otherwise):
  * `repeated_opening`: the first `opening_words` words are those of another record (a teacher
    that starts every section the same way is not diverse, whatever the topic);
  * `low_distinct_2`: fewer than `min_distinct_2` of the record's word bigrams are distinct
    (a small teacher looping on one sentence), for records of at least `min_words` words;
  * `truncated`: the teacher stopped at max_tokens.
Words (for openings and distinct-n) are curation's one word rule, `core.text.words`.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
from typing import Iterable, Sequence

from phi_jax.curation.core.stage import Counts, Stage
from phi_jax.curation.core.text import words
from phi_jax.errors import InputError

FLAGS = ("repeated_opening", "low_distinct_2", "truncated")

def ngrams(tokens: Sequence[str], n: int) -> Iterable[tuple[str, ...]]:
    return zip(*(tokens[i:] for i in range(n)))


def distinct_n(token_lists: Iterable[Sequence[str]], n: int) -> float:
    """Distinct n-grams / all n-grams over the documents (0 when there are none)."""
    seen, total = set(), 0
    for tokens in token_lists:
        grams = list(ngrams(tokens, n))
        seen.update(grams)
        total += len(grams)
    return len(seen) / total if total else 0.0


def opening(tokens: Sequence[str], k: int) -> tuple[str, ...]:
    return tuple(tokens[:k])


@dataclasses.dataclass(frozen=True)
class GateConfig:
    opening_words: int = 10
    min_distinct_2: float = 0.3
    min_words: int = 50
    drop_flagged: tuple[str, ...] = ()
    near_threshold: float = 0.8
    against: tuple[str, ...] = ("humaneval",)

    def __post_init__(self):
        if (self.opening_words < 1 or self.min_words < 2 or not 0.0 <= self.min_distinct_2 <= 1.0
                or not 0.0 < self.near_threshold <= 1.0):
            raise InputError(f"gate settings out of range (opening words {self.opening_words} >= 1, "
                             f"min words {self.min_words} >= 2, min distinct-2 {self.min_distinct_2} in [0, 1], "
                             f"dedup threshold {self.near_threshold} in (0, 1])")
        unknown = sorted(set(self.drop_flagged) - set(FLAGS))
        if unknown:
            raise InputError(f"--drop-flagged: unknown flag {unknown[0]!r}; choose from {', '.join(FLAGS)}")


@dataclasses.dataclass(frozen=True)
class Decision:
    drop: str | None
    flags: tuple[str, ...]


def drop_duplicates_and_contaminated(records: Sequence[dict], config: GateConfig) -> dict[str, str]:
    """{record id: reason} for the records to drop as duplicates or as benchmark overlap.

    Records are considered in the order given (plan order): of a cluster of duplicates the first
    is kept (`phi_jax.curation.dedup.remove.near_duplicates`: `exact_duplicate` for the same normalised
    text, `near_duplicate` for MinHash-LSH Jaccard >= `near_threshold`); the kept ones are then
    checked against `against` (`phi_jax.curation.decontaminate`): `contaminated_ngram` for a
    shared word 13-gram, `contaminated_code` for a function whose AST matches a benchmark
    solution. Decontamination would cut an n-gram match out of a document; a synthetic record is
    dropped whole instead, since a cut exercise no longer splits into prompt and solution.
    """
    from phi_jax.curation.decontaminate import remove as decontaminate
    from phi_jax.curation.dedup import remove as dedup

    if not records:
        return {}
    drops = {}
    result = dedup.near_duplicates(records, config.near_threshold)
    for cluster in result.clusters:
        for member in cluster["removed"]:
            drops[member["id"]] = f"{member['reason']}_duplicate"
    if config.against:
        clean = decontaminate.decontaminate(result.kept, against=config.against)
        for row in clean.removed:
            drops[row["id"]] = "contaminated_ngram" if "cuts" in row else "contaminated_code"
    return drops


def gates_run(config: GateConfig) -> dict[str, str]:
    """What the gates of `config` check, in words for the report."""
    out = {"dedup": f"exact and MinHash-LSH near duplicates (Jaccard >= {config.near_threshold:g}), "
                    "phi_jax.curation.dedup",
           "repeated_opening": f"first {config.opening_words} words shared with another record (flag)",
           "low_distinct_2": f"distinct word bigrams of a record below {config.min_distinct_2:g} (flag)"}
    if config.against:
        out["decontamination"] = (f"against {', '.join(config.against)}: word 13-grams and function ASTs, "
                                  "phi_jax.curation.decontaminate")
    return out


def decide(records: Sequence[dict], config: GateConfig) -> dict[str, Decision]:
    """The gate decision of every record, over the whole set (records in plan order)."""
    tokens = {r["id"]: words(r["text"]) for r in records}
    openings = collections.Counter(opening(t, config.opening_words) for t in tokens.values())
    drops = drop_duplicates_and_contaminated(records, config)
    out = {}
    for record in records:
        t = tokens[record["id"]]
        flags = []
        if openings[opening(t, config.opening_words)] > 1:
            flags.append("repeated_opening")
        if len(t) >= config.min_words and distinct_n([t], 2) < config.min_distinct_2:
            flags.append("low_distinct_2")
        if (record["meta"].get("teacher") or {}).get("finish_reason") == "length":
            flags.append("truncated")
        drop = drops.get(record["id"]) or next((f for f in flags if f in config.drop_flagged), None)
        out[record["id"]] = Decision(drop, tuple(flags))
    return out


def gate_stage(decisions: dict[str, Decision], config: GateConfig) -> Stage:
    digest = hashlib.sha256(repr(sorted(decisions.items())).encode()).hexdigest()
    parameters = {"gates": sorted(gates_run(config)), **dataclasses.asdict(config), "decisions_sha256": digest}
    return Stage("gate", functools.partial(_GateStep, decisions), parameters, batch_size=1024)


class _GateStep:
    def __init__(self, decisions: dict[str, Decision]):
        self._decisions = decisions

    def __call__(self, records: list[dict], counts: Counts) -> list[dict]:
        kept = []
        for record in records:
            decision = self._decisions.get(record["id"])
            if decision is None:
                raise InputError(f"record {record['id']!r} was not in the set the gates decided on; "
                                 "rerun the command so the gates see the whole generated set")
            for flag in decision.flags:
                counts.add(f"flagged_{flag}")
            if decision.drop:
                counts.drop(decision.drop)
                continue
            record["meta"]["flags"] = list(decision.flags)
            kept.append(record)
        counts.add("kept", len(kept))
        return kept
