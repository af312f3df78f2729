"""`phi_jax.load(...)` speaks text: generate, chat, logprobs, score, embed and save, each held to
transformers running the same random Llama (an independent implementation), and the ids-level
door (`from_pretrained`) routed through the same loader.

Tolerances: fp32 log-probs and pooled states within 1e-4 of torch (measured ~1e-6)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers

import phi_jax
from phi_jax.config import preset
from phi_jax.errors import InputError
from phi_jax.tokenizer import train_bpe

from hf_reference import hf_logits, random_hf_model

TEXTS = ["def add(a, b):\n    return a + b\n" * 20, "class A:\n    pass\n" * 20,
         "the quick brown fox jumps over the lazy dog\n" * 20]
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")
TOL = 1e-4


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """A random Llama saved by transformers with a trained BPE tokenizer and a chat template."""
    path = tmp_path_factory.mktemp("library") / "model"
    tokenizer = train_bpe(TEXTS, vocab_size=300)
    tokenizer.chat_template = TEMPLATE
    config = preset("test-llama", vocab_size=300, eos_token_id=tokenizer.eos_id,
                    bos_token_id=tokenizer.bos_id)
    ref = random_hf_model(config, seed=5)
    ref.save_pretrained(path)
    tokenizer.save(path)
    return path, ref, phi_jax.load(path)


def _hf_logprobs(ref, ids):
    logits = hf_logits(ref, np.asarray([ids]))[0].astype(np.float64)
    logits -= logits.max(-1, keepdims=True)
    return logits - np.log(np.exp(logits).sum(-1, keepdims=True))


def test_load_returns_a_model_with_its_tokenizer_and_template(hub):
    _, _, m = hub
    assert isinstance(m, phi_jax.Loaded)
    assert m.tokenizer is not None and m.chat_template == TEMPLATE
    assert m.config.vocab_size == 300 and m.metadata["source"] == "hf"
    model, variables, tokenizer = m  # the explicit pieces stay one unpacking away
    assert model is m.model and tokenizer is m.tokenizer


def test_logprobs_and_score_equal_transformers(hub):
    _, ref, m = hub
    text = "def add(a, b):\n    return a + b"
    ids = m.tokenizer.encode(text)
    lp = _hf_logprobs(ref, ids)
    want = [lp[i, ids[i + 1]] for i in range(len(ids) - 1)]
    np.testing.assert_allclose(m.logprobs(text), want, atol=TOL)

    context, continuation = "the quick brown", " fox jumps"
    ctx, whole = m.tokenizer.encode(context), m.tokenizer.encode(context + continuation)
    lp = _hf_logprobs(ref, whole)
    want = sum(lp[i - 1, whole[i]] for i in range(len(ctx), len(whole)))
    assert m.score(context, continuation) == pytest.approx(want, abs=TOL)


def test_embed_is_the_mean_of_transformers_final_hidden_states(hub):
    _, ref, m = hub
    texts = ["class A:\n    pass", "the lazy dog", "def add(a, b): return a + b"]
    got = m.embed(texts)
    assert got.shape == (3, m.config.d_model) and got.dtype == np.float32
    for row, text in zip(got, texts):
        ids = torch.as_tensor([m.tokenizer.encode(text)])
        with torch.no_grad():
            hidden = ref.model(ids).last_hidden_state[0].numpy()
        np.testing.assert_allclose(row, hidden.mean(0), atol=TOL)


def test_greedy_generate_and_chat_equal_transformers_generate(hub):
    path, ref, m = hub
    hf_tok = transformers.AutoTokenizer.from_pretrained(path)

    def hf_greedy(prompt_ids, n):
        with torch.no_grad():
            out = ref.generate(torch.as_tensor([prompt_ids]), max_new_tokens=n, do_sample=False,
                               eos_token_id=m.tokenizer.eos_id, pad_token_id=m.tokenizer.eos_id)
        new = out[0, len(prompt_ids):].tolist()
        return m.tokenizer.decode([t for t in new if t != m.tokenizer.eos_id])

    prompts = ["def add(", "the quick"]
    got = m.generate(prompts, max_new_tokens=12)
    assert got == [hf_greedy(m.tokenizer.encode(p), 12) for p in prompts]
    assert m.generate(prompts[1], max_new_tokens=12) == got[1]  # a batch row is its own sequence

    messages = [{"role": "user", "content": "class A"}]
    text = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "<|user|>class A\n<|assistant|>"
    assert m.chat(messages, max_new_tokens=10) == hf_greedy(m.tokenizer.encode(text), 10)


def test_stop_strings_cut_the_completion_and_sampling_follows_the_seed(hub):
    _, _, m = hub
    full = m.generate("def add(", max_new_tokens=16)
    assert len(full) > 4
    stop = full[2:4]
    cut = m.generate("def add(", max_new_tokens=16, stop=stop)
    assert cut == full[:full.index(stop)]
    a = m.generate("the", max_new_tokens=16, temperature=1.0, seed=3)
    assert a == m.generate("the", max_new_tokens=16, temperature=1.0, seed=3)
    assert m.generate(["x", "the"], max_new_tokens=16, temperature=1.0, seed=2)[1] == a


def test_save_writes_a_directory_transformers_loads_with_the_chat_template(hub, tmp_path):
    _, ref, m = hub
    m.save(tmp_path / "out")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    tokens = np.asarray([m.tokenizer.encode("def add(a, b)")])
    np.testing.assert_allclose(hf_logits(again, tokens), hf_logits(ref, tokens), atol=1e-5)
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "out").chat_template == TEMPLATE
    with pytest.raises(InputError, match="--overwrite|overwrite"):
        m.save(tmp_path / "out")
    with pytest.raises(InputError, match="GGUF"):
        m.save(tmp_path / "other", quant="q8_0")


def test_from_pretrained_is_load_without_the_tokenizer(hub):
    path, _, m = hub
    model, variables = phi_jax.from_pretrained(path)
    assert model.config.scan_layers and "layers" in variables["params"]  # compatible layout
    tokens = np.asarray([m.tokenizer.encode("class A")])
    np.testing.assert_allclose(model.apply(variables, tokens)[0],
                               m.model.apply(m.variables, tokens)[0], atol=1e-5)


def test_text_methods_reject_bad_input_in_one_line(hub):
    _, _, m = hub
    with pytest.raises(InputError, match="string or a non-empty list"):
        m.generate(123)
    with pytest.raises(InputError, match="max_tokens"):
        m.generate("x", max_new_tokens=0)
    with pytest.raises(InputError, match="role"):
        m.chat("hello")
    with pytest.raises(InputError, match="empty"):
        m.logprobs("")
    bare = phi_jax.Loaded(m.model, m.variables, None, None, {})
    with pytest.raises(InputError, match="without a tokenizer"):
        bare.generate("x")


def test_save_to_gguf_reloads_to_transformers_logits(hub, tmp_path):
    _, ref, m = hub
    summary = m.save(tmp_path / "m.gguf", quant="f32")
    assert (tmp_path / "m.gguf").is_file() and summary is not None
    again = phi_jax.load(tmp_path / "m.gguf")
    tokens = np.asarray([m.tokenizer.encode("def add(a, b)")])
    np.testing.assert_allclose(again.model.apply(again.variables, tokens)[0], hf_logits(ref, tokens),
                               atol=TOL)
    assert again.generate("the quick", max_new_tokens=8) == m.generate("the quick", max_new_tokens=8)
