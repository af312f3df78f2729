"""THE decoder: slot prefill and chunked on-device decoding over one KV cache, per-row sampling keys.

Letters: B cache rows (slots), N rows prefilled in one call, P padded prompt length (a bucket),
R decode rows in use (a prefix of the slots), C chunk size (decode steps per device call),
E stop ids per row, W top log-probs per token, V vocab, M = ceil(V/32) token-mask words per row.
The cache is [layers,B,K,S,H] (see model.py).

Two jitted functions do all of it, and both `generate` (a fixed batch) and the serving engine
(requests that come and go) call them, so there is one implementation of prefill, decode, stop
handling and sampling:

  * `prefill`: N prompts (or the parts of them not yet in the cache: the rest after a reused
    prefix, or one chunk of a long prompt), right-padded to a power-of-two bucket P, run through
    the model on their cache rows `slots` from each row's own start; each row's next token is
    picked from the logits at its own last position;
  * `decode_chunk`: up to C steps over the first R rows in one `lax.while_loop`, which stops early
    once every row is finished. A row finishes at one of its stop ids or when its token budget is
    spent; finished and inactive rows do not advance (their cache length stays put).

Structured outputs are a per-row token mask ([N,M] / [R,M] int32 bitmasks, llguidance's layout,
see `phi_jax.inference.grammar`) that both functions take: a forbidden token's logit becomes -inf
before sampling. An unconstrained row's mask allows everything, which leaves its logits, and so its
tokens, exactly as they were; with no constrained row at all the mask is None and the programs are
those without masks. A mask holds for one token, so a batch with a constrained row decodes
one step per call (`num_steps=1`), the host advancing each row's grammar between calls; a chunk's
later steps are unmasked.

Every row samples token i with key fold_in(key(seed_row), i) (the prefill token is i = 0), so a
sequence's tokens depend only on its prompt, its seed and its settings — never on the batch it
shares, the chunk size, or whether the server or `generate` ran it. Sampling settings are traced
[R] arrays: changing them, or prompt lengths within a bucket, compiles nothing new.
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from phi_jax.errors import InputError, RunError
from phi_jax.inference.grammar import Constraint, fill_masks
from phi_jax.inference.sampling import sample_logits
from phi_jax.model import (Phi, cache_arrays, cache_rows, gather_cache_rows, init_cache,
                           put_cache_rows,
                           scatter_cache_rows)

MIN_BUCKET = 16
TOP_LOGPROBS = 20  # W: the most alternatives a caller may ask for (OpenAI's limit for chat)
_CACHE_ROUND = 64


def prompt_bucket(length: int) -> int:
    """Padded prompt length: the next power of two, at least MIN_BUCKET."""
    return max(MIN_BUCKET, 1 << max(0, (length - 1).bit_length()))


MIN_SPAN = 256


def span_bucket(needed: int, capacity: int) -> int:
    """Slots a decode call attends over: the next power of two >= needed (at least MIN_SPAN),
    capped at the cache's capacity."""
    return min(capacity, max(MIN_SPAN, 1 << max(0, (needed - 1).bit_length())))


def stop_id_width(count: int) -> int:
    """E for `count` stop ids: 8, or the next power of two beyond (bounds the compiled variants)."""
    return max(8, 1 << max(0, (count - 1).bit_length()))


def seed_key(seed: jax.Array) -> jax.Array:
    """The sampling key of a seed (uint32; callers reduce larger seeds mod 2**32)."""
    return jax.random.key(seed)


def new_cache(config, rows: int, slots: int) -> dict:
    """An empty KV cache of `rows` sequences x `slots` positions (see `phi_jax.model.init_cache`;
    int8 with per-token, per-kv-head scales when `config.kv_cache_dtype` says so)."""
    return init_cache(config, rows, slots)


def new_last_tokens(rows: int) -> jax.Array:
    """Each row's most recent token, the input of its next decode step."""
    return jnp.zeros((rows,), jnp.int32)


def apply_token_masks(logits: jax.Array, masks: jax.Array) -> jax.Array:
    """logits [R,V] with every token that masks [R,M] (bit v%32 of word v//32) forbids at -inf."""
    rows, vocab = logits.shape
    bits = (masks[:, :, None] >> jnp.arange(32, dtype=jnp.int32)) & 1  # [R,M,32]
    allowed = bits.reshape(rows, -1)[:, :vocab].astype(bool)  # [R,V]
    return jnp.where(allowed, logits, -jnp.inf)


def _pick(logits: jax.Array, seeds: jax.Array, index: jax.Array, temperature, top_k, top_p,
          with_logprobs: bool, masks: jax.Array | None = None):
    """Token for each row of logits [R,V] with key fold_in(key(seeds[r]), index[r]), among the
    tokens masks [R,M] allow (None: all).

    Returns (tokens [R], and with_logprobs: their log-probs [R], top-W ids [R,W], top-W
    log-probs [R,W]). Batched rather than vmapped, so an all-greedy batch skips the sampling
    filters. Log-probs are the model's own (before temperature, filtering and masks), as OpenAI's
    and vLLM's are.
    """
    keys = jax.vmap(lambda s, i: jax.random.fold_in(seed_key(s), i))(seeds, index)
    allowed = logits if masks is None else apply_token_masks(logits, masks)
    tokens = sample_logits(allowed, keys, temperature, top_k, top_p)
    if not with_logprobs:
        return (tokens,)
    logprobs = jax.nn.log_softmax(logits.astype(jnp.float32))
    width = min(TOP_LOGPROBS, logits.shape[-1])
    top_lp, top_ids = jax.lax.top_k(logprobs, width)
    chosen = jnp.take_along_axis(logprobs, tokens[:, None], axis=1)[:, 0]
    return tokens, chosen, top_ids.astype(jnp.int32), top_lp


def _prefill(model: Phi, with_logprobs: bool, span: int, variables, cache, last_tokens, tokens,
             starts, lengths, slots, seeds, temperature, top_k, top_p, masks=None):
    """Prefill tokens [N,P] (row n's first lengths[n] real) into cache rows slots [N], after the
    starts[n] positions each row already holds (a reused prefix, or earlier chunks of its prompt);
    the first new tokens are chosen among those masks [N,M] allow (None: any).

    The rows are copied out of the cache for their first `span` positions (a static bucket >=
    starts + P), run through the model at positions starts[n] + t, and written back; so one
    function prefills a whole prompt (starts 0), the rest of a prompt after a cached prefix, and
    each chunk of a long prompt. Rows whose slot is out of range (>= B) are padding: they read
    some row and write nothing, so N can be bucketed too.
    Returns (cache, last_tokens with the picked tokens at `slots`, picked tuple of [N] arrays);
    a row's pick is its next token only on the chunk that ends its prompt.
    """
    n, bucket = tokens.shape
    rows = {name: gather_cache_rows(cache[name], slots, span) for name in cache_arrays(cache)}
    rows["lengths"] = starts  # [layers,N,K,span,H] holding starts[n] valid positions
    segment_ids = (jnp.arange(bucket)[None, :] < lengths[:, None]).astype(jnp.int32)  # [N,P]
    logits, rows = model.apply(variables, tokens, segment_ids=segment_ids, cache=rows)
    at = jnp.maximum(lengths - 1, 0)[:, None, None]
    last = jnp.take_along_axis(logits, at, axis=1)[:, 0]  # [N,V]
    picked = _pick(last, seeds, jnp.zeros_like(lengths), temperature, top_k, top_p, with_logprobs, masks)
    new_cache = {name: scatter_cache_rows(cache[name], slots, rows[name])
                 for name in cache_arrays(cache)}  # [layers,B,K,S,H] <- [layers,N,K,span,H] at `slots`
    new_cache["lengths"] = cache["lengths"].at[slots].set(starts + lengths, mode="drop")
    return new_cache, last_tokens.at[slots].set(picked[0], mode="drop"), picked


def _decode_chunk(model: Phi, rows: int, chunk: int, with_logprobs: bool, span: int, variables,
                  cache, last_tokens, active, seeds, steps, budgets, stop_ids, temperature, top_k,
                  top_p, num_steps, masks=None):
    """Up to min(chunk, num_steps) decode steps over cache rows [0, rows) (R) and slots [0, span).

    Attention reads every slot it is given, so the caller passes the smallest `span` (a static
    bucket) that holds each active row's length plus the chunk: a server whose cache rows hold
    4096 slots but whose requests use 300 reads 512 per step, not 4096. The rows and slots in
    use are copied out once per call and written back after the loop.

    Args (per-row arrays are [R]):
      active: rows that decode; the others are neither advanced nor written.
      steps: index of each row's next token (its key is fold_in(key(seed), steps + i)).
      budgets: tokens each row may still produce; a row stops when it is spent.
      stop_ids: [R,E] stop tokens per row, padded with -1.
      masks: [R,M] the tokens each row may choose at the chunk's first step (later steps: any);
        None (no row constrained) compiles the unmasked program.
    Returns (cache, last_tokens, active after the chunk, count of steps run, outputs) where outputs
    are [C,R] tokens (-1 where a row was not active) and, with_logprobs, [C,R] log-probs, [C,R,W]
    top ids and [C,R,W] top log-probs; columns from `count` on are unused.
    """
    width = min(TOP_LOGPROBS, model.config.vocab_size)
    sub = {name: cache_rows(cache[name], rows, span) for name in cache_arrays(cache)}
    sub["lengths"] = cache["lengths"][:rows]
    outs = [jnp.full((chunk, rows), -1, jnp.int32)]
    if with_logprobs:
        outs += [jnp.zeros((chunk, rows), jnp.float32), jnp.zeros((chunk, rows, width), jnp.int32),
                 jnp.zeros((chunk, rows, width), jnp.float32)]
    limit = jnp.minimum(num_steps, chunk)

    def cond(state):
        i, _, _, active, _ = state
        return (i < limit) & jnp.any(active)

    def body(state):
        i, sub, tokens, active, outs = state
        logits, sub = model.apply(variables, tokens[:, None], segment_ids=active.astype(jnp.int32)[:, None],
                                  cache=sub)
        step_masks = None if masks is None else jnp.where(i == 0, masks, -1)  # holds for one token
        picked = _pick(logits[:, 0], seeds, steps + i, temperature, top_k, top_p, with_logprobs,
                       step_masks)
        new = jnp.where(active, picked[0], -1)
        tokens = jnp.where(active, picked[0], tokens)
        hit_stop = jnp.any(new[:, None] == stop_ids, axis=1)
        still = active & ~hit_stop & (i + 1 < budgets)
        outs = [outs[0].at[i].set(new)] + [o.at[i].set(p) for o, p in zip(outs[1:], picked[1:])]
        return i + 1, sub, tokens, still, outs

    count, sub, tokens, active, outs = jax.lax.while_loop(
        cond, body, (jnp.int32(0), sub, last_tokens[:rows], active, outs))
    new_cache = {name: put_cache_rows(cache[name], sub[name]) for name in cache_arrays(cache)}
    new_cache["lengths"] = cache["lengths"].at[:rows].set(sub["lengths"])
    return new_cache, last_tokens.at[:rows].set(tokens), active, count, tuple(outs)


@functools.lru_cache(maxsize=32)
def compiled_prefill(model: Phi, with_logprobs: bool = False) -> Callable:
    """`_prefill` jitted once per (model, with_logprobs); span is static, cache and last tokens
    are donated."""
    return jax.jit(functools.partial(_prefill, model, with_logprobs), static_argnums=(0,),
                   donate_argnums=(2, 3))


@functools.lru_cache(maxsize=32)
def compiled_decode_chunk(model: Phi, with_logprobs: bool = False) -> Callable:
    """`_decode_chunk` jitted once per (model, with_logprobs); rows, chunk and span are static."""
    return jax.jit(functools.partial(_decode_chunk, model), static_argnums=(0, 1, 2, 3),
                   donate_argnums=(5, 6))


def padded_stop_ids(stop_tokens: Sequence[Sequence[int]]) -> np.ndarray:
    """Per-row stop id lists -> [R,E] int32 padded with -1 (E from `stop_id_width`)."""
    width = stop_id_width(max((len(s) for s in stop_tokens), default=0))
    out = np.full((len(stop_tokens), width), -1, np.int32)
    for r, ids in enumerate(stop_tokens):
        out[r, :len(ids)] = sorted(set(int(t) for t in ids))
    return out


def generate(model: Phi, variables, prompts: Sequence[Sequence[int]], max_new_tokens: int = 32, *,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             seed: int | Sequence[int] = 0, stop_tokens: Sequence[int] | None = None,
             callback: Callable[[int, int], None] | None = None,
             chunk_size: int = 16,
             constraints: Sequence[Constraint | None] | Constraint | None = None) -> list[list[int]]:
    """Generate up to `max_new_tokens` for each prompt.

    Args:
      model, variables: a `Phi` module and its variables ({"params": ...}).
      prompts: token-id lists, one per sequence, of any (non-zero) lengths.
      temperature: 0 = greedy; top_k (0 = off), top_p (1 = off) filter sampling.
      seed: one int (prompt i samples with seed + i, as the server's choice i of a request with
        `n` choices does) or one seed per prompt. A sequence's tokens depend only on its prompt,
        its seed and the settings, so `generate([p], seed=s)` equals the server's answer for p
        with seed s, and equals that row of any batch that gives p the seed s.
      stop_tokens: ids that end a sequence (default: the config's eos). The stop token is
        included in the output, as transformers does.
      callback: called as callback(prompt_index, token_id) for every new token, in order; a
        return value of True ends that sequence there (how text-level stop strings end a row
        without waiting for its token budget).
      chunk_size: decode steps per device call. The tokens never depend on it; it only sets how
        often control returns to Python (and so the callback's granularity: 1 = every token).
      constraints: a `grammar.Constraint` for every prompt, or one per prompt (None = free), from
        `phi_jax.inference.grammar.compile_constraint` (a JSON schema, choice, regex or lark
        grammar). A constrained sequence only ever holds tokens its grammar allows and ends with
        the eos token once the grammar is complete; while any sequence is constrained the batch
        decodes one token per device call. Free rows keep exactly the tokens they get without.
    On CPU, pass the model through `phi_jax.model.inference_layout` first (`phi_jax.inference.load`
    does): it unstacks scanned layers, which decodes up to ~2x faster there.
    Returns:
      One list of new token ids per prompt.
    """
    config = model.config
    if not prompts:
        return []
    lengths = [len(p) for p in prompts]
    if min(lengths) == 0:
        raise InputError("every prompt needs at least one token; prepend the bos token to empty prompts")
    if max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if chunk_size < 1:
        raise InputError(f"chunk_size must be >= 1, got {chunk_size}")
    if max(lengths) + max_new_tokens > config.max_len:
        raise InputError(f"the longest prompt ({max(lengths)} tokens) plus max_new_tokens "
                         f"({max_new_tokens}) exceeds the model's max_len {config.max_len}; "
                         "shorten the prompt or lower max_new_tokens")
    for i, prompt in enumerate(prompts):
        bad = [t for t in prompt if not 0 <= t < config.vocab_size]
        if bad:
            raise InputError(f"prompt {i} has token ids {bad[:5]} outside the vocabulary "
                             f"[0, {config.vocab_size}); check the tokenizer matches the model")
    batch = len(prompts)
    seeds = [seed + i for i in range(batch)] if isinstance(seed, int) else [int(s) for s in seed]
    if len(seeds) != batch:
        raise InputError(f"{len(seeds)} seeds for {batch} prompts; give one seed or one per prompt")
    if stop_tokens is None:
        stop_tokens = [] if config.eos_token_id is None else [config.eos_token_id]
    stop = set(int(t) for t in stop_tokens)
    if isinstance(constraints, Constraint) or constraints is None:
        constraints = [constraints] * batch
    if len(constraints) != batch:
        raise InputError(f"{len(constraints)} constraints for {batch} prompts; give one or one per prompt")
    matchers = [None if c is None else c.new_matcher() for c in constraints]
    eos = config.eos_token_id
    if any(matchers) and (eos is None or eos not in stop):
        raise InputError("a constrained sequence ends with the eos token; keep the model's eos "
                         f"({eos}) among stop_tokens")

    def masks(rows: np.ndarray) -> np.ndarray | None:
        """Token masks for the rows still running (all tokens where free or finished)."""
        if not any(matchers):
            return None
        return fill_masks([m if r else None for m, r in zip(matchers, rows)], config.vocab_size)

    bucket = prompt_bucket(max(lengths))
    slots = -(-(bucket + max_new_tokens) // _CACHE_ROUND) * _CACHE_ROUND
    tokens = np.zeros((batch, bucket), np.int32)
    for i, prompt in enumerate(prompts):
        tokens[i, :len(prompt)] = prompt
    row = lambda value, dtype: np.full(batch, value, dtype)
    sampling = (row(temperature, np.float32), row(max(int(top_k), 0), np.int32), row(top_p, np.float32))
    seeds = np.asarray([s % 2**32 for s in seeds], np.uint32)
    stop_ids = padded_stop_ids([sorted(stop)] * batch)

    cache, last = new_cache(config, batch, slots), new_last_tokens(batch)
    cache, last, picked = compiled_prefill(model)(
        bucket, variables, cache, last, tokens, np.zeros(batch, np.int32), np.asarray(lengths, np.int32),
        np.arange(batch, dtype=np.int32), seeds, *sampling, masks(np.ones(batch, bool)))
    decode = compiled_decode_chunk(model)
    outputs: list[list[int]] = [[] for _ in prompts]
    done = np.zeros(batch, bool)

    def emit(column: np.ndarray) -> None:
        for i in np.flatnonzero(~done):
            token = int(column[i])
            outputs[i].append(token)
            ended = callback is not None and callback(int(i), token) is True
            if ended or token in stop or len(outputs[i]) >= max_new_tokens:
                done[i] = True
            elif matchers[i] is not None and not matchers[i].consume(token):
                raise RunError(f"the grammar of prompt {i} rejected token {token} that its mask "
                               f"allowed ({matchers[i].error}); this is a bug, please report it")

    emit(np.asarray(picked[0]))
    constrained = any(matchers)
    while not done.all():
        produced = len(outputs[int(np.flatnonzero(~done)[0])])
        cache, last, _, count, outs = decode(
            batch, chunk_size, False, slots, variables, cache, last, ~done, seeds,
            np.full(batch, produced, np.int32), np.full(batch, max_new_tokens - produced, np.int32),
            stop_ids, *sampling, np.int32(1 if constrained else max_new_tokens - produced),
            masks(~done))
        new = np.asarray(outs[0])
        for column in range(int(count)):
            emit(new[column])
    return outputs
