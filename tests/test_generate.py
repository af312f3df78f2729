"""Generation: greedy tokens equal transformers' generate; sampling filters; no recompilation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import phi_jax
from phi_jax.config import preset
from phi_jax.generation import compiled_steps, prompt_bucket, sample_logits
from phi_jax.model import Phi, init_cache, init_params

from hf_reference import random_hf_model


def _hf_greedy(ref, prompt, max_new_tokens, eos):
    with torch.no_grad():
        out = ref.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False,
                           eos_token_id=eos, pad_token_id=0)
    new = out[0, len(prompt):].tolist()
    if eos in new:
        new = new[:new.index(eos) + 1]
    return new


@pytest.mark.parametrize("name", ["test-phi-2", "test-gqa"])
def test_greedy_matches_transformers_batched_ragged(name, tmp_path):
    config = preset(name)
    ref = random_hf_model(config, seed=7)
    ref.save_pretrained(tmp_path)
    model, params = phi_jax.from_pretrained(tmp_path)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, config.vocab_size, n).tolist() for n in (3, 17, 9, 30)]
    ours = phi_jax.generate(model, params, prompts, max_new_tokens=20, temperature=0.0)
    for prompt, got in zip(prompts, ours):
        assert got == _hf_greedy(ref, prompt, 20, config.eos_token_id)


def test_stop_token_ends_sequence_and_callback_streams():
    config = preset("test")
    model, params = Phi(config), init_params(config, jax.random.key(1))
    prompts = [[5, 6, 7], [9]]
    free = phi_jax.generate(model, params, prompts, max_new_tokens=12, stop_tokens=[])
    assert [len(x) for x in free] == [12, 12]
    stop = free[0][4]
    first = free[0].index(stop)
    streamed = []
    out = phi_jax.generate(model, params, prompts, max_new_tokens=12, stop_tokens=[stop],
                           callback=lambda i, t: streamed.append((i, t)))
    assert out[0] == free[0][:first + 1]
    assert out[1] == (free[1][:free[1].index(stop) + 1] if stop in free[1] else free[1])
    for i in range(2):
        assert [t for j, t in streamed if j == i] == out[i]


def test_cached_decode_equals_full_forward():
    """Logits of token t from the KV cache path equal a full forward over the prefix."""
    config = preset("test-gqa")
    model, params = Phi(config), init_params(config, jax.random.key(2))
    tokens = np.random.default_rng(1).integers(0, config.vocab_size, (2, 10))
    full, _ = model.apply(params, tokens)
    cache = init_cache(config, 2, 16)
    _, cache = model.apply(params, tokens[:, :6], cache=cache)
    steps = []
    for t in range(6, 10):
        logits, cache = model.apply(params, tokens[:, t:t + 1], cache=cache)
        steps.append(logits[:, 0])
    np.testing.assert_allclose(np.stack(steps, 1), full[:, 6:], atol=1e-5)
    assert cache["lengths"].tolist() == [10, 10]


def test_sampling_is_seeded_and_filters():
    config = preset("test")
    model, params = Phi(config), init_params(config, jax.random.key(3))
    prompts = [[1, 2, 3], [4, 5, 6, 7]]
    kw = dict(max_new_tokens=8, temperature=1.0, top_k=5, stop_tokens=[])
    a = phi_jax.generate(model, params, prompts, seed=11, **kw)
    assert a == phi_jax.generate(model, params, prompts, seed=11, **kw)
    assert a != phi_jax.generate(model, params, prompts, seed=12, **kw)

    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    draws = lambda **k: {int(sample_logits(logits, jax.random.key(s), jnp.float32(1.0), **k)[0])
                         for s in range(200)}
    assert draws(top_k=jnp.int32(2), top_p=jnp.float32(1.0)) == {0, 1}
    assert draws(top_k=jnp.int32(0), top_p=jnp.float32(0.7)) == {0, 1}  # 0.5 < 0.7 <= 0.8
    assert draws(top_k=jnp.int32(0), top_p=jnp.float32(0.5)) == {0}
    assert draws(top_k=jnp.int32(0), top_p=jnp.float32(1.0)) == {0, 1, 2, 3}
    greedy = sample_logits(logits, jax.random.key(0), jnp.float32(0.0), jnp.int32(0), jnp.float32(1.0))
    assert int(greedy[0]) == 0


def test_no_recompilation_within_a_bucket():
    config = preset("test")
    model, params = Phi(config), init_params(config, jax.random.key(4))
    prefill, decode = compiled_steps(model)
    prefill.clear_cache() if hasattr(prefill, "clear_cache") else None
    phi_jax.generate(model, params, [[1] * 20, [2] * 3], max_new_tokens=10)
    sizes = (prefill._cache_size(), decode._cache_size())
    # other prompt lengths in the same bucket (17..32), other sampling settings: no new programs
    assert prompt_bucket(20) == prompt_bucket(31) == 32
    phi_jax.generate(model, params, [[3] * 31, [4] * 17], max_new_tokens=10, temperature=0.7,
                     top_k=3, top_p=0.9, seed=5)
    phi_jax.generate(model, params, [[5] * 25, [6] * 30], max_new_tokens=6)
    assert (prefill._cache_size(), decode._cache_size()) == sizes


def test_bad_prompts_are_rejected_with_a_reason():
    config = preset("test")
    model, params = Phi(config), init_params(config, jax.random.key(5))
    with pytest.raises(ValueError, match="at least one token"):
        phi_jax.generate(model, params, [[]])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        phi_jax.generate(model, params, [[config.vocab_size + 1]])
    with pytest.raises(ValueError, match="max_len"):
        phi_jax.generate(model, params, [[1] * 100], max_new_tokens=100)


def test_public_generate_is_the_function_even_after_submodule_imports():
    import importlib

    import phi_jax.generation  # noqa: F401  (a submodule import must not shadow the function)

    assert callable(phi_jax.generate)
    assert phi_jax.generate is importlib.import_module("phi_jax.generation").generate
