"""Autoregressive generation: bucketed prefill, then decode loops that run on the device.

Letters: B batch, P padded prompt length (a bucket), S cache slots, V vocab, C chunk size.

Prompts of different lengths are right-padded to a power-of-two bucket and prefilled together; each
sequence then decodes at its own cache slot, so positions are exact and no left-padding trick is
needed. Decoding runs C steps per call inside one jitted `lax.while_loop` (which also stops as soon
as every sequence has produced a stop token), so the per-token cost is the model's, not Python's
dispatch: transformers' generate pays a Python round trip per token, which for a small model is
most of its time. Sampling parameters are traced scalars, so changing temperature/top-k/top-p or
the prompt length within a bucket never recompiles; the KV cache is donated to every call.
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from phi_jax.model import Phi, init_cache
from phi_jax.sampling import sample_logits

MIN_BUCKET = 16
_CACHE_ROUND = 64


def prompt_bucket(length: int) -> int:
    """Padded prompt length: the next power of two, at least MIN_BUCKET."""
    return max(MIN_BUCKET, 1 << max(0, (length - 1).bit_length()))


def _prefill(model: Phi, variables, cache, tokens, segment_ids, last_index, rng, temperature, top_k,
             top_p):
    logits, cache = model.apply(variables, tokens, segment_ids=segment_ids, cache=cache)
    last = jnp.take_along_axis(logits, last_index[:, None, None], axis=1)[:, 0]  # [B,V]
    return sample_logits(last, rng, temperature, top_k, top_p), cache


def _decode(model: Phi, variables, cache, tokens, rng, temperature, top_k, top_p):
    logits, cache = model.apply(variables, tokens[:, None], cache=cache)
    return sample_logits(logits[:, 0], rng, temperature, top_k, top_p), cache


def _decode_loop(model: Phi, chunk: int, variables, cache, tokens, done, stop, key, first_step,
                 num_steps, temperature, top_k, top_p):
    """Up to min(chunk, num_steps) decode steps on the device, stopping early once all are done.

    tokens [B]: each row's last token; done [B]: rows that already emitted a stop token; stop [E]:
    stop ids padded with -1. Step i samples with key fold_in(key, first_step + i), the same keys a
    one-step-per-call loop uses, so the chunk size never changes the result.
    Returns (new tokens [B,C] (columns past `count` unused), count, cache, last tokens, done).
    """
    def cond(state):
        i, _, _, done, _ = state
        return (i < jnp.minimum(num_steps, chunk)) & ~jnp.all(done)

    def body(state):
        i, cache, tokens, done, out = state
        tokens, cache = _decode(model, variables, cache, tokens,
                                jax.random.fold_in(key, first_step + i), temperature, top_k, top_p)
        done = done | jnp.any(tokens[:, None] == stop[None, :], axis=1)
        return i + 1, cache, tokens, done, out.at[:, i].set(tokens)

    out = jnp.zeros((tokens.shape[0], chunk), jnp.int32)
    count, cache, tokens, done, out = jax.lax.while_loop(
        cond, body, (jnp.int32(0), cache, tokens, done, out))
    return out, count, cache, tokens, done


@functools.lru_cache(maxsize=32)
def compiled_prefill(model: Phi) -> Callable:
    """`_prefill` jitted once per model; the cache argument is donated."""
    return jax.jit(functools.partial(_prefill, model), donate_argnums=(1,))


@functools.lru_cache(maxsize=32)
def compiled_decode_loop(model: Phi, chunk: int) -> Callable:
    """`_decode_loop` jitted once per (model, chunk); the cache argument is donated."""
    return jax.jit(functools.partial(_decode_loop, model, chunk), donate_argnums=(1,))


def generate(model: Phi, variables, prompts: Sequence[Sequence[int]], max_new_tokens: int = 32, *,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
             stop_tokens: Sequence[int] | None = None,
             callback: Callable[[int, int], None] | None = None,
             chunk_size: int = 16) -> list[list[int]]:
    """Generate up to `max_new_tokens` for each prompt.

    Args:
      model, variables: a `Phi` module and its variables ({"params": ...}).
      prompts: token-id lists, one per sequence, of any (non-zero) lengths.
      temperature: 0 = greedy; top_k (0 = off), top_p (1 = off) filter sampling.
      seed: sampling seed; the same seed and inputs give the same tokens.
      stop_tokens: ids that end a sequence (default: the config's eos). The stop token is
        included in the output, as transformers does.
      callback: called as callback(prompt_index, token_id) for every new token, in order.
      chunk_size: decode steps per device call. The tokens never depend on it; it only sets how
        often control returns to Python (and so the callback's granularity: 1 = every token).
    On CPU, pass the model through `phi_jax.model.inference_layout` first (the CLI, the server and
    the evaluators do): it unstacks scanned layers, which decodes up to ~2x faster there.
    Returns:
      One list of new token ids per prompt.
    """
    config = model.config
    if not prompts:
        return []
    lengths = [len(p) for p in prompts]
    if min(lengths) == 0:
        raise ValueError("every prompt needs at least one token; prepend the bos token to empty prompts")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if max(lengths) + max_new_tokens > config.max_len:
        raise ValueError(f"the longest prompt ({max(lengths)} tokens) plus max_new_tokens "
                         f"({max_new_tokens}) exceeds the model's max_len {config.max_len}; "
                         "shorten the prompt or lower max_new_tokens")
    for i, prompt in enumerate(prompts):
        bad = [t for t in prompt if not 0 <= t < config.vocab_size]
        if bad:
            raise ValueError(f"prompt {i} has token ids {bad[:5]} outside the vocabulary "
                             f"[0, {config.vocab_size}); check the tokenizer matches the model")
    if stop_tokens is None:
        stop_tokens = [] if config.eos_token_id is None else [config.eos_token_id]
    stop = sorted(set(int(t) for t in stop_tokens))
    # Padded with -1 (never a token) to 8, or a power of two beyond: other stop lists (up to 8
    # ids) reuse the compiled loop.
    stop_ids = np.full(max(8, 1 << max(0, (len(stop) - 1).bit_length())), -1, np.int32)
    stop_ids[:len(stop)] = stop

    batch, bucket = len(prompts), prompt_bucket(max(lengths))
    slots = -(-(bucket + max_new_tokens) // _CACHE_ROUND) * _CACHE_ROUND
    tokens = np.zeros((batch, bucket), np.int32)
    segment_ids = np.zeros((batch, bucket), np.int32)
    for i, prompt in enumerate(prompts):
        tokens[i, :len(prompt)] = prompt
        segment_ids[i, :len(prompt)] = 1
    sampling = (jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p))
    key = jax.random.key(seed)
    prefill = compiled_prefill(model)
    decode_loop = compiled_decode_loop(model, chunk_size)

    cache = init_cache(config, batch, slots)
    next_tokens, cache = prefill(variables, cache, tokens, segment_ids,
                                 np.asarray(lengths, np.int32) - 1, jax.random.fold_in(key, 0),
                                 *sampling)
    outputs: list[list[int]] = [[] for _ in prompts]
    done = np.zeros(batch, bool)

    def emit(column: np.ndarray) -> None:
        for i in np.flatnonzero(~done):
            token = int(column[i])
            outputs[i].append(token)
            if callback is not None:
                callback(int(i), token)
            if token in stop:
                done[i] = True

    emit(np.asarray(next_tokens))
    produced = 1
    while produced < max_new_tokens and not done.all():
        new, count, cache, next_tokens, _ = decode_loop(
            variables, cache, next_tokens, done, stop_ids, key, np.int32(produced),
            np.int32(max_new_tokens - produced), *sampling)
        new, count = np.asarray(new), int(count)
        for column in range(count):
            emit(new[:, column])
        produced += count
    return outputs
