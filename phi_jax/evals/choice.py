"""Multiple choice by log-likelihood (ARC / HellaSwag style) from JSONL.

Each line: {"context": str, "choices": [str, ...], "label": int}. Every choice is scored as a
continuation of the context (`scoring.encode_pair`, lm-eval's tokenization). Three predictions:
  acc            argmax of the summed log-probability;
  acc_norm       argmax of log-probability / len(choice) in characters (lm-eval's acc_norm);
  acc_token_norm argmax of the mean log-probability per token.
The choice text is used exactly as written: put the separating space in it (" Paris") or at the
end of the context, as the benchmark's own format does.
"""

from __future__ import annotations

import json
from typing import Any, Iterable, Sequence

import numpy as np

from phi_jax import fileio
from phi_jax.errors import InputError, MissingFileError
from phi_jax.inference import scoring


def read_jsonl(path: str) -> list[dict[str, Any]]:
    """Examples from a JSONL file, validated; errors name the line and the fix."""
    examples = []
    try:
        f = fileio.as_path(path).open("r", encoding="utf-8")  # local or gs://
    except OSError as e:
        raise MissingFileError(f"{path}: cannot read the choice data ({e.strerror or e})") from None
    with f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                ex = json.loads(line)
            except ValueError as e:
                raise InputError(f"{path}:{n}: not valid JSON ({e}); each line needs "
                                 '{"context": str, "choices": [str, ...], "label": int}') from None
            if not isinstance(ex, dict):
                raise InputError(f"{path}:{n}: expected a JSON object, got {type(ex).__name__}")
            missing = {"context", "choices", "label"} - set(ex)
            if missing:
                raise InputError(f"{path}:{n}: missing keys {sorted(missing)}; each line needs "
                                 '{"context": str, "choices": [str, ...], "label": int}')
            if not (isinstance(ex["choices"], list) and ex["choices"]
                    and all(isinstance(c, str) for c in ex["choices"])):
                raise InputError(f"{path}:{n}: choices must be a non-empty list of strings")
            if not isinstance(ex["context"], str):
                raise InputError(f"{path}:{n}: context must be a string")
            if not (isinstance(ex["label"], int) and 0 <= ex["label"] < len(ex["choices"])):
                raise InputError(f"{path}:{n}: label {ex['label']!r} is not an index into its "
                                 f"{len(ex['choices'])} choices")
            examples.append(ex)
    return examples


def evaluate(model, variables, tokenizer, examples: Iterable[dict[str, Any]], *,
             batch_size: int = 8) -> dict[str, Any]:
    """Accuracy (sum, char-normalised, token-normalised) and per-example scores."""
    examples = list(examples)
    pairs = [(ex["context"], ch) for ex in examples for ch in ex["choices"]]
    scores = scoring.score_texts(model, variables, tokenizer, pairs, batch_size=batch_size)
    records, at = [], 0
    hits = {"acc": 0, "acc_norm": 0, "acc_token_norm": 0}
    for ex in examples:
        s: Sequence[scoring.Score] = scores[at:at + len(ex["choices"])]
        at += len(ex["choices"])
        logp = np.array([x.logprob for x in s])
        preds = {"acc": int(np.argmax(logp)),
                 "acc_norm": int(np.argmax(logp / np.array([max(len(c), 1)
                                                             for c in ex["choices"]]))),
                 "acc_token_norm": int(np.argmax(logp / np.array([x.num_tokens for x in s])))}
        for k, p in preds.items():
            hits[k] += p == ex["label"]
        records.append({"label": ex["label"], "logprobs": logp.tolist(),
                        "num_tokens": [x.num_tokens for x in s],
                        **{f"pred_{k}": p for k, p in preds.items()}})
    n = len(examples)
    return {**{k: v / n if n else float("nan") for k, v in hits.items()}, "num_examples": n,
            "examples": records}
