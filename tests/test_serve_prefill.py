"""Prefill at speed, without HTTP: batched prefill, chunked prefill and the prefix cache give the
tokens (and log-probs) of a plain one-request-at-a-time prefill; the prefix cache's pool and LRU.

References: `phi_jax.generate` on each prompt alone (tokens), an engine with one slot, no prefix
cache and no chunking (log-probs), and the KV a plain prefill wrote (the pool's copies).
"""

import threading

import jax
import numpy as np
import pytest

from phi_jax.config import preset
from phi_jax.inference import decode
from phi_jax.inference.decode import generate
from phi_jax.inference.prefix_cache import PrefixCache, block_hashes
from phi_jax.model import Phi, init_cache, init_params
from phi_jax.serve.engine import Engine, SamplingParams

VOCAB, EOS = 128, 0


@pytest.fixture(scope="module")
def tiny():
    config = preset("test-llama", vocab_size=VOCAB, eos_token_id=EOS, scan_layers=False)
    return Phi(config), init_params(config, jax.random.key(0))


class _Log:
    """Sink for several requests: every event, in the order the engine emitted them."""

    def __init__(self):
        self.events, self.done, self._lock = [], {}, threading.Lock()

    def sink(self, name):
        self.done[name] = threading.Event()

        def receive(event):
            with self._lock:
                self.events.append((name, event))
            if event.finish_reason is not None:
                self.done[name].set()
        return receive

    def tokens(self, name):
        return [e.token for n, e in self.events if n == name and e.token is not None]

    def logprobs(self, name):
        return np.array([e.logprob for n, e in self.events if n == name and e.token is not None])

    def wait(self):
        for name, done in self.done.items():
            assert done.wait(120), f"request {name} did not finish"


def _together(engine, requests):
    """Submit every request while the engine thread is held, so they all wait at once."""
    log, gate, release = _Log(), threading.Event(), threading.Event()
    engine.submit([1], SamplingParams(max_tokens=1), lambda e: (gate.set(), release.wait(60)))
    assert gate.wait(60)
    try:
        for name, (prompt, params) in requests.items():
            engine.submit(prompt, params, log.sink(name))
    finally:
        release.set()
    log.wait()
    return log


def _one_by_one(engine, requests):
    log = _Log()
    for name, (prompt, params) in requests.items():
        engine.submit(prompt, params, log.sink(name))
        log.wait()
    return log


def _alone(model, variables, prompt, params):
    return generate(model, variables, [prompt], params.max_tokens, temperature=params.temperature,
                    top_k=params.top_k, top_p=params.top_p, seed=params.seed, stop_tokens=[EOS])[0]


def test_batched_prefill_equals_one_by_one(tiny):
    model, variables = tiny
    rng = np.random.default_rng(0)
    requests = {}
    for i, n in enumerate((5, 9, 14, 20, 31, 40)):  # buckets 16, 32 and 64
        sampled = dict(temperature=0.9, top_k=40, top_p=0.95) if i % 2 else {}
        requests[i] = ([int(t) for t in rng.integers(1, VOCAB, n)],
                       SamplingParams(max_tokens=6, seed=10 + i, stop_token_ids=(EOS,), **sampled))
    batched = Engine(model, variables, num_slots=8, max_len=128).start()
    single = Engine(model, variables, num_slots=1, max_len=128).start()
    try:
        calls_before = batched.stats.prefill_calls
        together = _together(batched, requests)
        # the gate's own request, then six prompts in three buckets: three calls, not six
        assert batched.stats.prefill_calls - calls_before == 1 + 3
        alone = _one_by_one(single, requests)
    finally:
        batched.stop(), single.stop()
    for name, (prompt, params) in requests.items():
        assert together.tokens(name) == alone.tokens(name) == _alone(model, variables, prompt, params)
        np.testing.assert_allclose(together.logprobs(name), alone.logprobs(name), atol=1e-5)


def test_long_prompt_prefills_in_chunks_between_decode_steps(tiny):
    model, variables = tiny
    rng = np.random.default_rng(1)
    # a long budget: however late (a loaded machine) the long prompt arrives, this one still runs
    running = ([int(t) for t in rng.integers(1, VOCAB, 6)], SamplingParams(max_tokens=240))
    long = ([int(t) for t in rng.integers(1, VOCAB, 150)], SamplingParams(max_tokens=8))
    chunked = Engine(model, variables, num_slots=2, max_len=256, prefill_chunk=16).start()
    whole = Engine(model, variables, num_slots=1, max_len=256).start()
    try:
        log = _Log()
        chunked.submit(*running, log.sink("running"))
        while len(log.tokens("running")) < 2:  # it is decoding: the long prompt arrives mid-stream
            threading.Event().wait(0.01)
        calls_before, submitted_at = chunked.stats.prefill_calls, len(log.events)
        chunked.submit(*long, log.sink("long"))
        log.wait()
        reference = _one_by_one(whole, {"long": long})
    finally:
        chunked.stop(), whole.stop()
    assert chunked.stats.prefill_calls - calls_before == 10  # ceil(150 / 16) chunks
    names = [n for n, _ in log.events]
    # the running stream got a token after each of the first nine chunks instead of waiting for
    # all ten (a decode call in flight at submission adds at most decode_chunk=8: not enough alone)
    assert names[submitted_at:names.index("long")].count("running") >= 9
    assert log.tokens("long") == reference.tokens("long") == _alone(model, variables, *long)
    np.testing.assert_allclose(log.logprobs("long"), reference.logprobs("long"), atol=1e-5)


def _shared_prefix_requests(rng, prefix_len=70, docs=4):
    head = [int(t) for t in rng.integers(1, VOCAB, prefix_len)]
    return {d: (head + [int(t) for t in rng.integers(1, VOCAB, 5 + 3 * d)],
                SamplingParams(max_tokens=5, seed=d, stop_token_ids=(EOS,),
                               **({"temperature": 0.8} if d % 2 else {})))
            for d in range(docs)}


def test_prefix_cache_is_exact_and_counts_reuse(tiny):
    model, variables = tiny
    requests = _shared_prefix_requests(np.random.default_rng(2))
    cached = Engine(model, variables, num_slots=2, max_len=128, prefix_cache_tokens=256,
                    prefix_block=16).start()
    plain = Engine(model, variables, num_slots=1, max_len=128).start()
    try:
        with_cache = _one_by_one(cached, requests)
        without = _one_by_one(plain, requests)
        metrics = cached.metrics()
    finally:
        cached.stop(), plain.stop()
    for name, (prompt, params) in requests.items():
        assert with_cache.tokens(name) == without.tokens(name) == _alone(model, variables, prompt, params)
        np.testing.assert_allclose(with_cache.logprobs(name), without.logprobs(name), atol=1e-5)
    prompt_tokens = sum(len(p) for p, _ in requests.values())
    # the 70-token head holds 4 whole blocks of 16: the first request computes them, 3 reuse them
    assert metrics["prefill_tokens_reused"] == 3 * 64 == metrics["prefix_cache_hit_tokens"]
    assert metrics["prefill_tokens_computed"] == prompt_tokens - 3 * 64
    assert metrics["prefix_cache_hit_rate"] == pytest.approx(3 * 64 / prompt_tokens)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_prefix_pool_copies_exact_kv_and_evicts_least_recently_used(scan_layers):
    config = preset("test-gqa", vocab_size=VOCAB, scan_layers=scan_layers)
    model, variables = Phi(config), init_params(config, jax.random.key(1))
    rng = np.random.default_rng(3)
    a, b = ([int(t) for t in rng.integers(1, VOCAB, 33)] for _ in range(2))
    cache = init_cache(config, 2, 64)
    fill = decode.compiled_prefill(model)
    cache, _, _ = fill(64, variables, cache, decode.new_last_tokens(2), np.array([a + [0] * 31, b + [0] * 31]),
                       np.zeros(2, np.int32), np.array([33, 33], np.int32), np.arange(2, dtype=np.int32),
                       np.zeros(2, np.uint32), np.zeros(2, np.float32), np.zeros(2, np.int32),
                       np.ones(2, np.float32))

    def head(kv, r):  # row r's first 32 positions, every layer
        x = np.asarray(kv) if scan_layers else np.stack([np.asarray(layer) for layer in kv])
        return x[:, r, :, :32]

    pool = PrefixCache(config, capacity_tokens=3 * 16 + 5, block_size=16)  # room for three blocks
    assert pool.num_blocks == 3
    assert pool.lookup(a) == [] and pool.stats.queried_tokens == 33
    assert pool.store(cache, 0, a) == 2  # a's two whole blocks (the 33rd token is no block)
    assert len(pool.lookup(a)) == 2 and pool.stats.hit_tokens == 32
    assert len(pool.lookup(a[:32])) == 1  # one token must stay to compute: at most (32-1)//16 blocks
    # copied into the other row, the blocks are exactly the KV the plain prefill wrote for a
    other = pool.load(jax.tree.map(jax.numpy.copy, cache), 1, pool.lookup(a))
    np.testing.assert_array_equal(head(other["k"], 1), head(cache["k"], 0))
    np.testing.assert_array_equal(head(other["v"], 1), head(cache["v"], 0))
    # b needs two blocks, one is free: the least recently used goes, a's tail (a lookup touches
    # the head last), so a's head still hits
    assert pool.store(cache, 1, b) == 2 and pool.stats.evicted_blocks == 1
    assert len(pool.lookup(a)) == 1 and len(pool.lookup(b)) == 2
    assert block_hashes(a, 16)[0] != block_hashes(b, 16)[0]
    assert block_hashes(a[:16] + b[16:], 16)[1] != block_hashes(b, 16)[1]  # chained, not per block


def test_engine_rejects_bad_prefill_settings(tiny):
    model, variables = tiny
    with pytest.raises(ValueError, match="--prefix-cache-tokens"):
        Engine(model, variables, prefix_cache_tokens=-1)
    with pytest.raises(ValueError, match="--prefix-cache-tokens"):
        Engine(model, variables, prefix_cache_tokens=8, prefix_block=16)
    with pytest.raises(ValueError, match="--prefill-chunk"):
        Engine(model, variables, prefill_chunk=4)


def test_int8_kv_cache_through_batched_and_chunked_prefill(tiny):
    """An int8 KV cache (its per-token scales copied with k and v) through the engine's batched,
    chunked prefill gives `generate`'s tokens on the same int8-cache model; the prefix cache,
    which holds k and v blocks only, is switched off rather than dropping the scales."""
    model, variables = tiny
    quantized = Phi(model.config.replace(kv_cache_dtype="int8"))
    rng = np.random.default_rng(3)
    requests = {f"r{i}": ([int(t) for t in rng.integers(1, VOCAB, n)], SamplingParams(max_tokens=6))
                for i, n in enumerate((40, 9, 23))}
    engine = Engine(quantized, variables, num_slots=4, max_len=128, prefill_chunk=16,
                    prefix_cache_tokens=64).start()
    try:
        assert engine.prefix_cache is None
        together = _together(engine, requests)
    finally:
        engine.stop()
    for name, (prompt, params) in requests.items():
        assert together.tokens(name) == _alone(quantized, variables, prompt, params)


def test_warmup_then_serve_gives_the_same_tokens(tiny):
    """`phi-jax serve` warms the engine up (without --no-warmup) before it answers: the warm-up's
    prefill and decode write only free slot 0 and change no request's tokens."""
    model, variables = tiny
    prompt, params = [5, 6, 7, 8, 9], SamplingParams(max_tokens=5)
    engine = Engine(model, variables, num_slots=2, max_len=128, prefix_cache_tokens=64)
    engine.warmup()
    engine.start()
    try:
        log = _Log()
        engine.submit(prompt, params, log.sink("r"))
        log.wait()
    finally:
        engine.stop()
    assert log.tokens("r") == _alone(model, variables, prompt, params)
