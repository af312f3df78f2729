"""The model family against transformers' own classes: Llama (llama3 rope, tied), Phi-3 (fused
checkpoint tensors, longrope), Phi-4-mini style (partial rotary, GQA, tied), Mistral (sliding
window, head_dim != d/N) and Qwen2 (q/k/v bias, a window from layer 1 on).

Every tensor of the reference is random (norms and biases included). Sequences of 24 tokens are
longer than the windows (7 and 5) and than test-phi3's pretraining context (16), so the window
masks and the long longrope factors are exercised; 12 tokens take the short factors.
Tolerance: fp32 max |logit difference| <= 1e-4 (measured 6e-7 to 9e-7).
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import phi_jax
from phi_jax.config import preset
from phi_jax.errors import ConfigError
from phi_jax.model import Phi, init_cache, unstack_layers

from hf_reference import hf_logits, random_hf_model, save_like_the_hub

FAMILY = ["test-llama", "test-phi3", "test-phi4", "test-mistral", "test-qwen2"]
FP32_TOL = 1e-4


def _tokens(config, length, batch=2, seed=0):
    return np.random.default_rng(seed).integers(0, config.vocab_size, (batch, length))


def _reload(path):
    return transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager").eval()


@pytest.mark.parametrize("name", FAMILY)
def test_logits_match_transformers_and_save_reloads_identically(name, tmp_path):
    config = preset(name)
    ref = random_hf_model(config, seed=3)
    ref.save_pretrained(tmp_path / "in")
    model, params = phi_jax.from_pretrained(tmp_path / "in")
    assert model.config == config
    for length in (12, 24):
        tokens = _tokens(config, length)
        diff = np.abs(np.asarray(model.apply(params, tokens)[0]) - hf_logits(ref, tokens)).max()
        assert diff <= FP32_TOL, (length, diff)
    # unscanned layers (a static per-layer window instead of a traced one) give the same logits
    flat_model, flat_params = unstack_layers(model, params)
    np.testing.assert_allclose(flat_model.apply(flat_params, tokens)[0],
                               model.apply(params, tokens)[0], atol=1e-5)
    phi_jax.save_pretrained(tmp_path / "out", model.config, params)
    reloaded = _reload(tmp_path / "out")
    assert type(reloaded) is type(ref)
    np.testing.assert_array_equal(hf_logits(reloaded, tokens), hf_logits(ref, tokens))


@pytest.mark.parametrize("name", ["test-phi3", "test-llama"])
def test_hub_layout_legacy_rope_scaling_fp16_sharded(name, tmp_path):
    """The 4.x config.json form (rope_scaling + top-level rope_theta), fp16, several shards."""
    config = preset(name)
    save_like_the_hub(random_hf_model(config, seed=4), tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert "rope_parameters" not in written and written["rope_scaling"]["rope_type"] == config.rope_type
    assert len(list(tmp_path.glob("model-*.safetensors"))) >= 2
    ref = _reload(tmp_path)
    model, params = phi_jax.from_pretrained(tmp_path)
    tokens = _tokens(config, 24, seed=5)
    assert np.abs(np.asarray(model.apply(params, tokens)[0]) - hf_logits(ref, tokens)).max() <= FP32_TOL


def _hf_greedy(ref, prompt, max_new_tokens):
    with torch.no_grad():
        out = ref.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False,
                           eos_token_id=None, pad_token_id=0, output_logits=True,
                           return_dict_in_generate=True)
    return out.sequences[0, len(prompt):].tolist(), torch.stack(out.logits, 1)[0].numpy()


@pytest.mark.slow
@pytest.mark.parametrize("name, prompt_len", [("test-mistral", 10), ("test-qwen2", 10),
                                               ("test-phi3", 6)])
def test_greedy_decode_matches_transformers(name, prompt_len, tmp_path):
    """Through the KV cache, with windows sliding past the start of the cache (longrope: see the
    next test for sequences that outgrow the pretraining context)."""
    config = preset(name)
    ref = random_hf_model(config, seed=6)
    ref.save_pretrained(tmp_path)
    model, params = phi_jax.from_pretrained(tmp_path)
    prompt = np.random.default_rng(1).integers(3, config.vocab_size, prompt_len).tolist()
    new = 16 - prompt_len if config.rope_type == "longrope" else 20  # stays within 16 tokens
    ours = phi_jax.generate(model, params, [prompt], max_new_tokens=new, temperature=0.0,
                            stop_tokens=[])
    assert ours[0] == _hf_greedy(ref, prompt, new)[0]


def test_longrope_past_the_pretraining_context_is_a_fresh_forward(tmp_path):
    """transformers' Phi-3 generate drops its cache once a sequence first outgrows
    original_max_position_embeddings and recomputes it with the long factors. So each of its
    next-token logits equals phi_jax's full forward over the sequence so far: a decoder must
    re-prefill at that point to match (a cached decode keeps the short-factor keys)."""
    config = preset("test-phi3")
    ref = random_hf_model(config, seed=6)
    ref.save_pretrained(tmp_path)
    model, params = phi_jax.from_pretrained(tmp_path)
    prompt = np.random.default_rng(1).integers(3, config.vocab_size, 10).tolist()
    tokens, logits = _hf_greedy(ref, prompt, 12)
    sequence = np.asarray([prompt + tokens])
    full = np.asarray(jax.jit(model.apply)(params, sequence)[0])  # 22 tokens: long factors
    np.testing.assert_allclose(full[0, -2], logits[-1], atol=FP32_TOL)
    for step in range(4, 12, 3):  # one forward per prefix length 14, 17, 20: short, then long
        prefix = sequence[:, :10 + step]
        got = np.asarray(model.apply(params, prefix)[0])[0, -1]
        np.testing.assert_allclose(got, logits[step], atol=FP32_TOL)


def test_cached_decode_equals_full_forward_with_windows():
    """Step-by-step decode through the cache equals one full forward, windows included."""
    config = preset("test-qwen2")
    model = Phi(config)
    params = model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
    tokens = _tokens(config, 14)
    apply = jax.jit(model.apply)
    full, _ = apply(params, tokens)
    cache = init_cache(config, 2, 16)
    _, cache = apply(params, tokens[:, :6], cache=cache)
    steps = []
    for t in range(6, 14):
        logits, cache = apply(params, tokens[:, t:t + 1], cache=cache)
        steps.append(logits[:, 0])
    np.testing.assert_allclose(np.stack(steps, 1), full[:, 6:], atol=1e-5)


def test_return_hidden_gives_final_normed_states_without_the_head(tmp_path):
    config = preset("test-qwen2", tie_embeddings=False)
    ref = random_hf_model(config, seed=8)
    ref.save_pretrained(tmp_path)
    model, params = phi_jax.from_pretrained(tmp_path)
    tokens = _tokens(config, 9)
    headless = {"params": {k: v for k, v in params["params"].items() if k != "lm_head"}}
    hidden, cache = model.apply(headless, tokens, return_hidden=True)  # no lm_head needed
    assert hidden.shape == (2, 9, config.d_model) and cache is None
    with torch.no_grad():
        want = ref.model(torch.as_tensor(tokens)).last_hidden_state.numpy()
    np.testing.assert_allclose(np.asarray(hidden), want, atol=1e-5)


@pytest.mark.slow
def test_sliding_window_with_a_fused_kernel_only_where_it_masks_nothing():
    config = preset("test-mistral", attention_impl="pallas", rotary_impl="pallas")
    model = Phi(config)
    params = model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
    short = _tokens(config, 7)  # window 7 >= 7 tokens: the kernel is exact
    want = Phi(config.replace(attention_impl="xla", rotary_impl="xla")).apply(params, short)[0]
    np.testing.assert_allclose(model.apply(params, short)[0], want, atol=1e-4)
    with pytest.raises(ConfigError, match="sliding_window=7 is shorter than these 8 tokens.*"
                                          "attention_impl='xla'"):
        model.apply(params, _tokens(config, 8))


@pytest.mark.parametrize("name", FAMILY + ["phi-4-mini", "smollm2-135m"])
def test_every_parameter_has_logical_axis_names(name):
    """The sharding rules see every parameter of every family: one name per dimension."""
    from phi_jax import axes
    from phi_jax.model import abstract_params, param_logical_axes

    config = preset(name)
    shapes, names = abstract_params(config), param_logical_axes(config)
    flat_shapes = jax.tree_util.tree_leaves_with_path(shapes)
    flat_names = jax.tree.leaves(names, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    assert len(flat_shapes) == len(flat_names)
    for (path, shape), spec in zip(flat_shapes, flat_names):
        assert len(spec) == len(shape.shape) and all(n in axes.ALL for n in spec), (path, spec)
