"""Weight-only int8/int4 inference and the int8 KV cache (phi_jax.quant, phi_jax.kernels.quantized).

References: the pure-jnp dequantize-then-einsum, the float32 model, the `gguf` package's reader and
its q8_0 / q4_0 quantizers, and the float KV cache. Bounds are stated beside each check.
"""

import json

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from phi_jax import quant
from phi_jax.config import preset
from phi_jax.errors import InputError
from phi_jax.inference import decode, loader
from phi_jax.kernels import quantized
from phi_jax.model import Phi, init_params

from gguf_fixtures import llama_permute, write_gguf
from test_cli import _cli, hf_dir  # noqa: F401  (the module's tiny HF model + tokenizer)

SPECS = [("BTD,DNH->BTNH", (64,), (4, 16)), ("BTNH,NHD->BTD", (4, 16), (64,)), ("BTF,FD->BTD", (128,), (64,))]


def _peaked(config, seed=0, gain=4.0):
    """A random tiny model whose logits have real margins (x gain on every matrix), so greedy
    tokens are a meaningful comparison rather than a coin toss between near-equal logits."""
    params = init_params(config, jax.random.key(seed))
    return jax.tree.map(lambda x: x * gain if x.ndim >= 2 else x, params)


@pytest.mark.parametrize("mode, group", [("int8", None), ("int8", 32), ("int4", 32), ("int4", 16)])
@pytest.mark.parametrize("spec, in_shape, out_shape", SPECS)
def test_quantized_einsum_equals_dequantize_then_einsum(mode, group, spec, in_shape, out_shape):
    rng = np.random.default_rng(0)
    w = rng.standard_normal(in_shape + out_shape).astype(np.float32) * 0.05
    x = jnp.asarray(rng.standard_normal((2, 3) + in_shape).astype(np.float32))
    q, scale = quant.quantize_kernel(w, mode, group, 0, len(in_shape))
    fast = quantized.quantized_einsum(spec, x, q, scale, in_shape)
    reference = quantized.reference_quantized_einsum(spec, x, q, scale, in_shape)
    np.testing.assert_allclose(fast, reference, rtol=1e-5, atol=1e-5)  # float32 summation order
    # and the quantized layer is the float layer up to the rounding: |dw| <= scale / 2 per weight
    exact = jnp.einsum(spec, x, w)
    err = np.abs(np.asarray(reference - exact)).max()
    bound = np.abs(np.asarray(x)).sum(axis=tuple(range(2, 2 + len(in_shape)))).max() * float(scale.max()) / 2
    assert 0 < err <= bound


def test_int4_rounding_is_q4_0_and_int8_is_q8_0():
    """Our int8 and int4 groups of 32 are llama.cpp's q8_0 and q4_0 blocks: the gguf package's
    quantizer and ours give the same integers and scales (f16-rounded scales aside)."""
    rng = np.random.default_rng(1)
    w = rng.standard_normal((8, 64)).astype(np.float32)  # [out, in]: blocks along in
    for mode, qtype in (("int8", gguf.GGMLQuantizationType.Q8_0), ("int4", gguf.GGMLQuantizationType.Q4_0)):
        deq = gguf.quants.dequantize(gguf.quants.quantize(w, qtype), qtype).reshape(w.shape)
        q, scale = quant.quantize_kernel(deq.T, mode, 32, 0, 1)  # kernel layout [in, out]
        back = np.asarray(quantized.dequantize(q, scale, (64,)))
        np.testing.assert_array_equal(back, deq.T)  # bit for bit: the file's blocks are kept


@pytest.mark.parametrize("name", ["test", "test-llama", "test-gqa"])
def test_quantized_model_logits_and_greedy_tokens_follow_float32(name):
    """Bounds for random (not trained) tiny models, whose gaussian weights are the hard case for
    int4; SmolLM2's real weights are measured in benchmarks/quant.py."""
    config = preset(name, scan_layers=False)
    params = _peaked(config, gain=2.0)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, config.vocab_size, (4, 32)), jnp.int32)
    reference, _ = Phi(config).apply(params, tokens)
    spread = float(jnp.std(reference))
    prompts = [[1, 5, 9, 3], [7, 2]]
    want = decode.generate(Phi(config), params, prompts, 12)
    # (max |logit error| / std of the logits, share of positions with the same argmax)
    for mode, bound, agreement in (("int8", 0.1, 0.95), ("int4", 1.0, 0.6)):
        qconfig = quant.quantized_config(config, mode)
        qparams = quant.quantize_params(qconfig, params)
        logits, _ = Phi(qconfig).apply(qparams, tokens)
        error = float(jnp.max(jnp.abs(logits - reference))) / spread
        assert 0 < error < bound, (mode, error)
        same = float(jnp.mean(jnp.argmax(logits, -1) == jnp.argmax(reference, -1)))
        assert same >= agreement, (mode, same)
        if mode == "int8":  # and the decoder's greedy tokens, end to end
            assert decode.generate(Phi(qconfig), qparams, prompts, 12) == want


def test_weight_memory_of_the_matmuls():
    config = preset("tiny", scan_layers=False)
    params = init_params(config, jax.random.key(0))
    reference = quant.float_matmul_bytes(config)
    assert quant.weight_bytes(params)["matmul"] == reference  # untied: the float kernels themselves
    for mode, most in (("int8", 0.3), ("int4", 0.2)):
        qconfig = quant.quantized_config(config, mode)
        qparams = quant.quantize_params(qconfig, params)
        kinds = {x.dtype for x in jax.tree.leaves(qparams)}
        assert jnp.dtype(jnp.int4 if mode == "int4" else jnp.int8) in kinds
        assert quant.weight_bytes(qparams)["matmul"] <= most * reference
        # embeddings and norms stay float32, untouched
        np.testing.assert_array_equal(qparams["params"]["embed_tokens"]["embedding"],
                                      params["params"]["embed_tokens"]["embedding"])


@pytest.mark.slow
def test_int8_kv_cache_decodes_like_the_float_cache():
    config = preset("test-gqa", scan_layers=False)
    params = _peaked(config, gain=2.0)
    int8 = config.replace(kv_cache_dtype="int8")
    cache = decode.new_cache(int8, 2, 64)
    assert jax.tree.leaves(cache["k"])[0].dtype == jnp.int8 and "k_scale" in cache
    prompts = [[3, 1, 4, 1, 5, 9, 2, 6], [5, 3]]
    assert decode.generate(Phi(int8), params, prompts, 16) == decode.generate(Phi(config), params, prompts, 16)
    # logits through a prefilled cache, both read paths (one token: read before write; several: after)
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, 128, (2, 9)), jnp.int32)
    outs = []
    for cfg in (config, int8):
        cache = decode.new_cache(cfg, 2, 32)
        _, cache = Phi(cfg).apply(params, tokens[:, :6], cache=cache)
        one, cache1 = Phi(cfg).apply(params, tokens[:, 6:7], cache=cache)
        many, _ = Phi(cfg).apply(params, tokens[:, 6:], cache=cache)
        outs.append((one, many))
    spread = float(jnp.std(outs[0][1]))
    for a, b in zip(*outs):
        assert float(jnp.max(jnp.abs(a - b))) / spread < 0.02  # int8 k/v: ~0.4 % per vector
    np.testing.assert_allclose(outs[1][0][:, 0], outs[1][1][:, 0], rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_scanned_layers_and_int8_cache_agree_with_unrolled():
    config = preset("test", scan_layers=True, kv_cache_dtype="int8")
    params = init_params(config, jax.random.key(0))
    from phi_jax.model import unstack_layers
    model, unstacked = unstack_layers(Phi(config), params)
    qa = quant.quantized_config(config, "int4")
    qb = quant.quantized_config(model.config, "int4")
    a = decode.generate(Phi(qa), quant.quantize_params(qa, params), [[1, 2, 3]], 8)
    b = decode.generate(Phi(qb), quant.quantize_params(qb, unstacked), [[1, 2, 3]], 8)
    assert a == b


def _q8_file(path, kind="Q8_0"):
    """A tiny tied llama GGUF, every layer matrix stored as `kind` and the embedding as q8_0, as
    llama.cpp's q4_0 files keep it (d 64, 4 heads, 2 kv heads)."""
    rng = np.random.default_rng(0)
    d, f, v, heads, kv = 64, 96, 128, 4, 2
    normal = lambda *s: (0.2 * rng.standard_normal(s)).astype(np.float32)
    tensors = {"token_embd.weight": (normal(v, d), "Q8_0"),
               "output_norm.weight": (1 + 0.1 * normal(d), "F32")}
    for i in range(2):
        for name, shape in (("attn_q", (d, d)), ("attn_k", (32, d)), ("attn_v", (32, d)),
                            ("attn_output", (d, d)), ("ffn_gate", (f, d)), ("ffn_up", (f, d)),
                            ("ffn_down", (d, f))):
            w = normal(*shape)
            if name in ("attn_q", "attn_k"):
                w = llama_permute(w, heads if name == "attn_q" else kv)
            tensors[f"blk.{i}.{name}.weight"] = (w, kind)
        for norm in ("attn_norm", "ffn_norm"):
            tensors[f"blk.{i}.{norm}.weight"] = (1 + 0.1 * normal(d), "F32")
    metadata = {f"llama.{k}": value for k, value in {
        "context_length": 128, "embedding_length": d, "feed_forward_length": f, "block_count": 2,
        "attention.head_count": heads, "attention.head_count_kv": kv, "vocab_size": v,
        "attention.layer_norm_rms_epsilon": 1e-5, "rope.freq_base": 10000.0, "rope.dimension_count": 16}.items()}
    return write_gguf(path, "llama", metadata, tensors, vocab_size=v)


@pytest.mark.parametrize("kind, mode", [("Q8_0", "int8"), ("Q4_0", "int4")])
def test_gguf_blocks_load_quantized_with_the_files_logits(kind, mode, tmp_path):
    path = _q8_file(tmp_path / f"{kind}.gguf", kind)
    dense = loader.load(path)
    kept = loader.load(path, quantize=mode)
    assert kept.model.config.quantize == mode and kept.model.config.quant_group_size == 32
    # the file's integers and scales, exactly: dequantized they are the file's float values
    back = quant.dequantize_params(kept.model.config, kept.variables)["params"]
    for name in ("q_proj", "k_proj"):
        np.testing.assert_array_equal(back["layers_1"]["self_attn"][name]["kernel"],
                                      dense.variables["params"]["layers_1"]["self_attn"][name]["kernel"])
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 128, (2, 12)), jnp.int32)
    want, _ = dense.model.apply(dense.variables, tokens)
    got, _ = kept.model.apply(kept.variables, tokens)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)  # same weights, summation order
    assert kept.metadata["quantized"]["matmul_ratio"] <= (0.3 if mode == "int8" else 0.2)


def test_bad_quantization_input_is_one_line(tmp_path):
    path = _q8_file(tmp_path / "m.gguf")
    for kwargs, words in ((dict(quantize="int3"), "quantize='int3'"),
                          (dict(quantize="int4:48"), "48 does not divide"),
                          (dict(kv_cache_dtype="fp8"), "kv_cache_dtype='fp8'"),
                          (dict(quantize="int8", layout="training"), "for inference")):
        with pytest.raises(InputError) as error:
            loader.load(path, **kwargs)
        assert words in str(error.value) and "\n" not in str(error.value)


@pytest.mark.slow
def test_cli_flags_sample_quantized_and_refuse_bad_values(hf_dir):  # noqa: F811
    greedy = ["--prompt=def add(", "--temperature=0", "--max-new-tokens=8"]
    plain = _cli("sample", f"--model={hf_dir}", *greedy)
    int8 = _cli("sample", f"--model={hf_dir}", *greedy, "--quantize=int8", "--kv-cache-dtype=int8")
    assert plain.returncode == 0 and int8.returncode == 0, int8.stderr[-2000:]
    assert int8.stdout.startswith("def add(")
    for flag, words in (("--quantize=int2", "quantize='int2'"), ("--quantize=int4:7", "7 does not divide"),
                        ("--kv-cache-dtype=int4", "kv_cache_dtype='int4'")):
        bad = _cli("sample", f"--model={hf_dir}", *greedy, flag)
        assert bad.returncode != 0 and words in bad.stderr and "Traceback" not in bad.stderr, bad.stderr
        assert len(bad.stderr.strip().splitlines()) == 1
    ppl = _cli("eval", "perplexity", f"--model={hf_dir}", "--quantize=int4", "--output",
               hf_dir.parent / "ppl", "--max-batches=1", "--seq-len=32", "--max-documents=4")
    assert ppl.returncode == 0, ppl.stderr[-2000:]
    result = json.loads((hf_dir.parent / "ppl" / "perplexity_results.json").read_text())
    assert result["settings"]["quantize"] == "int4" and np.isfinite(result["metrics"]["perplexity"])


@pytest.mark.parametrize("new_tokens", [1, 3])
def test_int8_cache_attention_equals_attention_over_the_dequantized_cache(new_tokens):
    """Both XLA decode paths scale scores and probabilities by the cache's scales; that equals
    attending over the dequantized float cache (the definition)."""
    from phi_jax.kernels.attention import (reference_cached_attention,
                                           reference_cached_attention_before_write)
    rng = np.random.default_rng(3)
    b, t, n, kv, s, h = 2, new_tokens, 4, 2, 24, 16
    q = jnp.asarray(rng.standard_normal((b, t, n, h)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((b, kv, s, h)), jnp.float32) for _ in range(2))
    (kq, ks), (vq, vs) = quantized.quantize_kv(k), quantized.quantize_kv(v)
    k_deq, v_deq = quantized.dequantize_kv(kq, ks), quantized.dequantize_kv(vq, vs)
    assert float(jnp.max(jnp.abs(k_deq - k))) <= float(ks.max()) / 2 + 1e-7
    q_start = jnp.asarray([5, 20 - t], jnp.int32)
    new_k, new_v = (jnp.asarray(rng.standard_normal((b, t, kv, h)), jnp.float32) for _ in range(2))
    got = reference_cached_attention_before_write(q, kq, vq, new_k, new_v, q_start=q_start,
                                                  k_scale=ks, v_scale=vs)
    want = reference_cached_attention_before_write(q, k_deq, v_deq, new_k, new_v, q_start=q_start)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    got = reference_cached_attention(q, kq, vq, q_start=q_start, k_scale=ks, v_scale=vs)
    np.testing.assert_allclose(got, reference_cached_attention(q, k_deq, v_deq, q_start=q_start),
                               rtol=1e-5, atol=1e-5)
