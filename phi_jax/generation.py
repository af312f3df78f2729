"""Autoregressive generation: bucketed prefill, then one jit-compiled decode step per token.

Letters: B batch, P padded prompt length (a bucket), S cache slots, V vocab.

Prompts of different lengths are right-padded to a power-of-two bucket and prefilled together; each
sequence then decodes at its own cache slot, so positions are exact and no left-padding trick is
needed. Sampling parameters are traced scalars, so changing temperature/top-k/top-p or the prompt
length within a bucket never recompiles; the KV cache is donated to every step.
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from phi_jax.model import Phi, init_cache

MIN_BUCKET = 16
_CACHE_ROUND = 64


def prompt_bucket(length: int) -> int:
    """Padded prompt length: the next power of two, at least MIN_BUCKET."""
    return max(MIN_BUCKET, 1 << max(0, (length - 1).bit_length()))


def sample_logits(logits: jax.Array, rng: jax.Array, temperature: jax.Array, top_k: jax.Array,
                  top_p: jax.Array) -> jax.Array:
    """Next token per row of logits [B,V]: greedy when temperature == 0, else filtered sampling.

    top_k <= 0 and top_p >= 1 disable the respective filter. All arguments may be traced.
    """
    logits = logits.astype(jnp.float32)
    greedy = jnp.argmax(logits, axis=-1)
    scaled = logits / jnp.maximum(temperature, 1e-6)
    sorted_logits = jnp.sort(scaled, axis=-1)[:, ::-1]  # [B,V] descending
    vocab = logits.shape[-1]
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    kth = jnp.take_along_axis(sorted_logits, jnp.broadcast_to(k - 1, (logits.shape[0], 1)), axis=-1)
    scaled = jnp.where(scaled < kth, -jnp.inf, scaled)
    # top-p: keep the smallest prefix of the sorted distribution whose mass reaches p.
    sorted_probs = jax.nn.softmax(jnp.where(sorted_logits < kth, -jnp.inf, sorted_logits), axis=-1)
    mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
    keep_sorted = mass_before < top_p
    cutoff = jnp.min(jnp.where(keep_sorted, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    scaled = jnp.where(scaled < cutoff, -jnp.inf, scaled)
    sampled = jax.random.categorical(rng, scaled, axis=-1)
    return jnp.where(temperature <= 0.0, greedy, sampled).astype(jnp.int32)


def _prefill(model: Phi, variables, cache, tokens, segment_ids, last_index, rng, temperature, top_k,
             top_p):
    logits, cache = model.apply(variables, tokens, segment_ids=segment_ids, cache=cache)
    last = jnp.take_along_axis(logits, last_index[:, None, None], axis=1)[:, 0]  # [B,V]
    return sample_logits(last, rng, temperature, top_k, top_p), cache


def _decode(model: Phi, variables, cache, tokens, rng, temperature, top_k, top_p):
    logits, cache = model.apply(variables, tokens[:, None], cache=cache)
    return sample_logits(logits[:, 0], rng, temperature, top_k, top_p), cache


@functools.lru_cache(maxsize=32)
def compiled_steps(model: Phi) -> tuple[Callable, Callable]:
    """(prefill, decode) jitted once per model; the cache argument is donated."""
    prefill = jax.jit(functools.partial(_prefill, model), donate_argnums=(1,))
    decode = jax.jit(functools.partial(_decode, model), donate_argnums=(1,))
    return prefill, decode


def generate(model: Phi, variables, prompts: Sequence[Sequence[int]], max_new_tokens: int = 32, *,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
             stop_tokens: Sequence[int] | None = None,
             callback: Callable[[int, int], None] | None = None) -> list[list[int]]:
    """Generate up to `max_new_tokens` for each prompt.

    Args:
      model, variables: a `Phi` module and its variables ({"params": ...}).
      prompts: token-id lists, one per sequence, of any (non-zero) lengths.
      temperature: 0 = greedy; top_k (0 = off), top_p (1 = off) filter sampling.
      seed: sampling seed; the same seed and inputs give the same tokens.
      stop_tokens: ids that end a sequence (default: the config's eos). The stop token is
        included in the output, as transformers does.
      callback: called as callback(prompt_index, token_id) for every new token, in order.
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
    stop = np.asarray(sorted(set(stop_tokens)), dtype=np.int64)

    batch, bucket = len(prompts), prompt_bucket(max(lengths))
    slots = -(-(bucket + max_new_tokens) // _CACHE_ROUND) * _CACHE_ROUND
    tokens = np.zeros((batch, bucket), np.int32)
    segment_ids = np.zeros((batch, bucket), np.int32)
    for i, prompt in enumerate(prompts):
        tokens[i, :len(prompt)] = prompt
        segment_ids[i, :len(prompt)] = 1
    sampling = (jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p))
    key = jax.random.key(seed)
    prefill, decode = compiled_steps(model)

    cache = init_cache(config, batch, slots)
    next_tokens, cache = prefill(variables, cache, tokens, segment_ids,
                                 np.asarray(lengths, np.int32) - 1, jax.random.fold_in(key, 0),
                                 *sampling)
    outputs: list[list[int]] = [[] for _ in prompts]
    done = np.zeros(batch, bool)
    for step in range(max_new_tokens):
        host_tokens = np.asarray(next_tokens)
        for i in np.flatnonzero(~done):
            token = int(host_tokens[i])
            outputs[i].append(token)
            if callback is not None:
                callback(int(i), token)
            if token in stop:
                done[i] = True
        if done.all() or step == max_new_tokens - 1:
            break
        next_tokens, cache = decode(variables, cache, host_tokens, jax.random.fold_in(key, step + 1),
                                    *sampling)
    return outputs
