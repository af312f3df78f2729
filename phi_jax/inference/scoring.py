"""Log-likelihood scoring shared by perplexity, multiple choice and the lm-eval adapter.

Letters: B batch rows, T row length (a power-of-two bucket), V vocab.

`token_logprobs` scores every token of one sequence (with the likeliest alternatives), which is
what OpenAI's `echo` + `logprobs` returns for the prompt; the server calls it.

A request is (context ids, continuation ids); its score is the sum of log p(continuation token |
everything before it) and whether every continuation token is the greedy argmax. Each request is
one row (right-padded, segment id 0 on padding); rows are grouped by length bucket and run in
fixed-size batches, so the number of compilations is bounded by the number of buckets.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from phi_jax.errors import InputError

MIN_BUCKET = 16


def bucket(length: int, max_len: int) -> int:
    """Row length for a sequence: the next power of two (>= MIN_BUCKET), capped at max_len."""
    return min(max_len, max(MIN_BUCKET, 1 << max(0, (length - 1).bit_length())))


def _target_logprobs(model, variables, tokens, positions, segment_ids, targets):
    """log p(targets[b, t] | tokens[b, :t+1]) [B,T] and whether it is the argmax [B,T]."""
    logits, _ = model.apply(variables, tokens, positions=positions, segment_ids=segment_ids)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)  # [B,T,V]
    target_logp = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]  # [B,T]
    greedy = jnp.argmax(logits, axis=-1) == targets  # [B,T]
    return target_logp, greedy


@functools.lru_cache(maxsize=16)
def compiled_scorer(model):
    """`_target_logprobs` jitted once per model (a linen module with a frozen config is hashable)."""
    return jax.jit(functools.partial(_target_logprobs, model))


def _token_logprobs(model, top: int, variables, tokens, segment_ids):
    """For row tokens [1,T]: log p(tokens[t+1] | tokens[:t+1]) [T] and the top-`top` ids and
    log-probs [T,top] at every position (the last position's are unused)."""
    logits, _ = model.apply(variables, tokens, segment_ids=segment_ids)
    logp = jax.nn.log_softmax(logits[0].astype(jnp.float32), axis=-1)  # [T,V]
    nxt = jnp.concatenate([tokens[0, 1:], jnp.zeros((1,), tokens.dtype)])
    chosen = jnp.take_along_axis(logp, nxt[:, None], axis=-1)[:, 0]
    top_lp, top_ids = jax.lax.top_k(logp, top)
    return chosen, top_ids.astype(jnp.int32), top_lp


@functools.lru_cache(maxsize=16)
def _compiled_token_logprobs(model, top: int):
    return jax.jit(functools.partial(_token_logprobs, model, top))


def token_logprobs(model, variables, ids: Sequence[int], top: int = 0):
    """Per-token log-probabilities of a sequence under the model (the server's `echo` + logprobs).

    Returns (logprobs, top_ids, top_logprobs) as lists of length len(ids) - 1: entry i is about
    token ids[i + 1] given ids[:i + 1], with the `top` likeliest alternatives at that position.
    One row padded to a power-of-two bucket, so prompt lengths reuse compiled programs.
    """
    max_len = row_length_limit(model)
    if not 1 <= len(ids) <= max_len:
        raise InputError(f"a sequence of {len(ids)} tokens cannot be scored: it must have 1 to "
                         f"{max_len} (the model's max_len) tokens")
    length = bucket(len(ids), max_len)
    tokens = np.zeros((1, length), np.int32)
    tokens[0, :len(ids)] = ids
    segment_ids = (np.arange(length) < len(ids)).astype(np.int32)[None]
    width = max(1, min(top, model.config.vocab_size))
    chosen, top_ids, top_lp = jax.device_get(
        _compiled_token_logprobs(model, width)(variables, tokens, segment_ids))
    n = len(ids) - 1
    return (chosen[:n].tolist(), top_ids[:n, :top].tolist(), top_lp[:n, :top].tolist())


def row_length_limit(model) -> int:
    return int(model.config.max_len)


@dataclasses.dataclass(frozen=True)
class Score:
    """Sum of continuation log-probs, greedy flag, and the number of scored tokens."""

    logprob: float
    is_greedy: bool
    num_tokens: int


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Tokenize (context, continuation) the way lm-eval-harness does.

    Trailing whitespace of the context moves to the continuation; the pair is encoded as one
    string and split where the context's own encoding ends, so merges across the boundary match
    what the model would see. An empty context becomes the BOS (or EOS) token, as in lm-eval.
    """
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    if not context:
        prefix = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
        if prefix is None:
            raise InputError("empty context and the tokenizer has no BOS/EOS token to start from; "
                             "give every request a non-empty context")
        return [prefix], tokenizer.encode(continuation)
    whole = tokenizer.encode(context + continuation)
    ctx = tokenizer.encode(context)
    return ctx, whole[len(ctx):]


def score_requests(model, variables, requests: Sequence[tuple[Sequence[int], Sequence[int]]], *,
                   batch_size: int = 8) -> list[Score]:
    """Score (context ids, continuation ids) pairs; contexts are left-truncated to fit max_len.

    Args:
      model, variables: a `phi_jax.model.Phi` and its variables.
      requests: token id pairs; the continuation must be non-empty and the context non-empty.
      batch_size: rows per forward pass (the last batch is padded with empty rows).
    """
    max_len = row_length_limit(model)
    rows = []
    for i, (ctx, cont) in enumerate(requests):
        if not cont:
            raise InputError(f"request {i} has an empty continuation; there is nothing to score")
        if not ctx:
            raise InputError(f"request {i} has an empty context; start it with the BOS token")
        if len(cont) > max_len:
            raise InputError(f"request {i}: continuation of {len(cont)} tokens is longer than the "
                             f"model's max_len {max_len}; score it with rolling windows instead")
        seq = (list(ctx) + list(cont))[-(max_len + 1):]
        rows.append((seq[:-1], seq[1:], len(cont)))  # inputs, targets, scored tail length
    scorer = compiled_scorer(model)
    out: list[Score | None] = [None] * len(rows)
    by_bucket: dict[int, list[int]] = {}
    for i, (inp, _, _) in enumerate(rows):
        by_bucket.setdefault(bucket(len(inp), max_len), []).append(i)
    for length, idx in sorted(by_bucket.items()):
        for start in range(0, len(idx), batch_size):
            chunk = idx[start:start + batch_size]
            tokens = np.zeros((batch_size, length), np.int32)
            targets = np.zeros((batch_size, length), np.int32)
            segment_ids = np.zeros((batch_size, length), np.int32)
            for r, i in enumerate(chunk):
                inp, tgt, _ = rows[i]
                tokens[r, :len(inp)], targets[r, :len(tgt)] = inp, tgt
                segment_ids[r, :len(inp)] = 1
            positions = np.broadcast_to(np.arange(length, dtype=np.int32), (batch_size, length))
            logp, greedy = jax.device_get(scorer(variables, tokens, positions, segment_ids,
                                                 targets))
            for r, i in enumerate(chunk):
                inp, _, n = rows[i]
                span = slice(len(inp) - n, len(inp))
                out[i] = Score(float(np.sum(logp[r, span], dtype=np.float64)),
                               bool(np.all(greedy[r, span])), n)
    return out


def score_texts(model, variables, tokenizer, pairs: Sequence[tuple[str, str]],
                **kwargs: Any) -> list[Score]:
    """`score_requests` on (context, continuation) strings, tokenized with `encode_pair`."""
    return score_requests(model, variables, [encode_pair(tokenizer, c, x) for c, x in pairs],
                          **kwargs)
