"""Logit parity with transformers' PhiForCausalLM, whole model and per layer."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import phi_jax
from phi_jax import hf
from phi_jax.config import preset
from phi_jax.model import PhiAttention, PhiBlock, PhiMLP

from hf_reference import hf_logits, random_hf_model, save_like_the_hub

CONFIGS = ["test", "test-phi-2", "test-gqa", "test-qk-norm"]
FP32_TOL = 1e-4  # max abs logit difference, fp32 (the bar)


def _tokens(config, batch=2, length=24, seed=0):
    return np.random.default_rng(seed).integers(0, config.vocab_size, (batch, length))


@pytest.mark.parametrize("name", CONFIGS)
def test_logits_match_transformers_fp32(name, tmp_path):
    config = preset(name)
    ref = random_hf_model(config)
    ref.save_pretrained(tmp_path, safe_serialization=True)
    model, params = phi_jax.from_pretrained(tmp_path, dtype=jnp.float32)
    assert model.config.partial_rotary_factor == config.partial_rotary_factor
    tokens = _tokens(config)
    ours, _ = model.apply(params, tokens)
    diff = np.abs(np.asarray(ours) - hf_logits(ref, tokens)).max()
    assert diff <= FP32_TOL, diff


@pytest.mark.parametrize("name", ["test-phi-2", "test-gqa"])
def test_hub_layout_fp16_sharded_legacy_config(name, tmp_path):
    config = preset(name)
    save_like_the_hub(random_hf_model(config, seed=1), tmp_path)
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("model-*.safetensors"))) >= 2
    assert "rope_parameters" not in json.loads((tmp_path / "config.json").read_text())
    import transformers

    ref = transformers.PhiForCausalLM.from_pretrained(tmp_path, dtype=torch.float32,
                                                      attn_implementation="eager").eval()
    model, params = phi_jax.from_pretrained(tmp_path, dtype=jnp.float32)
    assert jax.tree.leaves(params)[0].dtype == jnp.float32
    tokens = _tokens(config, seed=3)
    diff = np.abs(np.asarray(model.apply(params, tokens)[0]) - hf_logits(ref, tokens)).max()
    assert diff <= FP32_TOL, diff


def test_unscanned_layers_give_the_same_logits(tmp_path):
    config = preset("test-phi-2")
    random_hf_model(config).save_pretrained(tmp_path)
    scanned, p1 = phi_jax.from_pretrained(tmp_path)
    unrolled, p2 = phi_jax.from_pretrained(tmp_path, scan_layers=False)
    assert "layers_1" in p2["params"]
    tokens = _tokens(config)
    np.testing.assert_allclose(scanned.apply(p1, tokens)[0], unrolled.apply(p2, tokens)[0], atol=1e-5)


def test_save_then_transformers_reloads_same_logits(tmp_path):
    import transformers

    config = preset("test-qk-norm")
    ref = random_hf_model(config, seed=2)
    ref.save_pretrained(tmp_path / "in")
    model, params = phi_jax.from_pretrained(tmp_path / "in")
    phi_jax.save_pretrained(tmp_path / "out", model.config, params, max_shard_size=30_000)
    assert (tmp_path / "out" / "model.safetensors.index.json").exists()
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "out", dtype=torch.float32, attn_implementation="eager").eval()
    tokens = _tokens(config, seed=4)
    np.testing.assert_array_equal(hf_logits(reloaded, tokens), hf_logits(ref, tokens))
    # and round trip through phi_jax again is bit-exact
    again, params2 = phi_jax.from_pretrained(tmp_path / "out")
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2)):
        np.testing.assert_array_equal(a, b)


def test_bf16_forward_close_to_fp32(tmp_path):
    config = preset("test-phi-2")
    random_hf_model(config).save_pretrained(tmp_path)
    m32, p32 = phi_jax.from_pretrained(tmp_path, dtype=jnp.float32)
    m16, p16 = phi_jax.from_pretrained(tmp_path, dtype=jnp.bfloat16)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(p16))
    tokens = _tokens(config)
    l32 = np.asarray(m32.apply(p32, tokens)[0])
    l16 = np.asarray(m16.apply(p16, tokens)[0])
    # bf16 keeps 8 mantissa bits: logits agree to ~3% of their spread, and the argmax mostly agrees.
    scale = np.abs(l32).max()
    assert np.abs(l16 - l32).max() <= 0.03 * scale, (np.abs(l16 - l32).max(), scale)
    assert (l16.argmax(-1) == l32.argmax(-1)).mean() >= 0.9


# ------------------------------------------------------------------------- per-layer parity
def _layer_params(params, i):
    return jax.tree.map(lambda a: a[i], params["params"]["layers"]["block"])


def _hf_layer_inputs(ref, config, length=12, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, length, config.d_model)).astype(np.float32)
    position_ids = torch.arange(length)[None].expand(2, length)
    xt = torch.as_tensor(x)
    cos, sin = ref.model.rotary_emb(xt, position_ids)
    causal = torch.full((length, length), torch.finfo(torch.float32).min).triu(1)[None, None]
    return x, xt, (cos, sin), causal


@pytest.mark.parametrize("name", CONFIGS)
def test_per_layer_parity(name, tmp_path):
    config = preset(name)
    ref = random_hf_model(config, seed=5)
    ref.save_pretrained(tmp_path)
    _, params = phi_jax.from_pretrained(tmp_path)
    x, xt, pos_emb, causal = _hf_layer_inputs(ref, config)
    layer = ref.model.layers[1]
    lp = _layer_params(params, 1)
    positions = jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2])
    segments = jnp.ones(x.shape[:2], jnp.int32)
    with torch.no_grad():
        hf_attn = layer.self_attn(xt, position_embeddings=pos_emb, attention_mask=causal)[0].numpy()
        hf_mlp = layer.mlp(xt).numpy()
        hf_block = layer(xt, attention_mask=causal, position_embeddings=pos_emb).numpy()
    ours_attn, _ = PhiAttention(config).apply({"params": lp["self_attn"]}, x, positions, segments)
    ours_mlp = PhiMLP(config).apply({"params": lp["mlp"]}, x)
    ours_block, _ = PhiBlock(config).apply({"params": lp}, x, positions, segments)
    np.testing.assert_allclose(ours_attn, hf_attn, atol=2e-5)
    np.testing.assert_allclose(ours_mlp, hf_mlp, atol=2e-5)
    np.testing.assert_allclose(ours_block, hf_block, atol=5e-5)
