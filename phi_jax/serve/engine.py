"""Continuous batching: requests come and go over a fixed set of decode slots of one KV cache.

Letters: B decode slots, R decode rows in use, P padded prompt length (a bucket), S cache slots per
sequence, V vocab, W top log-probs returned per token.

Why this shape: a server sees requests arrive and finish at arbitrary times. Running them as fixed
batches (as `generate` does) makes every request wait for the slowest in its batch. Here each
request owns one row ("slot") of the cache while it runs, and the engine only schedules: all
device work is `phi_jax.inference.decode`'s, the same prefill and decode `generate` runs.

* admission: the prompt is prefilled into its slot (`decode.prefill`, one row, a power-of-two
  bucket, so at most log2(S) prefill programs are ever compiled);
* decoding: `decode.decode_chunk` advances every busy slot at once over R rows, the smallest power
  of two covering the highest busy slot (new requests take the lowest free slot), so a quiet server
  does not pay for B rows, and at most log2(B)+1 decode programs exist. While no request waits,
  up to `decode_chunk` steps run per device call; otherwise one, so a newcomer is admitted at once;
* leaving: rows stop on the device at a stop token or when their budget is spent; a cancelled
  request just marks its slot free on the host;
* structured outputs: a request with a `grammar.Constraint` carries its own matcher. While any busy
  slot is constrained, each device call is one step with an [R,M] token mask (the grammar's for
  constrained rows, all tokens for the others), filled on the host between steps; the matchers
  advance by the tokens chosen. Free rows' tokens are the same as without the constrained ones.

Every request samples token i with fold_in(key(seed), i), exactly as `generate` does, so its tokens
do not depend on who shares the batch. The engine runs in one thread (JAX calls block); callers talk
to it through `submit`, and receive `TokenEvent`s through a callback on the engine thread. A
request whose admission fails gets an error event and the engine carries on; a failure of a decode
step (which all rows share) stops the engine, and `on_fatal` is called so the server can exit
rather than answer 503 forever.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
from typing import Any, Callable, Sequence

import jax
import numpy as np

from phi_jax import _faults
from phi_jax.errors import InputError, RunError
from phi_jax.inference import decode, grammar
from phi_jax.inference.decode import TOP_LOGPROBS  # noqa: F401  (re-exported for the HTTP layer)
from phi_jax.inference.sampling import SamplingParams

_log = logging.getLogger(__name__)


class QueueFullError(RunError):
    """The waiting queue is at capacity; the HTTP layer answers 429."""


class EngineStoppedError(RunError):
    """The engine is not running (shut down or crashed); the HTTP layer answers 503."""


@dataclasses.dataclass(frozen=True)
class TokenEvent:
    """One new token of a request, or its end.

    token is None only on a final event without a token (cancelled, or failed before producing).
    finish_reason: None while running; "stop" (a stop token), "length" (max_tokens), "cancelled",
    or "error" (this request failed; `error` says why, and the engine carries on).
    """

    token: int | None
    logprob: float = 0.0
    top_ids: tuple[int, ...] = ()
    top_logprobs: tuple[float, ...] = ()
    finish_reason: str | None = None
    error: str | None = None


class RequestHandle:
    """What `submit` returns: the request's identity and a thread-safe `cancel()`."""

    def __init__(self, prompt: list[int], params: SamplingParams, sink: Callable[[TokenEvent], None],
                 engine: "Engine", matcher: "grammar.RowMatcher | None" = None):
        self.prompt = prompt
        self.matcher = matcher
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
      on_fatal: called (on the engine thread) with the exception when the engine stops because
        of a failure every request shares; the CLI server shuts down and exits non-zero.
    """

    def __init__(self, model: Any, variables, *, num_slots: int = 8, max_len: int | None = None,
                 max_queue: int = 256, decode_chunk: int = 8,
                 on_fatal: Callable[[BaseException], None] | None = None):
        config = model.config
        max_len = config.max_len if max_len is None else max_len
        if not 2 <= max_len <= config.max_len:
            raise InputError(f"max_len={max_len} must be in [2, {config.max_len}] (the model's "
                             "max_len); lower --max-len")
        if num_slots < 1 or max_queue < 0 or decode_chunk < 1:
            raise InputError(f"need num_slots >= 1, max_queue >= 0 and decode_chunk >= 1, got "
                             f"{num_slots}, {max_queue}, {decode_chunk}")
        self.model, self.variables = model, variables
        self.num_slots, self.max_len, self.max_queue = num_slots, max_len, max_queue
        self.decode_chunk = decode_chunk
        self.on_fatal = on_fatal
        self._prefill_fn = decode.compiled_prefill(model, True)
        self._decode_fn = decode.compiled_decode_chunk(model, True)
        self._cache = decode.new_cache(config, num_slots, max_len)
        self._last_tokens = decode.new_last_tokens(num_slots)
        b = num_slots
        self._slots: list[RequestHandle | None] = [None] * b
        self._seeds = np.zeros(b, np.uint32)
        self._temperature = np.zeros(b, np.float32)
        self._top_k = np.zeros(b, np.int32)
        self._top_p = np.ones(b, np.float32)
        self._stop_ids = decode.padded_stop_ids([()] * b)
        self._pending: collections.deque[RequestHandle] = collections.deque()
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.error: BaseException | None = None
        self.stats = _Stats()

    # ------------------------------------------------------------------------------- public API
    def prefill_buckets(self) -> list[int]:
        """Every prefill length P that can ever be compiled (powers of two, capped at max_len)."""
        buckets, p = [], decode.prompt_bucket(1)
        while p < self.max_len:
            buckets.append(p)
            p *= 2
        return buckets + [self.max_len]

    def row_buckets(self) -> list[int]:
        """Every decode batch R that can be compiled: powers of two below num_slots, and num_slots."""
        return [r for r in (1 << i for i in range(self.num_slots.bit_length())) if r < self.num_slots] \
            + [self.num_slots]

    def span_buckets(self) -> list[int]:
        """Every number of cache slots a decode call can attend over (see `decode.span_bucket`)."""
        spans = {decode.span_bucket(n, self.max_len) for n in (1 << i for i in range(31))}
        return sorted(s for s in spans if s <= self.max_len)

    def rows_for(self, highest_slot: int) -> int:
        """The decode batch that covers slots 0..highest_slot."""
        return next(r for r in self.row_buckets() if r > highest_slot)

    def bucket(self, prompt_length: int) -> int:
        return min(decode.prompt_bucket(prompt_length), self.max_len)

    def check_fits(self, prompt_length: int, max_tokens: int) -> None:
        """Raise InputError when a prompt plus its new tokens cannot fit one cache row."""
        if prompt_length < 1:
            raise InputError("the prompt is empty; give at least one token")
        if prompt_length + max_tokens > self.max_len:
            raise InputError(f"the prompt ({prompt_length} tokens) plus max_tokens ({max_tokens}) "
                             f"exceeds the context of {self.max_len} tokens; shorten the prompt or "
                             "lower max_tokens")

    def submit(self, prompt: Sequence[int], params: SamplingParams,
               sink: Callable[[TokenEvent], None],
               constraint: "grammar.Constraint | None" = None) -> RequestHandle:
        """Queue a request; `sink(event)` is then called on the engine thread for every new token.

        `constraint` (from `grammar.compile_constraint`) limits the answer to a JSON schema, a
        choice, a regex or a lark grammar; it needs the model's eos among the stop token ids.

        Raises InputError (bad parameters / does not fit / bad ids), QueueFullError,
        EngineStoppedError.
        """
        prompt = [int(t) for t in prompt]
        vocab = self.model.config.vocab_size
        params = params.validated(vocab_size=vocab, context=self.max_len, prompt_length=len(prompt))
        self.check_fits(len(prompt), params.max_tokens)
        if any(not 0 <= t < vocab for t in prompt):
            raise InputError(f"prompt token ids must be in [0, {vocab})")
        if len(params.stop_token_ids) > decode.stop_id_width(0):
            raise InputError(f"at most {decode.stop_id_width(0)} stop token ids per request")
        matcher = None
        if constraint is not None:
            eos = self.model.config.eos_token_id
            if eos not in params.stop_token_ids:
                raise InputError("a constrained answer ends with the eos token; keep the model's eos "
                                 f"({eos}) among the stop token ids")
            matcher = constraint.new_matcher()  # built here, off the engine thread
        handle = RequestHandle(prompt, params, sink, self, matcher)
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
        if thread is not None and thread is not threading.current_thread():
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
            for span in self.span_buckets():
                self._run_decode(rows, np.zeros(rows, bool), np.zeros(rows, np.int32),
                                 np.ones(rows, np.int32), 1, span)
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
            _log.exception("generation engine failed; it stops, and so does the server")
            self.error = e
        finally:
            with self._cv:
                leftovers = [h for h in self._slots if h is not None] + list(self._pending)
                self._slots = [None] * self.num_slots
                self._pending.clear()
                self._stopping = True
            for handle in leftovers:
                self._finish(handle, None, "cancelled")
        if self.error is not None and self.on_fatal is not None:
            self.on_fatal(self.error)

    def _run_prefill(self, slot: int, prompt: list[int], bucket: int, params: SamplingParams,
                     matcher: "grammar.RowMatcher | None" = None):
        tokens = np.zeros((1, bucket), np.int32)
        tokens[0, :len(prompt)] = prompt
        one = lambda value, dtype: np.asarray([value], dtype)
        self._cache, self._last_tokens, picked = self._prefill_fn(
            self.variables, self._cache, self._last_tokens, tokens, one(len(prompt), np.int32),
            one(slot, np.int32), one(params.seed % 2**32, np.uint32),
            one(params.temperature, np.float32), one(params.top_k, np.int32),
            one(params.top_p, np.float32),
            None if matcher is None else grammar.fill_masks([matcher], self.model.config.vocab_size))
        self.stats.prefills += 1
        return picked

    def _run_decode(self, rows: int, active: np.ndarray, steps: np.ndarray, budgets: np.ndarray,
                    many: int, span: int, masks: np.ndarray | None = None):
        """Up to `many` decode steps over the first `rows` slots (and `span` cache positions) in one
        device call; `masks` [R,M] limit the first step's tokens (None: no row is constrained).

        Returns (count of steps run, outputs: [C,R] tokens, log-probs, [C,R,W] top ids, top lps).
        """
        sampling = (self._temperature[:rows], self._top_k[:rows], self._top_p[:rows])
        chunk = self.decode_chunk
        _faults.engine_decode(self.stats.decode_steps + 1)
        self._cache, self._last_tokens, _, count, outs = self._decode_fn(
            rows, chunk, True, span, self.variables, self._cache, self._last_tokens, active,
            self._seeds[:rows], steps, budgets, self._stop_ids[:rows], *sampling, np.int32(many), masks)
        self.stats.decode_steps += 1
        return count, outs

    def _admit(self, slot: int, handle: RequestHandle) -> None:
        p = handle.params
        try:
            _faults.engine_prefill(handle.prompt)
            picked = self._run_prefill(slot, handle.prompt, self.bucket(len(handle.prompt)), p,
                                       handle.matcher)
            token, logprob, top_ids, top_lps = (x[0] for x in jax.device_get(picked))
        except Exception as e:  # noqa: BLE001 - one request's failure must not stop the others
            _log.exception("prefill of a request failed; answering it with an error")
            self._finish(handle, None, "error", error=f"{type(e).__name__}: {e}")
            return
        self._slots[slot] = handle
        self._seeds[slot] = p.seed % 2**32
        self._temperature[slot], self._top_k[slot], self._top_p[slot] = p.temperature, p.top_k, p.top_p
        self._stop_ids[slot] = decode.padded_stop_ids([p.stop_token_ids])[0, :self._stop_ids.shape[1]]
        self._emit(slot, int(token), float(logprob), top_ids, top_lps)

    def _step(self) -> None:
        rows = self.rows_for(max(b for b, s in enumerate(self._slots) if s is not None))
        handles = list(self._slots[:rows])
        active = np.array([h is not None for h in handles])
        steps = np.array([0 if h is None else h.num_generated for h in handles], np.int32)
        budgets = np.array([1 if h is None else h.params.max_tokens - h.num_generated for h in handles],
                           np.int32)
        matchers = [None if h is None else h.matcher for h in handles]
        masks = None
        if any(m is not None for m in matchers):  # the host advances grammars between tokens
            masks = grammar.fill_masks(matchers, self.model.config.vocab_size)
        many = 1 if self._pending or masks is not None else self.decode_chunk  # admit / mask next step
        used = max(len(h.prompt) + h.num_generated for h in handles if h is not None)
        span = decode.span_bucket(used + many, self.max_len)
        count, outs = jax.device_get(self._run_decode(rows, active, steps, budgets, many, span, masks))
        tokens, logprobs, top_ids, top_lps = outs
        for i in range(int(count)):
            for slot in np.flatnonzero(active):
                if self._slots[slot] is handles[slot] and tokens[i, slot] >= 0:
                    self._emit(int(slot), int(tokens[i, slot]), float(logprobs[i, slot]),
                               top_ids[i, slot], top_lps[i, slot])

    def _emit(self, slot: int, token: int, logprob: float, top_ids, top_lps) -> None:
        handle = self._slots[slot]
        handle.num_generated += 1
        self.stats.generated_tokens += 1
        reason = None
        if token in handle.params.stop_token_ids:
            reason = "stop"
        elif handle.num_generated >= handle.params.max_tokens:
            reason = "length"
        error = None
        if reason is None and handle.matcher is not None and not handle.matcher.consume(token):
            reason, error = "error", f"the grammar rejected token {token}: {handle.matcher.error[:200]}"
        event = TokenEvent(token, logprob, tuple(int(i) for i in top_ids),
                           tuple(float(x) for x in top_lps), reason, error)
        if reason is not None:
            self._slots[slot] = None
            handle.finished = True
            self.stats.finished[reason] += 1
        self._deliver(handle, event)

    def _release(self, slot: int, reason: str) -> None:
        handle = self._slots[slot]
        self._slots[slot] = None
        self._finish(handle, None, reason)

    def _finish(self, handle: RequestHandle, token: int | None, reason: str,
                error: str | None = None) -> None:
        if handle.finished:
            return
        handle.finished = True
        self.stats.finished[reason] += 1
        self._deliver(handle, TokenEvent(token, finish_reason=reason, error=error))

    @staticmethod
    def _deliver(handle: RequestHandle, event: TokenEvent) -> None:
        try:
            handle.sink(event)
        except Exception:  # noqa: BLE001 - a broken consumer must not stop the other requests
            _log.exception("a request's token sink failed; cancelling that request")
            handle._cancelled.set()
