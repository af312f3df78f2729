"""Quality gates on a generated set: drop duplicates and contaminated records, flag repetition.

    decisions = decide(all_records, GateConfig())         # whole-set: {id: Decision}
    run_stage(gate_stage(decisions, config), generated_dir, kept_dir)

Gates that need the whole set (duplicates, repeated openings) are decided once over every record,
then applied shard by shard by a plain stage, so drops land in the manifest by reason like every
other stage's and a rerun resumes per shard.

Dropped (reason in the manifest):
  * what `drop_duplicates_and_contaminated` names: duplicates and benchmark overlap (see there);
  * any flag listed in `GateConfig.drop_flagged`.
Flagged (`meta.flags`, counted as `flagged_<flag>`; kept unless asked otherwise):
  * `repeated_opening`: the first `opening_words` words are those of another record (a teacher
    that starts every section the same way is not diverse, whatever the topic);
  * `low_distinct_2`: fewer than `min_distinct_2` of the record's word bigrams are distinct
    (a small teacher looping on one sentence), for records of at least `min_words` words;
  * `truncated`: the teacher stopped at max_tokens.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import re
from typing import Iterable, Sequence

from phi_jax.curation.stage import Counts, Stage
from phi_jax.errors import InputError

FLAGS = ("repeated_opening", "low_distinct_2", "truncated")
_WORD = re.compile(r"\w+")


def words(text: str) -> list[str]:
    """Lower-cased word tokens: what distinct-n and openings are counted over."""
    return _WORD.findall(text.lower())


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

    def __post_init__(self):
        if self.opening_words < 1 or self.min_words < 2 or not 0.0 <= self.min_distinct_2 <= 1.0:
            raise InputError(f"gate settings out of range (opening words {self.opening_words} >= 1, "
                             f"min words {self.min_words} >= 2, min distinct-2 {self.min_distinct_2} in [0, 1])")
        unknown = sorted(set(self.drop_flagged) - set(FLAGS))
        if unknown:
            raise InputError(f"--drop-flagged: unknown flag {unknown[0]!r}; choose from {', '.join(FLAGS)}")


@dataclasses.dataclass(frozen=True)
class Decision:
    drop: str | None
    flags: tuple[str, ...]


def normalized_sha256(text: str) -> str:
    return hashlib.sha256(" ".join(text.split()).encode("utf-8")).hexdigest()


def drop_duplicates_and_contaminated(records: Sequence[dict]) -> dict[str, str]:
    """{record id: reason} for the records to drop as duplicates or as benchmark overlap.

    The contract every implementation keeps: records are considered in the order given; a
    record that duplicates an earlier one is dropped, the first is kept; reasons are short
    snake_case names that become manifest drop reasons. What this build checks:
    `exact_duplicate` (the same text up to whitespace). Near-duplicate detection (MinHash-LSH)
    and decontamination against HumanEval belong to `phi_jax.curation.dedup` and
    `phi_jax.curation.decontaminate`; `GATES_RUN` says which checks a report's numbers include.
    """
    first: dict[str, str] = {}
    drops = {}
    for record in records:
        key = normalized_sha256(record["text"])
        if key in first:
            drops[record["id"]] = "exact_duplicate"
        else:
            first[key] = record["id"]
    return drops


GATES_RUN = {"exact_dedup": "sha256 of the whitespace-normalised text",
             "repeated_opening": "first N words shared with another record (flag)",
             "low_distinct_2": "distinct word bigrams of a record below a threshold (flag)"}
GATES_NOT_RUN = {"near_dedup": "MinHash-LSH, phi_jax.curation.dedup (not in this build)",
                 "humaneval_decontamination": "n-gram/AST overlap with HumanEval, "
                                              "phi_jax.curation.decontaminate (not in this build)"}


def decide(records: Sequence[dict], config: GateConfig) -> dict[str, Decision]:
    """The gate decision of every record, over the whole set (records in plan order)."""
    tokens = {r["id"]: words(r["text"]) for r in records}
    openings = collections.Counter(opening(t, config.opening_words) for t in tokens.values())
    drops = drop_duplicates_and_contaminated(records)
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
    parameters = {"gates": sorted(GATES_RUN), "opening_words": config.opening_words,
                  "min_distinct_2": config.min_distinct_2, "min_words": config.min_words,
                  "drop_flagged": list(config.drop_flagged), "decisions_sha256": digest}
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
