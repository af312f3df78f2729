"""The prefix cache through `phi-jax serve` as users start it: a subprocess on loopback, the official
`openai` client, prompts that share a long head. The reference is the same model loaded here and
served by an engine without a prefix cache; /metrics and the server log report the reuse."""

import threading

import httpx
import jax
import numpy as np
import pytest

import phi_jax
from phi_jax.cli import main as cli_main
from phi_jax.config import preset
from phi_jax.inference import loader
from phi_jax.model import init_params
from phi_jax.serve.engine import Engine, SamplingParams
from phi_jax.tokenizer import train_bpe

from served import served


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = train_bpe(["def add(a, b):\n    return a + b\n" * 20, "the lazy dog\n" * 20],
                          vocab_size=300)
    config = preset("test-llama", vocab_size=tokenizer.vocab_size, eos_token_id=tokenizer.eos_id)
    phi_jax.save_pretrained(path, config, init_params(config, jax.random.key(4)))
    tokenizer.save(path)
    return path


def _metrics(text):
    return {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
            if line and not line.startswith("#")}


@pytest.mark.slow
def test_prefix_cache_through_http_is_exact_and_reported(tiny_dir):
    rng = np.random.default_rng(0)
    head = [int(t) for t in rng.integers(3, 280, 70)]  # a "rubric": 4 whole blocks of 16
    prompts = [head + [int(t) for t in rng.integers(3, 280, 4 + d)] for d in range(4)]
    with served(f"--model={tiny_dir}", "--num-slots=2", "--max-len=256",
                "--prefix-cache-tokens=256") as (proc, client):
        answers = [client.completions.create(model="run", prompt=p, max_tokens=5, temperature=0,
                                             logprobs=2).choices[0] for p in prompts]
        base = str(client.base_url).removesuffix("/v1/")
        metrics = _metrics(httpx.get(f"{base}/metrics", timeout=10).text)
    log = proc.stdout.read()

    loaded = loader.load(str(tiny_dir))
    engine = Engine(loaded.model, loaded.variables, num_slots=1, max_len=256).start()
    try:
        for prompt, answer in zip(prompts, answers):
            events, done = [], threading.Event()
            engine.submit(prompt, SamplingParams(max_tokens=5, stop_token_ids=(loaded.tokenizer.eos_id,)),
                          lambda e: (events.append(e), e.finish_reason and done.set()))
            assert done.wait(120)
            want = [e for e in events if e.token is not None]
            assert answer.text == loaded.tokenizer.decode([e.token for e in want])
            np.testing.assert_allclose(answer.logprobs.token_logprobs, [e.logprob for e in want], atol=1e-5)
    finally:
        engine.stop()
    assert metrics["phi_jax_prefill_tokens_reused_total"] == 3 * 64
    assert metrics["phi_jax_prefix_cache_hit_tokens_total"] == 3 * 64
    total = sum(len(p) for p in prompts)
    assert metrics["phi_jax_prefill_tokens_computed_total"] == total - 3 * 64
    assert metrics["phi_jax_prefix_cache_hit_rate"] == pytest.approx(3 * 64 / total, abs=1e-4)
    assert "prefix cache hit rate" in log and "reused" in log


def test_bad_prefix_cache_flag_is_one_line(tiny_dir, capsys):
    assert cli_main(["serve", f"--model={tiny_dir}", "--prefix-cache-tokens=-5", "--no-warmup"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--prefix-cache-tokens" in err[0], err
