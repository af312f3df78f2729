"""Continuous batching: a fixed set of decode slots over one preallocated KV cache.

Letters: B decode slots, R decode rows in use, P padded prompt length (a bucket), S cache slots per
sequence, V vocab, L layers, K kv heads, H head dim, W top log-probs returned per token.

Why this shape: a server sees requests arrive and finish at arbitrary times. Running them as fixed
batches (as `phi_jax.generate` does) makes every request wait for the slowest in its batch. Here each
request owns one row ("slot") of a [L,B,K,S,H] cache while it runs:

* admission: its prompt is prefilled alone into a fresh 1-row cache of a power-of-two bucket length
  P (so at most log2(S) prefill programs are ever compiled), and that row is copied into row b of the
  big cache, whose length is reset to the prompt length;
* decoding: one jit-compiled [R,1] step advances every busy slot at once. R is the smallest power
  of two covering the highest busy slot (new requests take the lowest free slot), so a quiet server
  does not pay for B rows, and at most log2(B)+1 decode programs exist. Idle slots below R are fed
  with segment id 0, so their lengths never move and whatever they write is overwritten by the
  next prefill (stale keys beyond a row's length are masked causally);
* leaving: a finished or cancelled request just marks its slot free on the host.

Every row samples with its own key, fold_in(key(seed), i) for its i-th new token, exactly as
`phi_jax.generate` does for a single prompt, so a request's tokens do not depend on who shares the
batch. The engine runs in one thread (JAX calls block); callers talk to it through `submit`, and
receive `TokenEvent`s through a callback invoked on the engine thread.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import threading
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from phi_jax.generation import prompt_bucket
from phi_jax.sampling import sample_logits
from phi_jax.model import Phi, init_cache

TOP_LOGPROBS = 5  # W: the most alternatives a request may ask for (OpenAI's limit for completions)
_log = logging.getLogger(__name__)


class QueueFullError(RuntimeError):
    """The waiting queue is at capacity; the HTTP layer answers 429."""


class EngineStoppedError(RuntimeError):
    """The engine is not running (shut down or crashed); the HTTP layer answers 503."""


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Per-request decoding settings; temperature 0 is greedy, top_k <= 0 and top_p >= 1 are off."""

    max_tokens: int
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    stop_token_ids: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True)
class TokenEvent:
    """One new token of a request, or its end.

    token is None only on the final event of a request cancelled before producing anything.
    finish_reason: None while running; "stop" (a stop token), "length" (max_tokens) or "cancelled".
    """

    token: int | None
    logprob: float = 0.0
    top_ids: tuple[int, ...] = ()
    top_logprobs: tuple[float, ...] = ()
    finish_reason: str | None = None


class RequestHandle:
    """What `submit` returns: the request's identity and a thread-safe `cancel()`."""

    def __init__(self, prompt: list[int], params: SamplingParams, sink: Callable[[TokenEvent], None],
                 engine: "Engine"):
        self.prompt = prompt
        self.params = params
        self.sink = sink
        self.num_generated = 0
        self.finished = False
        self._cancelled = threading.Event()
        self._engine = engine

    def cancel(self) -> None:
        """Ask the engine to drop this request; its slot is freed before the next decode step."""
        self._cancelled.set()
        self._engine._wake()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()


def _pick(logits: jax.Array, keys: jax.Array, temperature, top_k, top_p):
    """Sample each row: logits [R,V], keys/temperature/top_k/top_p [R] ->
    (tokens [R], their log-probs [R], top-W ids [R,W], top-W log-probs [R,W]).

    Batched, not vmapped, so that an all-greedy batch skips the sampling filters (a `lax.cond`
    that vmap would turn into computing both branches). Log-probs are of the model's own
    distribution (before temperature and filtering), as OpenAI's are.
    """
    tokens = sample_logits(logits, keys, temperature, top_k, top_p)
    logprobs = jax.nn.log_softmax(logits.astype(jnp.float32))
    top_lp, top_ids = jax.lax.top_k(logprobs, TOP_LOGPROBS)
    chosen = jnp.take_along_axis(logprobs, tokens[:, None], axis=1)[:, 0]
    return tokens, chosen, top_ids.astype(jnp.int32), top_lp


def _token_key(seed: jax.Array, index: jax.Array) -> jax.Array:
    return jax.random.fold_in(jax.random.key(seed), index)


def _prefill(model: Phi, variables, cache, last_tokens, tokens, length, slot, seed, temperature,
             top_k, top_p):
    """Prefill one prompt tokens [1,P] (its first `length` real) into row `slot` of the big cache."""
    bucket = tokens.shape[1]
    row = init_cache(model.config, 1, bucket, dtype=cache["k"].dtype)
    segment_ids = (jnp.arange(bucket) < length).astype(jnp.int32)[None]  # [1,P]
    logits, row = model.apply(variables, tokens, segment_ids=segment_ids, cache=row)
    last = jax.lax.dynamic_index_in_dim(logits[0], length - 1, axis=0, keepdims=False)  # [V]
    picked = jax.tree.map(lambda x: x[0], _pick(last[None], _token_key(seed, 0)[None],
                                                 temperature[None], top_k[None], top_p[None]))
    zero = jnp.zeros((), jnp.int32)
    new_cache = {name: jax.lax.dynamic_update_slice(cache[name], row[name], (zero, slot, zero, zero, zero))
                 for name in ("k", "v")}  # [L,B,K,S,H] <- [L,1,K,P,H] at (0, slot, 0, 0, 0)
    new_cache["lengths"] = cache["lengths"].at[slot].set(length)
    return new_cache, last_tokens.at[slot].set(picked[0]), picked


def _decode(model: Phi, rows: int, variables, cache, last_tokens, active, seeds, steps, temperature,
            top_k, top_p):
    """One token for each of the first `rows` slots (R); the per-slot arguments are [R].

    Rows where `active` is False keep their length and token. Slots at or past `rows` are idle and
    are neither read nor written, so a half-empty server pays for R rows, not B.
    """
    sub = {name: cache[name][:, :rows] for name in ("k", "v")}  # [L,R,S,K,H]
    sub["lengths"] = cache["lengths"][:rows]
    segment_ids = active.astype(jnp.int32)[:, None]  # [R,1]: 0 = do not advance this row
    logits, sub = model.apply(variables, last_tokens[:rows, None], segment_ids=segment_ids, cache=sub)
    keys = jax.vmap(_token_key)(seeds, steps)
    picked = _pick(logits[:, 0], keys, temperature, top_k, top_p)
    tokens = jnp.where(active, picked[0], last_tokens[:rows])
    zero = jnp.zeros((), jnp.int32)
    new_cache = {name: jax.lax.dynamic_update_slice(cache[name], sub[name], (zero,) * 5)
                 for name in ("k", "v")}
    new_cache["lengths"] = cache["lengths"].at[:rows].set(sub["lengths"])
    return new_cache, last_tokens.at[:rows].set(tokens), picked


def _decode_many(model: Phi, rows: int, chunk: int, variables, cache, last_tokens, active, seeds,
                 steps, num_steps, temperature, top_k, top_p):
    """min(chunk, num_steps) `_decode` steps in one device call, for when no request is waiting.

    Step i samples with the keys of token index steps + i, exactly as i separate calls would.
    Rows that finish inside the chunk keep decoding into their own (soon freed) slot; the host
    drops those tokens. Returns (cache, last_tokens, picked with a leading [chunk] axis).
    """
    width = min(TOP_LOGPROBS, model.config.vocab_size)
    outs = (jnp.zeros((chunk, rows), jnp.int32), jnp.zeros((chunk, rows), jnp.float32),
            jnp.zeros((chunk, rows, width), jnp.int32), jnp.zeros((chunk, rows, width), jnp.float32))

    def body(i, carry):
        cache, last_tokens, outs = carry
        cache, last_tokens, picked = _decode(model, rows, variables, cache, last_tokens, active, seeds,
                                             steps + i, temperature, top_k, top_p)
        return cache, last_tokens, jax.tree.map(lambda buf, x: buf.at[i].set(x), outs, picked)

    return jax.lax.fori_loop(0, jnp.minimum(num_steps, chunk), body, (cache, last_tokens, outs))


@functools.lru_cache(maxsize=16)
def _compiled(model: Phi) -> tuple[Callable, Callable, Callable]:
    prefill = jax.jit(functools.partial(_prefill, model), donate_argnums=(1, 2))
    decode = jax.jit(functools.partial(_decode, model), static_argnums=(0,), donate_argnums=(2, 3))
    decode_many = jax.jit(functools.partial(_decode_many, model), static_argnums=(0, 1),
                          donate_argnums=(3, 4))
    return prefill, decode, decode_many


@dataclasses.dataclass
class _Stats:
    submitted: int = 0
    finished: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    prefills: int = 0
    decode_steps: int = 0
    generated_tokens: int = 0


class Engine:
    """Continuous-batching generation over `num_slots` decode slots.

    Args:
      model, variables: a `Phi` module and its variables ({"params": ...}).
      num_slots: B, how many requests decode at once.
      max_len: S, cache slots per request (prompt + new tokens); default and upper bound: the
        model's max_len.
      max_queue: requests that may wait for a slot; `submit` raises QueueFullError beyond it.
      decode_chunk: decode steps per device call while no request is waiting (1 = always one).
        Python's per-step round trip otherwise costs about as much as a small model's step; a
        request arriving mid-chunk waits at most decode_chunk - 1 steps to be admitted.
    """

    def __init__(self, model: Phi, variables, *, num_slots: int = 8, max_len: int | None = None,
                 max_queue: int = 256, decode_chunk: int = 8):
        config = model.config
        max_len = config.max_len if max_len is None else max_len
        if not 2 <= max_len <= config.max_len:
            raise ValueError(f"max_len={max_len} must be in [2, {config.max_len}] (the model's max_len); "
                             "lower --max-len")
        if num_slots < 1 or max_queue < 0 or decode_chunk < 1:
            raise ValueError(f"need num_slots >= 1, max_queue >= 0 and decode_chunk >= 1, got "
                             f"{num_slots}, {max_queue}, {decode_chunk}")
        self.model, self.variables = model, variables
        self.num_slots, self.max_len, self.max_queue = num_slots, max_len, max_queue
        self.decode_chunk = decode_chunk
        self._prefill_fn, self._decode_fn, self._decode_many_fn = _compiled(model)
        self._cache = init_cache(config, num_slots, max_len)
        self._last_tokens = jnp.zeros((num_slots,), jnp.int32)
        b = num_slots
        self._slots: list[RequestHandle | None] = [None] * b
        self._seeds = np.zeros(b, np.uint32)
        self._temperature = np.zeros(b, np.float32)
        self._top_k = np.zeros(b, np.int32)
        self._top_p = np.ones(b, np.float32)
        self._pending: collections.deque[RequestHandle] = collections.deque()
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.error: BaseException | None = None
        self.stats = _Stats()

    # ------------------------------------------------------------------------------- public API
    def prefill_buckets(self) -> list[int]:
        """Every prefill length P that can ever be compiled (powers of two, capped at max_len)."""
        buckets, p = [], prompt_bucket(1)
        while p < self.max_len:
            buckets.append(p)
            p *= 2
        return buckets + [self.max_len]

    def row_buckets(self) -> list[int]:
        """Every decode batch R that can be compiled: powers of two below num_slots, and num_slots."""
        return [r for r in (1 << i for i in range(self.num_slots.bit_length())) if r < self.num_slots] \
            + [self.num_slots]

    def rows_for(self, highest_slot: int) -> int:
        """The decode batch that covers slots 0..highest_slot."""
        return next(r for r in self.row_buckets() if r > highest_slot)

    def bucket(self, prompt_length: int) -> int:
        return min(prompt_bucket(prompt_length), self.max_len)

    def check_fits(self, prompt_length: int, max_tokens: int) -> None:
        """Raise ValueError when a prompt plus its new tokens cannot fit one cache row."""
        if prompt_length < 1:
            raise ValueError("the prompt is empty; give at least one token")
        if prompt_length + max_tokens > self.max_len:
            raise ValueError(f"the prompt ({prompt_length} tokens) plus max_tokens ({max_tokens}) exceeds "
                             f"the context of {self.max_len} tokens; shorten the prompt or lower max_tokens")

    def submit(self, prompt: Sequence[int], params: SamplingParams,
               sink: Callable[[TokenEvent], None]) -> RequestHandle:
        """Queue a request; `sink(event)` is then called on the engine thread for every new token.

        Raises ValueError (does not fit / bad ids), QueueFullError, EngineStoppedError.
        """
        prompt = [int(t) for t in prompt]
        self.check_fits(len(prompt), params.max_tokens)
        if params.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {params.max_tokens}")
        vocab = self.model.config.vocab_size
        if any(not 0 <= t < vocab for t in prompt):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        handle = RequestHandle(prompt, params, sink, self)
        with self._cv:
            if self.error is not None or self._stopping or self._thread is None:
                raise EngineStoppedError("the generation engine is not running"
                                         + (f" (it failed: {self.error!r})" if self.error else ""))
            if len(self._pending) >= self.max_queue:
                raise QueueFullError(f"{len(self._pending)} requests are already waiting; retry later")
            self._pending.append(handle)
            self.stats.submitted += 1
            self._cv.notify()
        return handle

    def start(self) -> "Engine":
        with self._cv:
            if self._thread is None:
                self._stopping = False
                self._thread = threading.Thread(target=self._run, name="phi-jax-engine", daemon=True)
                self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the loop; requests still queued or running end with finish_reason "cancelled"."""
        with self._cv:
            self._stopping = True
            self._cv.notify()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)
        with self._cv:
            self._thread = None

    def warmup(self, buckets: Sequence[int] | None = None) -> None:
        """Compile the decode step and the prefill of each bucket now (default: all of them).

        Call before `start`; it only writes into slot 0, which is free.
        """
        if self._thread is not None:
            raise RuntimeError("warmup() must run before start()")
        for bucket in self.prefill_buckets() if buckets is None else buckets:
            self._run_prefill(0, [0], bucket, SamplingParams(max_tokens=1))
        for rows in self.row_buckets():
            self._run_decode(rows, np.zeros(rows, bool), np.zeros(rows, np.int32))
            if self.decode_chunk > 1:
                self._run_decode(rows, np.zeros(rows, bool), np.zeros(rows, np.int32), 1)
        jax.block_until_ready(self._cache)

    def running_requests(self) -> list[RequestHandle]:
        """The requests holding a decode slot right now (a snapshot)."""
        return [h for h in list(self._slots) if h is not None]

    @property
    def num_active(self) -> int:
        return sum(s is not None for s in self._slots)

    @property
    def num_waiting(self) -> int:
        return len(self._pending)

    @property
    def healthy(self) -> bool:
        return self.error is None and self._thread is not None and not self._stopping

    # ------------------------------------------------------------------------------ the loop
    def _wake(self) -> None:
        with self._cv:
            self._cv.notify()

    def _run(self) -> None:
        try:
            while True:
                with self._cv:
                    while not (self._stopping or self._pending or self.num_active):
                        self._cv.wait()
                    if self._stopping:
                        break
                    admitted = []
                    free = [b for b, s in enumerate(self._slots) if s is None]
                    while free and self._pending:
                        handle = self._pending.popleft()
                        if handle.cancelled:
                            self._finish(handle, None, "cancelled")
                        else:
                            admitted.append((free.pop(0), handle))
                for slot, handle in admitted:
                    self._admit(slot, handle)
                for slot, handle in enumerate(self._slots):
                    if handle is not None and handle.cancelled:
                        self._release(slot, "cancelled")
                if self.num_active:
                    self._step()
        except BaseException as e:  # noqa: BLE001 - every waiting client must hear about it
            _log.exception("generation engine failed")
            self.error = e
        finally:
            with self._cv:
                leftovers = [h for h in self._slots if h is not None] + list(self._pending)
                self._slots = [None] * self.num_slots
                self._pending.clear()
            for handle in leftovers:
                self._finish(handle, None, "cancelled")

    def _run_prefill(self, slot: int, prompt: list[int], bucket: int, params: SamplingParams):
        tokens = np.zeros((1, bucket), np.int32)
        tokens[0, :len(prompt)] = prompt
        self._cache, self._last_tokens, picked = self._prefill_fn(
            self.variables, self._cache, self._last_tokens, tokens, np.int32(len(prompt)),
            np.int32(slot), np.uint32(params.seed % 2**32), np.float32(params.temperature),
            np.int32(params.top_k), np.float32(params.top_p))
        self.stats.prefills += 1
        return picked

    def _run_decode(self, rows: int, active: np.ndarray, steps: np.ndarray, many: int = 0):
        """One decode step (picked [R] ...), or with many >= 1 up to that many in one call
        (picked [decode_chunk, R] ...)."""
        sampling = (self._temperature[:rows], self._top_k[:rows], self._top_p[:rows])
        if many:
            self._cache, self._last_tokens, picked = self._decode_many_fn(
                rows, self.decode_chunk, self.variables, self._cache, self._last_tokens, active,
                self._seeds[:rows], steps, np.int32(many), *sampling)
        else:
            self._cache, self._last_tokens, picked = self._decode_fn(
                rows, self.variables, self._cache, self._last_tokens, active, self._seeds[:rows],
                steps, *sampling)
        self.stats.decode_steps += max(1, many)
        return picked

    def _admit(self, slot: int, handle: RequestHandle) -> None:
        p = handle.params
        picked = self._run_prefill(slot, handle.prompt, self.bucket(len(handle.prompt)), p)
        self._slots[slot] = handle
        self._seeds[slot] = p.seed % 2**32
        self._temperature[slot], self._top_k[slot], self._top_p[slot] = p.temperature, p.top_k, p.top_p
        token, logprob, top_ids, top_lps = jax.device_get(picked)
        self._emit(slot, int(token), float(logprob), top_ids, top_lps)

    def _step(self) -> None:
        rows = self.rows_for(max(b for b, s in enumerate(self._slots) if s is not None))
        active = np.array([s is not None for s in self._slots[:rows]])
        steps = np.array([0 if s is None else s.num_generated for s in self._slots[:rows]], np.int32)
        many = 0
        if self.decode_chunk > 1 and not self._pending:  # nobody to admit: several steps per call
            many = min(self.decode_chunk, max(s.params.max_tokens - s.num_generated
                                              for s in self._slots[:rows] if s is not None))
        picked = jax.device_get(self._run_decode(rows, active, steps, many))
        columns = [picked] if not many else [tuple(x[i] for x in picked) for i in range(many)]
        handles = list(self._slots[:rows])
        for tokens, logprobs, top_ids, top_lps in columns:
            for slot in np.flatnonzero(active):
                if self._slots[slot] is handles[slot]:  # still running (finished ones are None)
                    self._emit(int(slot), int(tokens[slot]), float(logprobs[slot]), top_ids[slot],
                               top_lps[slot])

    def _emit(self, slot: int, token: int, logprob: float, top_ids, top_lps) -> None:
        handle = self._slots[slot]
        handle.num_generated += 1
        self.stats.generated_tokens += 1
        reason = None
        if token in handle.params.stop_token_ids:
            reason = "stop"
        elif handle.num_generated >= handle.params.max_tokens:
            reason = "length"
        event = TokenEvent(token, logprob, tuple(int(i) for i in top_ids),
                           tuple(float(x) for x in top_lps), reason)
        if reason is not None:
            self._slots[slot] = None
            handle.finished = True
            self.stats.finished[reason] += 1
        self._deliver(handle, event)

    def _release(self, slot: int, reason: str) -> None:
        handle = self._slots[slot]
        self._slots[slot] = None
        self._finish(handle, None, reason)

    def _finish(self, handle: RequestHandle, token: int | None, reason: str) -> None:
        if handle.finished:
            return
        handle.finished = True
        self.stats.finished[reason] += 1
        self._deliver(handle, TokenEvent(token, finish_reason=reason))

    @staticmethod
    def _deliver(handle: RequestHandle, event: TokenEvent) -> None:
        try:
            handle.sink(event)
        except Exception:  # noqa: BLE001 - a broken consumer must not stop the other requests
            _log.exception("a request's token sink failed; cancelling that request")
            handle._cancelled.set()

