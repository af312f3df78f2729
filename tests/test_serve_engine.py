"""The continuous-batching engine without HTTP: exact tokens against `phi_jax.generate` run alone,
slot reuse, cancellation, and its admission checks."""

import threading

import jax
import numpy as np
import pytest

from phi_jax.config import preset
from phi_jax.inference.decode import generate
from phi_jax.model import Phi, init_params
from phi_jax.serve.engine import Engine, EngineStoppedError, SamplingParams

VOCAB, EOS = 300, 0


@pytest.fixture(scope="module")
def engine():
    config = preset("test", vocab_size=VOCAB, eos_token_id=EOS)
    model, variables = Phi(config), init_params(config, jax.random.key(0))
    engine = Engine(model, variables, num_slots=4, max_len=64).start()
    yield engine
    engine.stop()


class _Collector:
    """A sink that records one request's events and says when it has finished."""

    def __init__(self):
        self.tokens, self.reason, self.done = [], None, threading.Event()

    def __call__(self, event):
        if event.token is not None:
            self.tokens.append(event.token)
        if event.finish_reason is not None:
            self.reason = event.finish_reason
            self.done.set()


def _run(engine, requests):
    """Submit every (prompt, params) at once; wait (bounded) for all; return the collectors."""
    sinks = [_Collector() for _ in requests]
    for (prompt, params), sink in zip(requests, sinks):
        engine.submit(prompt, params, sink)
    for sink in sinks:
        assert sink.done.wait(120), "a request did not finish"
    return sinks


def _alone(engine, prompt, max_tokens, **sampling):
    return generate(engine.model, engine.variables, [prompt], max_new_tokens=max_tokens,
                    stop_tokens=[EOS], **sampling)[0]


def test_32_concurrent_greedy_requests_give_generates_tokens(engine):
    rng = np.random.default_rng(1)
    lengths = rng.permutation(np.arange(1, 49))[:32]
    prompts = [[int(t) for t in rng.integers(1, VOCAB, n)] for n in lengths]
    budgets = [int(m) for m in rng.integers(2, 14, 32)]
    steps_before, prefills_before = engine.stats.decode_steps, engine.stats.prefills
    sinks = _run(engine, [(p, SamplingParams(max_tokens=m, stop_token_ids=(EOS,)))
                          for p, m in zip(prompts, budgets)])
    total = 0
    for prompt, budget, sink in zip(prompts, budgets, sinks):
        want = _alone(engine, prompt, budget)
        assert sink.tokens == want
        assert sink.reason == ("stop" if want[-1] == EOS else "length")
        total += len(want)
    assert engine.stats.prefills - prefills_before == 32
    # 4 slots share each step: far fewer steps than tokens, and every slot is free again
    assert engine.stats.decode_steps - steps_before <= total / 2
    assert engine.num_active == 0 and engine.num_waiting == 0


def test_sampling_is_per_request_and_matches_generate(engine):
    """A sampled request gives generate's tokens for the same seed, whoever shares the batch."""
    rng = np.random.default_rng(2)
    prompt = [int(t) for t in rng.integers(1, VOCAB, 9)]
    sampling = dict(temperature=0.8, top_k=30, top_p=0.9)
    others = [([int(t) for t in rng.integers(1, VOCAB, n)],
               SamplingParams(max_tokens=12, temperature=1.0, seed=100 + n)) for n in (3, 17, 30)]
    target = (prompt, SamplingParams(max_tokens=12, seed=5, stop_token_ids=(EOS,), **sampling))
    crowded = _run(engine, others[:2] + [target] + others[2:])[2]
    alone = _run(engine, [target])[0]
    assert crowded.tokens == alone.tokens == _alone(engine, prompt, 12, seed=5, **sampling)


def test_cancel_running_and_queued_requests(engine):
    gate, release = threading.Event(), threading.Event()

    def blocking(event):
        gate.set()
        release.wait(60)

    prefills_before = engine.stats.prefills
    try:
        blocker = engine.submit([1, 2], SamplingParams(max_tokens=40), blocking)
        assert gate.wait(60)  # the engine thread is now held inside `blocker`'s first token
        queued = [_Collector() for _ in range(5)]
        handles = [engine.submit([3, 4, 5], SamplingParams(max_tokens=40), q) for q in queued]
        assert engine.num_waiting == 5 and engine.running_requests() == [blocker]
        blocker.cancel()
        for h in handles:
            h.cancel()
    finally:
        release.set()
    for q in queued:
        assert q.done.wait(60) and q.reason == "cancelled" and q.tokens == []
    for _ in range(3000):  # bounded wait for the loop to drop the cancelled blocker
        if not engine.num_active:
            break
        threading.Event().wait(0.01)
    assert engine.num_active == 0 and engine.num_waiting == 0
    assert engine.stats.prefills - prefills_before == 1  # cancelled while queued: never prefilled
    again = _run(engine, [([7, 8, 9], SamplingParams(max_tokens=3, stop_token_ids=(EOS,)))])[0]
    assert again.tokens == _alone(engine, [7, 8, 9], 3)


def test_admission_checks(engine):
    with pytest.raises(ValueError, match="the context is 64, so at most 4 new tokens fit"):
        engine.submit([1] * 60, SamplingParams(max_tokens=5), lambda e: None)
    with pytest.raises(ValueError, match="empty"):
        engine.submit([], SamplingParams(max_tokens=5), lambda e: None)
    with pytest.raises(ValueError, match=r"\[0, 300\)"):
        engine.submit([1, VOCAB], SamplingParams(max_tokens=5), lambda e: None)
    idle = Engine(engine.model, engine.variables, num_slots=4, max_len=64)
    with pytest.raises(EngineStoppedError):
        idle.submit([1], SamplingParams(max_tokens=1), lambda e: None)
    with pytest.raises(ValueError, match="max_len"):
        Engine(engine.model, engine.variables, max_len=1000)


def test_prefill_buckets_are_bounded():
    config = preset("test", vocab_size=VOCAB)
    model = Phi(config)
    variables = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
    e = Engine(model, variables, num_slots=2, max_len=100)
    assert e.prefill_buckets() == [16, 32, 64, 100]
    assert [e.bucket(n) for n in (1, 16, 17, 64, 65, 99)] == [16, 16, 32, 64, 100, 100]


class _EventLog(_Collector):
    def __init__(self):
        super().__init__()
        self.events = []

    def __call__(self, event):
        self.events.append(event)
        super().__call__(event)


def test_multi_step_decode_gives_the_events_of_one_step_per_call():
    """decode_chunk=8 (several steps per device call while nobody waits) and decode_chunk=1 stream
    the same tokens, log-probs and finish reasons, for greedy and sampled requests that stop or run
    out mid-chunk; requests that arrive later are still admitted."""
    config = preset("test", vocab_size=VOCAB, eos_token_id=EOS)
    model, variables = Phi(config), init_params(config, jax.random.key(0))
    rng = np.random.default_rng(5)
    requests = [([int(t) for t in rng.integers(1, VOCAB, n)],
                 SamplingParams(max_tokens=m, stop_token_ids=(EOS, 7), temperature=temp, seed=s,
                                top_p=0.9 if temp else 1.0))
                for n, m, temp, s in [(5, 13, 0.0, 0), (9, 3, 0.9, 1), (17, 21, 0.0, 2),
                                      (2, 9, 1.2, 3), (30, 6, 0.0, 4), (11, 17, 0.7, 5)]]
    logs = {}
    for chunk in (1, 8):
        engine = Engine(model, variables, num_slots=4, max_len=64, decode_chunk=chunk).start()
        try:
            sinks = [_EventLog() for _ in requests]
            for (prompt, params), sink in zip(requests[:4], sinks):
                engine.submit(prompt, params, sink)
            assert sinks[0].done.wait(120)
            for (prompt, params), sink in zip(requests[4:], sinks[4:]):  # arrive while others run
                engine.submit(prompt, params, sink)
            for sink in sinks:
                assert sink.done.wait(120)
            logs[chunk] = [[(e.token, round(e.logprob, 5), e.top_ids, e.finish_reason)
                            for e in sink.events] for sink in sinks]
            if chunk == 8:
                assert engine.stats.decode_steps < sum(len(x) for x in logs[chunk])
        finally:
            engine.stop()
    assert logs[1] == logs[8]
    for (prompt, params), events in zip(requests, logs[8]):
        if params.temperature == 0.0:
            assert [t for t, *_ in events] == _alone_tokens(model, variables, prompt, params)
    with pytest.raises(ValueError, match="decode_chunk"):
        Engine(model, variables, decode_chunk=0)


def _alone_tokens(model, variables, prompt, params):
    return generate(model, variables, [prompt], max_new_tokens=params.max_tokens,
                    stop_tokens=list(params.stop_token_ids))[0]


def test_decode_attends_over_the_slots_in_use_and_crosses_span_buckets():
    """A cache of 600 slots is decoded over 256-slot spans while requests are short, then 512, then
    600: tokens equal `generate` on each prompt alone, also for requests that cross a bucket."""
    config = preset("test", vocab_size=VOCAB, eos_token_id=EOS, max_len=600)
    model, variables = Phi(config), init_params(config, jax.random.key(3))
    engine = Engine(model, variables, num_slots=2, max_len=600, decode_chunk=8).start()
    assert engine.span_buckets() == [256, 512, 600]
    rng = np.random.default_rng(7)
    try:
        requests = [([int(t) for t in rng.integers(1, VOCAB, n)], SamplingParams(max_tokens=m, seed=n,
                                                                              temperature=0.7))
                    for n, m in [(240, 40), (20, 10), (500, 60)]]
        results = _run(engine, requests)
    finally:
        engine.stop()
    for (prompt, params), got in zip(requests, results):
        want = generate(model, variables, [prompt], max_new_tokens=params.max_tokens, seed=params.seed,
                        temperature=0.7, stop_tokens=[])[0]
        assert got.tokens == want


def test_near_the_memory_map_limit_the_engine_drops_compiled_programs_and_keeps_answering(
        engine, monkeypatch, caplog):
    """A process near vm.max_map_count segfaults at its next compile; the engine checks between
    steps, drops JAX's compiled programs (their code pages are the maps), and answers the same."""
    from phi_jax import compile_cache

    prompt = [5, 6, 7, 8]
    before = _run(engine, [(prompt, SamplingParams(max_tokens=6))])[0].tokens
    held = compile_cache.mapped_regions()
    assert held is not None and held > 100  # (Linux) every compiled program adds maps
    cleared = []
    # as if at the limit now (a limit below what any process holds: the count itself moves, as
    # the garbage collector frees earlier tests' programs)
    monkeypatch.setattr(compile_cache, "map_limit", lambda: 1)
    monkeypatch.setattr(jax, "clear_caches", lambda real=jax.clear_caches: (cleared.append(1), real())[1])
    monkeypatch.setattr(engine, "_last_map_check", -1e9)  # the next loop turn checks
    with caplog.at_level("WARNING", logger="phi_jax.compile_cache"):
        after = _run(engine, [(prompt, SamplingParams(max_tokens=6))])[0].tokens
        for _ in range(3000):  # the check ends the loop turn that delivered the last token, and
            if cleared:       # counting the maps takes a while: wait for the drop itself
                break
            threading.Event().wait(0.01)
    assert cleared and after == before
    again = _run(engine, [(prompt, SamplingParams(max_tokens=6))])[0].tokens  # compiled anew
    assert again == before
    assert any("vm.max_map_count" in r.getMessage() for r in caplog.records)
    monkeypatch.undo()
    assert not compile_cache.release_programs_near_map_limit()  # far below the real limit
