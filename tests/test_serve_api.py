"""`phi-jax serve` through the official `openai` client on a real uvicorn server (loopback).

References are independent of the server: `phi_jax.generate` run on one prompt alone (tokens), the
tokenizer's own decode (text), and a full forward pass of `model.apply` (log-probs).
"""

import asyncio
import json
import threading
import time
from types import SimpleNamespace

import httpx
import jax
import numpy as np
import openai
import pytest

from phi_jax.chat import render_chat
from phi_jax.config import preset
from phi_jax.inference.decode import generate
from phi_jax.model import Phi, init_params
from phi_jax.serve import Engine, SamplingParams, ServerConfig, ServerThread, create_app
from phi_jax.tokenizer import train_bpe

TEXTS = ["def add(a, b):\n    return a + b\n" * 20, "class A:\n    pass\n" * 20,
         "the quick brown fox jumps over the lazy dog\n" * 20]
MODEL = "tiny-test"
pytestmark = pytest.mark.slow  # compiles the engine and generate (~20 s on 2 cores), then fast


@pytest.fixture(scope="module")
def served():
    tokenizer = train_bpe(TEXTS, vocab_size=300)
    config = preset("test", vocab_size=tokenizer.vocab_size, eos_token_id=tokenizer.eos_id)
    model, variables = Phi(config), init_params(config, jax.random.key(0))
    engine = Engine(model, variables, num_slots=4, max_len=64)
    with ServerThread(create_app(engine, tokenizer, ServerConfig(model_name=MODEL))) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        yield SimpleNamespace(url=server.url, client=client, engine=engine, model=model,
                              variables=variables, tokenizer=tokenizer)


def _alone(s, prompt_ids, max_tokens, **sampling):
    """What `phi_jax.generate` gives for this prompt alone (stops at eos, like the server)."""
    return generate(s.model, s.variables, [prompt_ids], max_new_tokens=max_tokens,
                    stop_tokens=[s.tokenizer.eos_id], **sampling)[0]


def _finish(ids, max_tokens, eos):
    return "stop" if ids[-1] == eos and len(ids) <= max_tokens else "length"


def test_completion_greedy_equals_generate(served):
    s = served
    prompt = "def add(a, b):"
    ids = s.tokenizer.encode(prompt)
    want = _alone(s, ids, 12)
    r = s.client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
    assert r.object == "text_completion" and r.model == MODEL
    assert r.choices[0].text == s.tokenizer.decode(want)
    assert r.choices[0].finish_reason == _finish(want, 12, s.tokenizer.eos_id)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), len(want))
    assert r.usage.total_tokens == len(ids) + len(want)


def test_completion_stream_equals_non_stream(served):
    s = served
    kwargs = dict(model=MODEL, prompt="class A:", max_tokens=20, temperature=0)
    whole = s.client.completions.create(**kwargs)
    chunks = list(s.client.completions.create(stream=True, stream_options={"include_usage": True},
                                              **kwargs))
    text_chunks = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].text for c in text_chunks) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in text_chunks][-1] == whole.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in text_chunks[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert len({c.id for c in chunks}) == 1


def test_sse_wire_format_ends_with_done(served):
    body = {"model": MODEL, "prompt": "the quick", "max_tokens": 6, "temperature": 0, "stream": True}
    with httpx.stream("POST", served.url + "/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    for line in lines[:-1]:
        assert json.loads(line[len("data: "):])["object"] == "text_completion"


def test_chat_completion_uses_default_template(served):
    s = served
    messages = [{"role": "user", "content": "def add"}]  # ChatML's markers are long in a 300-token BPE
    tok = s.tokenizer
    ids = tok.encode(render_chat(messages, **tok.special_tokens_map))
    assert tok.decode(ids) == "<|im_start|>user\ndef add<|im_end|>\n<|im_start|>assistant\n"
    want = _alone(s, ids, 10)
    r = s.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0)
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == s.tokenizer.decode(want)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), len(want))

    stream = s.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10,
                                              temperature=0, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == r.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == r.choices[0].finish_reason


def test_chat_uses_the_tokenizers_own_template(served):
    s = served
    tokenizer = train_bpe(TEXTS, vocab_size=300)
    tokenizer.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
                               "{% if add_generation_prompt %}<assistant>{% endif %}")
    engine = Engine(s.model, s.variables, num_slots=4, max_len=64)
    with ServerThread(create_app(engine, tokenizer, ServerConfig(model_name=MODEL))) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                           max_tokens=4, temperature=0)
    ids = tokenizer.encode("<user>hi<assistant>")
    assert r.usage.prompt_tokens == len(ids)
    assert r.choices[0].message.content == tokenizer.decode(_alone(s, ids, 4))


def test_n_choices_sample_with_seed_plus_index(served):
    """Choice j samples as `generate(seed=seed + j)` would for the prompt alone."""
    s = served
    ids = s.tokenizer.encode("the lazy dog")
    sampling = dict(temperature=0.9, top_k=40, top_p=0.95)
    r = s.client.completions.create(model=MODEL, prompt=ids, max_tokens=10, n=3, seed=11,
                                    extra_body={"top_k": 40}, temperature=0.9, top_p=0.95)
    assert [c.index for c in r.choices] == [0, 1, 2]
    wants = [_alone(s, ids, 10, seed=11 + j, **sampling) for j in range(3)]
    assert [c.text for c in r.choices] == [s.tokenizer.decode(w) for w in wants]
    assert len({tuple(w) for w in wants}) > 1  # the seeds really differ
    assert r.usage.completion_tokens == sum(map(len, wants)) and r.usage.prompt_tokens == len(ids)
    again = s.client.completions.create(model=MODEL, prompt=ids, max_tokens=10, n=3, seed=11,
                                        extra_body={"top_k": 40}, temperature=0.9, top_p=0.95)
    assert [c.text for c in again.choices] == [c.text for c in r.choices]


def test_stop_string_truncates_stream_and_whole(served):
    s = served
    ids = s.tokenizer.encode("def add(a, b):")
    text = s.tokenizer.decode(_alone(s, ids, 30))
    visible = [i for i, ch in enumerate(text) if ch != "\ufffd" and i >= 4]
    assert visible, f"greedy text {text!r} has nothing to stop on"
    stop = text[visible[0]:visible[0] + 2]
    expected = text[:text.find(stop)]
    r = s.client.completions.create(model=MODEL, prompt=ids, max_tokens=30, temperature=0,
                                    stop=[stop, "never-appears"])
    assert r.choices[0].text == expected and r.choices[0].finish_reason == "stop"
    chunks = list(s.client.completions.create(model=MODEL, prompt=ids, max_tokens=30, temperature=0,
                                              stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_logprobs_match_a_full_forward_pass(served):
    s = served
    ids = s.tokenizer.encode("class A:")
    r = s.client.completions.create(model=MODEL, prompt=ids, max_tokens=8, temperature=0, logprobs=3)
    new = _alone(s, ids, 8)
    lp = r.choices[0].logprobs
    logits, _ = s.model.apply(s.variables, np.asarray([ids + new], np.int32))
    ref = jax.nn.log_softmax(logits[0, len(ids) - 1:-1])  # predicts each new token
    want = np.take_along_axis(np.asarray(ref), np.asarray(new)[:, None], axis=1)[:, 0]
    np.testing.assert_allclose(lp.token_logprobs, want, atol=2e-5)
    assert lp.tokens == [s.tokenizer.decode([t], skip_special_tokens=False) for t in new]
    for top, chosen in zip(lp.top_logprobs, lp.token_logprobs):
        assert 1 <= len(top) <= 3 and max(top.values()) == pytest.approx(chosen)  # greedy = argmax
    offsets = [len(s.tokenizer.decode(new[:i])) for i in range(len(new))]
    assert lp.text_offset == offsets


def test_models_and_health(served):
    models = served.client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert served.client.models.retrieve(MODEL).id == MODEL
    health = httpx.get(served.url + "/health").json()
    assert health["status"] == "ok" and health["slots"] == 4


def test_32_concurrent_greedy_requests_each_match_generate_alone(served):
    s = served
    rng = np.random.default_rng(0)
    lengths = rng.permutation(np.arange(1, 33))  # prefill buckets 16 and 32 (64 is in test_serve_engine)
    prompts = [[int(t) for t in rng.integers(1, s.tokenizer.vocab_size, n)] for n in lengths]
    budgets = [int(m) for m in rng.integers(3, 12, 32)]
    steps_before = s.engine.stats.decode_steps

    async def one(client, prompt, budget):
        r = await client.post("/v1/completions", json={"model": MODEL, "prompt": prompt,
                                                       "max_tokens": budget, "temperature": 0})
        assert r.status_code == 200, r.text
        return r.json()

    async def all_at_once():
        async with httpx.AsyncClient(base_url=s.url, timeout=120) as client:
            return await asyncio.gather(*(one(client, p, m) for p, m in zip(prompts, budgets)))

    answers = asyncio.run(all_at_once())
    total = 0
    for prompt, budget, answer in zip(prompts, budgets, answers):
        want = _alone(s, prompt, budget)
        total += len(want)
        assert answer["choices"][0]["text"] == s.tokenizer.decode(want)
        assert answer["usage"]["completion_tokens"] == len(want)
        assert answer["choices"][0]["finish_reason"] == _finish(want, budget, s.tokenizer.eos_id)
    assert s.engine.stats.decode_steps - steps_before < total  # slots really were shared


def test_client_disconnect_mid_stream_frees_its_slot(served):
    s = served
    cancelled_before = s.engine.stats.finished["cancelled"]
    tokens_before = s.engine.stats.generated_tokens
    body = {"model": MODEL, "prompt": "def", "max_tokens": 60, "temperature": 0, "stream": True,
            "logprobs": 0}  # logprobs: one chunk per token, so the first chunk comes at once
    want = _alone(s, s.tokenizer.encode("def"), 60)
    assert len(want) == 60, "pick a prompt whose greedy continuation has no eos"
    gate, release = threading.Event(), threading.Event()

    def blocking_sink(event):  # holds the engine thread still while the client hangs up
        gate.set()
        release.wait(60)

    try:
        with httpx.Client(base_url=s.url, timeout=60) as client:
            with client.stream("POST", "/v1/completions", json=body) as r:
                first = next(line for line in r.iter_lines() if line)
                assert first.startswith("data: {")
                blocker = s.engine.submit([1, 2, 3], SamplingParams(max_tokens=1), blocking_sink)
                assert gate.wait(30)
        # the engine is frozen with the stream's request in a slot; the server must cancel it
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not any(
                h.cancelled for h in s.engine.running_requests() if h is not blocker):
            time.sleep(0.01)
    finally:
        release.set()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and s.engine.num_active:
        time.sleep(0.01)
    assert s.engine.num_active == 0
    assert s.engine.stats.finished["cancelled"] == cancelled_before + 1
    assert s.engine.stats.generated_tokens - tokens_before < 60
