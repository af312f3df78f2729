"""Continuous batching: requests come and go over a fixed set of decode slots of one KV cache.

Letters: B decode slots, R decode rows in use, P padded prompt length (a bucket), S cache slots per
sequence, V vocab, W top log-probs returned per token.

Why this shape: a server sees requests arrive and finish at arbitrary times. Running them as fixed
batches (as `generate` does) makes every request wait for the slowest in its batch. Here each
request owns one row ("slot") of the cache while it runs, and the engine only schedules: all
device work is `phi_jax.inference.decode`'s, the same prefill and decode `generate` runs.

* admission: every waiting request that finds a free slot is admitted at once; its prompt's
  longest cached prefix (whole blocks, `inference.prefix_cache`) is copied into its slot, and the
  rest is prefilled together with the other newcomers: one `decode.prefill` call per power-of-two
  bucket of length (rows padded to a power of two too, so the compiled variants stay few);
* chunked prefill: a prompt longer than `prefill_chunk` is prefilled one chunk per loop turn, with
  a decode step for the running requests between chunks, so a long prompt does not stall every
  stream for its whole prefill; its first token comes with its last chunk;
* decoding: `decode.decode_chunk` advances every busy slot at once over R rows, the smallest power
  of two covering the highest busy slot (new requests take the lowest free slot), so a quiet server
  does not pay for B rows, and at most log2(B)+1 decode programs exist. While no request waits,
  up to `decode_chunk` steps run per device call; otherwise one, so a newcomer is admitted at once
  (and a chunked prefill goes on at the next step);
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
import time
from typing import Any, Callable, Sequence

import jax
import numpy as np

from phi_jax import _faults, compile_cache
from phi_jax.errors import InputError, RunError
from phi_jax.inference import decode, grammar
from phi_jax.inference.prefix_cache import DEFAULT_BLOCK_SIZE, PrefixCache
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
    prefills: int = 0  # requests whose prompt was prefilled (all chunks)
    prefill_calls: int = 0  # device calls that prefilled (rows of one bucket, or one chunk each)
    prefill_tokens_computed: int = 0  # prompt tokens run through the model
    prefill_tokens_reused: int = 0  # prompt tokens copied from the prefix cache instead
    decode_steps: int = 0
    generated_tokens: int = 0


@dataclasses.dataclass
class _Prefilling:
    """A request that holds a slot while its prompt is prefilled (maybe over several chunks)."""

    handle: "RequestHandle"
    done: int  # prompt tokens already in the slot's cache row (reused prefix + chunks so far)


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
      prefill_chunk: the most prompt tokens one request prefills per loop turn; longer prompts
        are prefilled in chunks with decode steps between them (a power of two keeps the chunks
        in one prefill bucket).
      prefix_cache_tokens: size of the prefix cache in tokens (0 = off); its KV takes as much
        memory as that many cache slots.
      prefix_block: tokens per prefix-cache block (reuse is by whole blocks).
    """

    def __init__(self, model: Any, variables, *, num_slots: int = 8, max_len: int | None = None,
                 max_queue: int = 256, decode_chunk: int = 8,
                 on_fatal: Callable[[BaseException], None] | None = None,
                 prefill_chunk: int = 512, prefix_cache_tokens: int = 0,
                 prefix_block: int = DEFAULT_BLOCK_SIZE):
        config = model.config
        max_len = config.max_len if max_len is None else max_len
        if not 2 <= max_len <= config.max_len:
            raise InputError(f"max_len={max_len} must be in [2, {config.max_len}] (the model's "
                             "max_len); lower --max-len")
        if num_slots < 1 or max_queue < 0 or decode_chunk < 1:
            raise InputError(f"need num_slots >= 1, max_queue >= 0 and decode_chunk >= 1, got "
                             f"{num_slots}, {max_queue}, {decode_chunk}")
        if prefill_chunk < decode.MIN_BUCKET or prefix_cache_tokens < 0:
            raise InputError(f"need prefill_chunk >= {decode.MIN_BUCKET} and prefix_cache_tokens >= 0 "
                             f"(--prefill-chunk, --prefix-cache-tokens), got {prefill_chunk} and "
                             f"{prefix_cache_tokens}")
        self.model, self.variables = model, variables
        self.num_slots, self.max_len, self.max_queue = num_slots, max_len, max_queue
        self.decode_chunk = decode_chunk
        self.on_fatal = on_fatal
        self._prefill_fn = decode.compiled_prefill(model, True)
        self._decode_fn = decode.compiled_decode_chunk(model, True)
        self.prefill_chunk = prefill_chunk
        self._cache = decode.new_cache(config, num_slots, max_len)
        if prefix_cache_tokens and getattr(config, "kv_cache_dtype", None):
            # the pool holds k and v blocks only, not an int8 cache's scales: off, and say so
            _log.warning("the prefix cache does not hold a %s KV cache yet; serving without it",
                         config.kv_cache_dtype)
            prefix_cache_tokens = 0
        self.prefix_cache = None if not prefix_cache_tokens else PrefixCache(
            config, prefix_cache_tokens, block_size=prefix_block,
            dtype=jax.tree.leaves(self._cache["k"])[0].dtype)
        self._last_tokens = decode.new_last_tokens(num_slots)
        b = num_slots
        self._slots: list[RequestHandle | None] = [None] * b
        self._seeds = np.zeros(b, np.uint32)
        self._temperature = np.zeros(b, np.float32)
        self._top_k = np.zeros(b, np.int32)
        self._top_p = np.ones(b, np.float32)
        self._stop_ids = decode.padded_stop_ids([()] * b)
        self._pending: collections.deque[RequestHandle] = collections.deque()
        self._prefilling: dict[int, _Prefilling] = {}  # slot -> request whose prompt is going in
        self._last_log = self._last_map_check = time.monotonic()
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

    def warmup(self, buckets: Sequence[int] | None = None, *, everything: bool = False) -> None:
        """Compile, before `start`, what the first request needs: a one-row prefill of the smallest
        bucket (or of each of `buckets`) and a one-row decode step over the smallest span.

        Everything else (wider batches, longer prompts and spans) compiles on first use, so a
        server answers /health within seconds of loading; with the persistent compile cache
        (`phi_jax.compile_cache`) those programs are read back from disk at every later start.
        `everything=True` compiles every prefill bucket and every decode batch x span now instead
        (minutes for a real model on a CPU). It only writes into slot 0, which is free.
        """
        if self._thread is not None:
            raise RuntimeError("warmup() must run before start()")
        if buckets is None:
            buckets = self.prefill_buckets() if everything else self.prefill_buckets()[:1]
        for bucket in buckets:
            self._run_prefill([(0, [0], 0, SamplingParams(max_tokens=1), None)], bucket)
        for rows in self.row_buckets() if everything else self.row_buckets()[:1]:
            for span in self.span_buckets() if everything else self.span_buckets()[:1]:
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
    def num_prefilling(self) -> int:
        """Requests holding a slot whose prompt is still being prefilled (chunk by chunk)."""
        return len(self._prefilling)

    def metrics(self) -> dict[str, float]:
        """Counters since start (a snapshot) for /metrics and the log: requests, prefill tokens
        computed vs reused from the prefix cache, the cache's hit rate, decode steps, tokens."""
        st = self.stats
        out = {"requests_submitted": st.submitted, "requests_prefilled": st.prefills,
               "prefill_calls": st.prefill_calls, "prefill_tokens_computed": st.prefill_tokens_computed,
               "prefill_tokens_reused": st.prefill_tokens_reused, "decode_steps": st.decode_steps,
               "generated_tokens": st.generated_tokens, "requests_running": self.num_active,
               "requests_waiting": self.num_waiting, "requests_prefilling": self.num_prefilling}
        for reason, count in st.finished.items():
            out[f"requests_finished_{reason}"] = count
        cache = self.prefix_cache
        if cache is not None:
            out.update(prefix_cache_queried_tokens=cache.stats.queried_tokens,
                       prefix_cache_hit_tokens=cache.stats.hit_tokens,
                       prefix_cache_hit_rate=cache.stats.hit_rate,
                       prefix_cache_stored_blocks=cache.stats.stored_blocks,
                       prefix_cache_evicted_blocks=cache.stats.evicted_blocks,
                       prefix_cache_cached_blocks=cache.cached_blocks,
                       prefix_cache_capacity_tokens=cache.capacity_tokens)
        return out

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
                    while not (self._stopping or self._pending or self.num_active or self._prefilling):
                        self._cv.wait()
                    if self._stopping:
                        break
                    admitted = []
                    free = [b for b, s in enumerate(self._slots)
                            if s is None and b not in self._prefilling]
                    while free and self._pending:
                        handle = self._pending.popleft()
                        if handle.cancelled:
                            self._finish(handle, None, "cancelled")
                        else:
                            admitted.append((free.pop(0), handle))
                self._begin_prefills(admitted)
                if self._prefilling:
                    self._prefill_turn()
                    self._maybe_log()
                for slot, handle in enumerate(self._slots):
                    if handle is not None and handle.cancelled:
                        self._release(slot, "cancelled")
                if self.num_active:
                    self._step()
                self._check_maps()
        except BaseException as e:  # noqa: BLE001 - every waiting client must hear about it
            _log.exception("generation engine failed; it stops, and so does the server")
            self.error = e
        finally:
            with self._cv:
                leftovers = ([h for h in self._slots if h is not None]
                             + [p.handle for p in self._prefilling.values()] + list(self._pending))
                self._slots = [None] * self.num_slots
                self._prefilling.clear()
                self._pending.clear()
                self._stopping = True
            for handle in leftovers:
                self._finish(handle, None, "cancelled")
            if self.stats.prefills:
                self._maybe_log(every_s=0.0)
        if self.error is not None and self.on_fatal is not None:
            self.on_fatal(self.error)

    def _run_prefill(self, rows: list[tuple[int, list[int], int, SamplingParams, Any]], bucket: int):
        """One device call prefilling `rows` = [(slot, new tokens, start, params, grammar matcher
        or None)] padded to `bucket` tokens; the row count is padded to a decode batch size
        (padding rows write nothing). A constrained row's pick is masked by its grammar. Returns
        the picked tuple ([N] tokens, log-probs, top ids, top log-probs)."""
        n = next(r for r in self.row_buckets() if r >= len(rows))
        tokens = np.zeros((n, bucket), np.int32)
        starts, lengths = np.zeros(n, np.int32), np.zeros(n, np.int32)
        slots = np.full(n, self.num_slots, np.int32)
        seeds, top_k = np.zeros(n, np.uint32), np.zeros(n, np.int32)
        temperature, top_p = np.zeros(n, np.float32), np.ones(n, np.float32)
        matchers = [row[4] for row in rows] + [None] * (n - len(rows))
        masks = (grammar.fill_masks(matchers, self.model.config.vocab_size)
                 if any(m is not None for m in matchers) else None)
        for i, (slot, piece, start, p, _) in enumerate(rows):
            tokens[i, :len(piece)] = piece
            starts[i], lengths[i], slots[i] = start, len(piece), slot
            seeds[i], temperature[i], top_k[i], top_p[i] = p.seed % 2**32, p.temperature, p.top_k, p.top_p
        span = min(self.max_len, decode.prompt_bucket(int(starts.max()) + bucket))
        self._cache, self._last_tokens, picked = self._prefill_fn(
            span, self.variables, self._cache, self._last_tokens, tokens, starts, lengths, slots,
            seeds, temperature, top_k, top_p, masks)
        self.stats.prefill_calls += 1
        self.stats.prefill_tokens_computed += int(lengths.sum())
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

    def _begin_prefills(self, admitted: list[tuple[int, RequestHandle]]) -> None:
        """Give each admitted request its slot and, from the prefix cache, its prompt's longest
        cached prefix; the rest is prefilled by `_prefill_turn`."""
        for slot, handle in admitted:
            start = 0
            try:
                _faults.engine_prefill(handle.prompt)
                if self.prefix_cache is not None:
                    blocks = self.prefix_cache.lookup(handle.prompt)
                    if blocks:
                        self._cache = self.prefix_cache.load(self._cache, slot, blocks)
                        start = len(blocks) * self.prefix_cache.block_size
            except Exception as e:  # noqa: BLE001 - one request's failure must not stop the others
                _log.exception("prefill of a request failed; answering it with an error")
                self._finish(handle, None, "error", error=f"{type(e).__name__}: {e}")
                continue
            self.stats.prefill_tokens_reused += start
            self._prefilling[slot] = _Prefilling(handle, start)

    def _prefill_turn(self) -> None:
        """Prefill the next chunk (up to `prefill_chunk` tokens) of every request in prefill: one
        device call per bucket of chunk length. A request whose prompt is then complete starts
        decoding: its slot becomes active and its first token is emitted."""
        groups: dict[int, list] = {}
        for slot, state in list(self._prefilling.items()):
            if state.handle.cancelled:
                del self._prefilling[slot]
                self._finish(state.handle, None, "cancelled")
                continue
            piece = state.handle.prompt[state.done:state.done + self.prefill_chunk]
            groups.setdefault(self.bucket(len(piece)), []).append(
                (slot, piece, state.done, state.handle.params, state.handle.matcher))
        for bucket, rows in sorted(groups.items()):
            try:
                picked = jax.device_get(self._run_prefill(rows, bucket))
            except Exception as e:  # noqa: BLE001 - these requests fail; the others carry on
                _log.exception("prefill of %d request(s) failed; answering them with an error", len(rows))
                for slot, *_ in rows:
                    self._finish(self._prefilling.pop(slot).handle, None, "error",
                                 error=f"{type(e).__name__}: {e}")
                continue
            for i, (slot, piece, _, p, _) in enumerate(rows):
                state = self._prefilling[slot]
                state.done += len(piece)
                if state.done < len(state.handle.prompt):
                    continue
                del self._prefilling[slot]
                self.stats.prefills += 1
                if self.prefix_cache is not None:
                    self.prefix_cache.store(self._cache, slot, state.handle.prompt)
                self._slots[slot] = state.handle
                self._seeds[slot] = p.seed % 2**32
                self._temperature[slot], self._top_k[slot], self._top_p[slot] = p.temperature, p.top_k, p.top_p
                self._stop_ids[slot] = decode.padded_stop_ids([p.stop_token_ids])[0, :self._stop_ids.shape[1]]
                token, logprob, top_ids, top_lps = (x[i] for x in picked)
                self._emit(slot, int(token), float(logprob), top_ids, top_lps)

    def _check_maps(self, every_s: float = 30.0) -> None:
        """At most every `every_s` seconds, drop the compiled programs if this process nears the
        kernel's memory-map limit (`compile_cache.release_programs_near_map_limit`): a server
        that meets many shapes compiles a program per (bucket, rows, span, masked), each holding
        hundreds of maps, and would otherwise segfault in XLA's compiler after some hours."""
        now = time.monotonic()
        if now - self._last_map_check >= every_s:
            self._last_map_check = now
            compile_cache.release_programs_near_map_limit()

    def _maybe_log(self, every_s: float = 30.0) -> None:
        """A line in the server log at most every `every_s` seconds while prompts are prefilled:
        tokens computed vs reused and the prefix cache's hit rate."""
        now = time.monotonic()
        if now - self._last_log < every_s:
            return
        self._last_log = now
        st, cache = self.stats, self.prefix_cache
        hits = ("prefix cache off" if cache is None else
                f"prefix cache hit rate {cache.stats.hit_rate:.1%} ({cache.cached_blocks} of "
                f"{cache.num_blocks} blocks in use, {cache.stats.evicted_blocks} evicted)")
        _log.info("prefill: %d requests, %d prompt tokens computed, %d reused; %s", st.prefills,
                  st.prefill_tokens_computed, st.prefill_tokens_reused, hits)

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
        # someone waits, a prompt is half prefilled, or a grammar needs the host: one step
        many = 1 if self._pending or self._prefilling or masks is not None else self.decode_chunk
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
