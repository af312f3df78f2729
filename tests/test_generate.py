"""Generation: greedy tokens equal transformers' generate; sampling filters; no recompilation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import phi_jax
from phi_jax.config import preset
from phi_jax.inference.decode import compiled_decode_chunk, compiled_prefill, prompt_bucket
from phi_jax.inference.sampling import sample_logits
from phi_jax.model import (Phi, inference_layout, init_cache, init_params, stack_layers,
                           unstack_layers)
from phi_jax.inference.sampling import argmax, kth_largest, top_p_cutoff

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


@pytest.mark.parametrize("name,scan_layers", [
    ("test-gqa", True),   # stacked cache: every step writes the new key, then attends
    ("test-gqa", False),  # per-layer cache (CPU inference): a decode step reads, then writes
    ("test-qwen2", False),  # ... with a 5-slot window from layer 1 on, shorter than the prefix
])
def test_cached_decode_equals_full_forward(name, scan_layers):
    """Logits of token t from the KV cache path equal a full forward over the prefix."""
    config = preset(name, scan_layers=scan_layers)
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


def test_decode_step_updates_the_cache_in_place():
    """The compiled decode chunk (per-layer cache, batch 1 and 4) copies no cache buffer: XLA:CPU
    used to copy each layer's k and v three times per step when attention read the cache it had
    just written (~40 % of a batch-1 step of the tiny model)."""
    config = preset("test-gqa", scan_layers=False)
    model, params = Phi(config), init_params(config, jax.random.key(3))
    slots = 64
    for rows in (1, 4):
        cache = init_cache(config, rows, slots)
        cache_shape = f"f32[{rows},{config.num_kv_heads},{slots},{config.dim_per_head}]"
        vector = lambda dtype, value=0: np.full(rows, value, dtype)
        hlo = compiled_decode_chunk(model).lower(
            rows, 8, False, slots, params, cache, vector(np.int32), vector(bool, True),
            vector(np.uint32), vector(np.int32), vector(np.int32, 8), np.full((rows, 8), -1, np.int32),
            vector(np.float32), vector(np.int32), vector(np.float32, 1.0), np.int32(8)).compile().as_text()
        copies = [line for line in hlo.splitlines() if f"= {cache_shape}" in line and " copy(" in line]
        assert f"{cache_shape}" in hlo and copies == [], copies[:3]


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
    prefill = compiled_prefill(model)
    decode = compiled_decode_chunk(model)
    phi_jax.generate(model, params, [[1] * 20, [2] * 3], max_new_tokens=10)
    sizes = (prefill._cache_size(), decode._cache_size())
    assert min(sizes) >= 1  # (other tests may have compiled other shapes of the same model)
    # other prompt lengths in the same bucket (17..32), other sampling settings: no new programs
    assert prompt_bucket(20) == prompt_bucket(31) == 32
    phi_jax.generate(model, params, [[3] * 31, [4] * 17], max_new_tokens=10, temperature=0.7,
                     top_k=3, top_p=0.9, seed=5)
    phi_jax.generate(model, params, [[5] * 25, [6] * 30], max_new_tokens=6, stop_tokens=[1, 2, 3])
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

    import phi_jax.inference.decode  # noqa: F401  (a submodule import must not shadow the function)

    assert callable(phi_jax.generate)
    assert phi_jax.generate is importlib.import_module("phi_jax.inference.decode").generate
    assert phi_jax.inference.load is importlib.import_module("phi_jax.inference.loader").load


@pytest.mark.parametrize("sampling", [{}, {"temperature": 0.8, "top_k": 5, "seed": 3}])
def test_chunk_size_never_changes_tokens_or_stream_order(sampling):
    """The device-side decode loop gives the tokens (and callback order) of one step per call,
    also when it stops early on a stop token in the middle of a chunk."""
    config = preset("test")
    model, params = Phi(config), init_params(config, jax.random.key(6))
    prompts = [[5, 6, 7], [9], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17]]
    free = phi_jax.generate(model, params, prompts, max_new_tokens=14, stop_tokens=[], **sampling)
    stop = free[1][5]  # ends row 1 mid-chunk; maybe others too
    runs = {}
    for chunk in (1, 3, 16):
        stream = []
        out = phi_jax.generate(model, params, prompts, max_new_tokens=14, stop_tokens=[stop],
                               chunk_size=chunk, callback=lambda i, t: stream.append((i, t)),
                               **sampling)
        runs[chunk] = (out, stream)
    assert runs[1] == runs[3] == runs[16]
    out = runs[1][0]
    for row, full in zip(out, free):
        assert row == (full[:full.index(stop) + 1] if stop in full else full)
    with pytest.raises(ValueError, match="chunk_size"):
        phi_jax.generate(model, params, prompts, chunk_size=0)


def test_unstacked_layers_give_the_same_model():
    config = preset("test-gqa")
    model, params = Phi(config), init_params(config, jax.random.key(7))
    flat_model, flat = unstack_layers(model, params)
    assert not flat_model.config.scan_layers
    assert sorted(k for k in flat["params"] if k.startswith("layers")) == [
        f"layers_{i}" for i in range(config.n_layers)]
    tokens = np.random.default_rng(2).integers(0, config.vocab_size, (2, 9))
    np.testing.assert_allclose(flat_model.apply(flat, tokens)[0], model.apply(params, tokens)[0],
                               atol=1e-6)
    # the unstacked params are exactly what a scan_layers=False model initialises to, weights too:
    # a seed gives one model whatever the layout
    jax.tree.map(np.testing.assert_array_equal, flat,
                 init_params(config.replace(scan_layers=False), jax.random.key(7)))
    back_model, back = stack_layers(flat_model, flat)
    assert back_model.config == config
    jax.tree.map(np.testing.assert_array_equal, back, params)
    assert unstack_layers(flat_model, flat)[1] is flat  # already unstacked: unchanged
    on_cpu = inference_layout(model, params)[0]
    assert on_cpu.config.scan_layers is (jax.default_backend() != "cpu")
    prompts = [[3, 4, 5], [6]]
    assert (phi_jax.generate(flat_model, flat, prompts, 8)
            == phi_jax.generate(model, params, prompts, 8))


def _sorted_cutoffs(logits: np.ndarray, k: int, p: float):
    """The textbook definitions, by sorting: k-th largest; smallest x with mass(> x) < p."""
    desc = -np.sort(-logits, axis=-1)
    kth = desc[:, k - 1]
    cut = []
    for row in desc:
        probs = np.exp(row - row.max())
        probs /= probs.sum()
        keep = np.cumsum(probs) - probs < p
        cut.append(row[keep].min() if keep.any() else row[0])
    return kth, np.array(cut)


def test_sort_free_cutoffs_equal_the_sorted_definitions():
    rng = np.random.default_rng(0)
    logits = (3 * rng.standard_normal((6, 500))).astype(np.float32)
    logits[0, :50] = -np.inf           # filtered entries
    logits[1] = np.round(logits[1])    # many ties
    logits[2, 7] = -0.0
    logits[3] = 0.25                   # all equal
    for k in (1, 2, 37, 500):
        for p in (0.0, 0.05, 0.5, 0.9, 0.999):
            kth, cut = _sorted_cutoffs(logits, k, p)
            np.testing.assert_array_equal(kth_largest(jnp.asarray(logits), jnp.int32(k)), kth)
            np.testing.assert_array_equal(top_p_cutoff(jnp.asarray(logits), jnp.float32(p)), cut)
    np.testing.assert_array_equal(argmax(jnp.asarray(logits)), np.argmax(logits, axis=-1))
    assert int(argmax(jnp.array([[np.nan, 1.0]]))[0]) == 0


def test_per_row_sampling_parameters():
    """A greedy row among sampled rows is the argmax; a top_k=1 row is too."""
    logits = jax.random.normal(jax.random.key(0), (4, 64)) * 3
    temperature = jnp.array([0.0, 1.0, 1.0, 2.0])
    top_k = jnp.array([0, 1, 0, 0], jnp.int32)
    top_p = jnp.array([1.0, 1.0, 1.0, 1e-6])
    want = np.argmax(np.asarray(logits), axis=-1)
    for seed in range(5):
        got = np.asarray(sample_logits(logits, jax.random.key(seed), temperature, top_k, top_p))
        assert got[0] == want[0] and got[1] == want[1] and got[3] == want[3]


@pytest.mark.parametrize("scan_layers", [False, True])
def test_a_remat_trained_model_decodes_like_one_without(scan_layers):
    """A fine-tuned checkpoint keeps its config's remat policy (finetune configs remat layers);
    decoding it with a KV cache must work and give the tokens of the same weights without remat."""
    config = preset("test", scan_layers=scan_layers)
    variables = init_params(config, jax.random.key(3))
    prompts = [[1, 2, 3, 4], [5, 6]]
    plain = phi_jax.generate(Phi(config), variables, prompts, 8)
    remat = phi_jax.generate(Phi(config.replace(remat_policy="full")), variables, prompts, 8)
    assert remat == plain
