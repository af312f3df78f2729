"""One decoder: `generate`, the server and `phi-jax sample` give the same tokens for the same
prompt and seed — sampled, not just greedy — whatever else shares the batch; and the server's
`echo` log-probs are the scorer's, which equal a direct log-softmax of the model's logits."""

from __future__ import annotations

import concurrent.futures
import os
import subprocess
import sys
from pathlib import Path

import httpx
import jax
import numpy as np
import pytest

import phi_jax
import phi_jax.inference.text
from phi_jax.config import preset
from phi_jax.inference import scoring
from phi_jax.inference.decode import generate
from phi_jax.model import init_params
from phi_jax.serve import Engine, ServerConfig, ServerThread, create_app
from phi_jax.tokenizer import train_bpe

ROOT = Path(__file__).resolve().parents[1]
TEXTS = ["def add(a, b):\n    return a + b\n" * 20, "class A:\n    pass\n" * 20,
         "the quick brown fox jumps over the lazy dog\n" * 20]
PROMPTS = ["def add(", "class A", "the quick", "def", "return a", "brown fox jumps", "pass", "lazy dog"]
SAMPLED = dict(temperature=0.8, top_p=0.9)
NEW = 16
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    path = tmp_path_factory.mktemp("one_decoder") / "model"
    tokenizer = train_bpe(TEXTS, vocab_size=300)
    config = preset("test", vocab_size=300, eos_token_id=tokenizer.eos_id)
    phi_jax.save_pretrained(path, config, init_params(config, jax.random.key(7)))
    tokenizer.save(path)
    loaded = phi_jax.inference.load(path)
    engine = Engine(loaded.model, loaded.variables, num_slots=8, max_len=64)
    with ServerThread(create_app(engine, tokenizer, ServerConfig(model_name="m"))) as server:
        yield path, loaded, tokenizer, server.url


def _server(url, prompt, seed):
    r = httpx.post(f"{url}/v1/completions", timeout=120, json={
        "model": "m", "prompt": prompt, "max_tokens": NEW, "seed": seed, **SAMPLED})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def test_generate_server_and_sample_agree_when_sampling(setup):
    path, loaded, tokenizer, url = setup
    ids = [tokenizer.encode(p) for p in PROMPTS]
    seeds = [100 + 7 * i for i in range(len(PROMPTS))]
    eos = [tokenizer.eos_id]
    batch8 = generate(loaded.model, loaded.variables, ids, NEW, seed=seeds, stop_tokens=eos, **SAMPLED)
    batch1 = [generate(loaded.model, loaded.variables, [x], NEW, seed=s, stop_tokens=eos, **SAMPLED)[0]
              for x, s in zip(ids, seeds)]
    assert batch8 == batch1
    assert len({tuple(t) for t in batch8}) > 1  # really sampled, not one repeated answer
    # the same prompt, sampled, changes with the seed (so agreement above is not an accident)
    assert generate(loaded.model, loaded.variables, [ids[0]], NEW, seed=seeds[0] + 1, stop_tokens=eos,
                    **SAMPLED)[0] != batch1[0]
    texts = [tokenizer.decode(t) for t in batch8]

    assert [_server(url, p, s) for p, s in zip(PROMPTS, seeds)] == texts  # one at a time
    with concurrent.futures.ThreadPoolExecutor(8) as pool:  # eight at once share decode steps
        assert list(pool.map(lambda a: _server(url, *a), zip(PROMPTS, seeds))) == texts

    for i in (0, 5):  # the CLI, as a user runs it
        result = subprocess.run(
            [sys.executable, "-m", "phi_jax.cli", "sample", f"--model={path}", f"--prompt={PROMPTS[i]}",
             f"--seed={seeds[i]}", f"--max-new-tokens={NEW}", "--temperature=0.8", "--top-p=0.9"],
            cwd=ROOT, capture_output=True, text=True, timeout=300, env=dict(os.environ))
        assert result.returncode == 0, result.stderr[-2000:]
        assert result.stdout == PROMPTS[i] + texts[i] + "\n"


def test_echo_logprobs_are_the_scorers_and_the_models(setup):
    _, loaded, tokenizer, url = setup
    prompt = "def add(a, b):\n    return"
    ids = tokenizer.encode(prompt)
    r = httpx.post(f"{url}/v1/completions", timeout=120, json={
        "model": "m", "prompt": prompt, "max_tokens": 0, "echo": True, "logprobs": 2})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["text"] == prompt and r.json()["usage"]["completion_tokens"] == 0
    lp = choice["logprobs"]
    assert lp["token_logprobs"][0] is None and len(lp["tokens"]) == len(ids)
    # independent reference: log-softmax of one plain forward pass
    logits, _ = loaded.model.apply(loaded.variables, np.asarray([ids]))
    ref = jax.nn.log_softmax(np.asarray(logits[0], np.float64), axis=-1)
    want = [float(ref[i, ids[i + 1]]) for i in range(len(ids) - 1)]
    np.testing.assert_allclose(lp["token_logprobs"][1:], want, atol=1e-4)
    assert lp["token_logprobs"][1:] == pytest.approx(scoring.token_logprobs(
        loaded.model, loaded.variables, ids)[0], abs=1e-6)
    # the scorer behind evals gives the same total for the continuation
    score = scoring.score_requests(loaded.model, loaded.variables, [(ids[:1], ids[1:])])[0]
    assert score.logprob == pytest.approx(sum(want), abs=1e-3)
    # echo with generation: the prompt's text and log-probs come first, then the completion's
    r = httpx.post(f"{url}/v1/completions", timeout=120, json={
        "model": "m", "prompt": prompt, "max_tokens": 4, "temperature": 0, "echo": True, "logprobs": 1})
    body = r.json()["choices"][0]
    assert body["text"].startswith(prompt) and len(body["logprobs"]["tokens"]) == len(ids) + 4
    assert body["logprobs"]["text_offset"][len(ids)] == len(prompt)
    bad = httpx.post(f"{url}/v1/completions", timeout=60, json={"model": "m", "prompt": "x",
                                                                "max_tokens": 0})
    assert bad.status_code == 400 and "only with echo" in bad.json()["error"]["message"]


def test_loaded_text_methods_are_the_servers_and_the_clis(setup):
    """`phi_jax.load(...).generate` / `.chat` are the same decode as `/v1/completions`,
    `/v1/chat/completions` and `phi-jax sample`: greedy and seeded, with stop strings."""
    path, _, _, url = setup
    m = phi_jax.load(path)
    for prompt in ("def add(", "the quick"):
        text = m.generate(prompt, max_new_tokens=NEW)
        r = httpx.post(f"{url}/v1/completions", timeout=120, json={
            "model": "m", "prompt": prompt, "max_tokens": NEW, "temperature": 0})
        assert r.json()["choices"][0]["text"] == text
        result = subprocess.run(
            [sys.executable, "-m", "phi_jax.cli", "sample", f"--model={path}", f"--prompt={prompt}",
             f"--max-new-tokens={NEW}", "--temperature=0"],
            cwd=ROOT, capture_output=True, text=True, timeout=300, env=dict(os.environ))
        assert result.returncode == 0, result.stderr[-2000:]
        assert result.stdout == prompt + text + "\n"
    sampled = m.generate(PROMPTS[:3], max_new_tokens=NEW, seed=40, **SAMPLED)
    assert sampled == [_server(url, p, 40 + i) for i, p in enumerate(PROMPTS[:3])]
    stop = sampled[0][3:5]
    r = httpx.post(f"{url}/v1/completions", timeout=120, json={
        "model": "m", "prompt": PROMPTS[0], "max_tokens": NEW, "seed": 40, "stop": [stop], **SAMPLED})
    assert m.generate(PROMPTS[0], max_new_tokens=NEW, seed=40, stop=stop, **SAMPLED) == \
        r.json()["choices"][0]["text"] == sampled[0][:sampled[0].index(stop)]
    messages = [{"role": "user", "content": "A"}]  # ChatML in a 300-token BPE: ~50 of 64 slots
    room = 64 - len(m.tokenizer.encode(phi_jax.inference.text.render(m, messages)))
    assert room >= 4
    r = httpx.post(f"{url}/v1/chat/completions", timeout=120, json={
        "model": "m", "messages": messages, "max_tokens": room, "temperature": 0})
    assert r.status_code == 200, r.text
    assert m.chat(messages, max_new_tokens=room) == r.json()["choices"][0]["message"]["content"]
