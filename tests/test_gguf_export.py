"""GGUF export (`phi_jax.gguf_export.save_gguf`, `phi-jax export`), checked against independent readers.

* phi_jax reloads its own export (the GGUF reader, through the one loader) to the same logits:
  every architecture (phi2, phi3 with longrope, llama with llama3 rope, Mistral with its own
  head dim, qwen2 with biases and tied embeddings), f32 within 1e-6; stacked source layers,
  unstacked reload; the tokenizer gives the same ids.
* Quantized: the `gguf` package's GGUFReader + dequantizer read every matrix back within its
  format's per-block error (F16 2^-11 relative, BF16 2^-8 relative, Q8_0 half a step of amax/127,
  Q4_0 one step of amax/8 (its +8 end clips), Q4_1 half a step of (max-min)/15; the f16 block
  scales' rounding on top), and the reloaded logits within stated
  fractions of the largest source logit (f16 5e-3, bf16 3e-2, q8_0 5e-2, q4_0/q4_1 0.5; measured
  about 7e-4, 1e-2, 1.5e-2, 0.25 on these random models).
* GGUFReader sees llama.cpp's names, types, `<arch>.*` keys, the tokenizer keys, and q/k rows in
  llama.cpp's permuted order (tests/gguf_fixtures.llama_permute is the converter's permutation).
* Fallbacks (rows not a multiple of 32 -> F16; q4 output projection -> Q8_0) land in file and summary.
* Writes are atomic: an existing output is refused without overwrite; a failed or SIGKILLed export
  leaves nothing under the output's name.
* Slow: transformers' GGUF loader reads our Llama and Phi-3 files (f32, and llama q8_0 against
  phi_jax's reading of it) to within 1e-4 (it has no phi2 architecture, and ignores rope scaling
  tensors, so these use default rope); SmolLM2 at q8_0 keeps >= 95 % of 16 greedy tokens, and at
  q4_1 (its own source grid) gives identical logits.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from phi_jax import gguf_export, hf, lora
from phi_jax.config import preset
from phi_jax.errors import InputError
from phi_jax.inference.loader import Loaded, load
from phi_jax.model import Phi, abstract_params, unstack_layers
from phi_jax.tokenizer import train_bpe

from gguf_fixtures import llama_permute

TOKENS = jnp.array([[1, 5, 9, 33, 200, 7, 8, 9, 250, 4]])
TEXT = "def f(x):\n    return x + 1  # the quick brown fox"
LOGIT_BOUND = {"f16": 5e-3, "bf16": 3e-2, "q8_0": 5e-2, "q4_0": 0.5, "q4_1": 0.5}
ARCHS = {"test-phi-2": "phi2", "test-phi3": "phi3", "test-llama": "llama", "test-mistral": "llama",
         "test-qwen2": "qwen2"}


@pytest.fixture(scope="module")
def tokenizer():
    texts = ["hello world, the quick brown fox jumps " * 4, "def f(x):\n    return x + 1\n"] * 20
    return train_bpe(texts, 300)


def _random(shape, rng) -> jnp.ndarray:
    """Weights of a visible size: norm scales (all-ones at init) around 1, the rest around 0."""
    return jnp.asarray(0.1 * rng.standard_normal(shape.shape), shape.dtype)


def tiny(name: str, tokenizer, seed: int = 0, **overrides) -> Loaded:
    """A preset with random weights (from the shapes alone: no init program to compile)."""
    config = preset(name, vocab_size=320, sliding_window=None, sliding_window_start=0, **overrides)
    rng = np.random.default_rng(seed)
    variables = jax.tree_util.tree_map_with_path(
        lambda path, s: _random(s, rng) + (1.0 if path[-1].key == "scale" else 0.0), abstract_params(config))
    return Loaded(Phi(config), variables, tokenizer, None, {"source": "test", "path": name})


_APPLY: dict = {}  # one compiled forward per config, shared by the quant cases


def _logits(loaded: Loaded) -> np.ndarray:
    config = loaded.model.config
    if config not in _APPLY:
        _APPLY[config] = jax.jit(Phi(config).apply)
    return np.asarray(_APPLY[config](loaded.variables, TOKENS)[0])


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_f32_round_trip_gives_the_same_logits_and_token_ids(name, tokenizer, tmp_path):
    source = tiny(name, tokenizer)
    assert source.model.config.scan_layers  # stacked here; the loader unstacks on CPU
    summary = gguf_export.save_gguf(source, tmp_path / "m.gguf")
    assert summary.architecture == ARCHS[name] and summary.fallbacks == [] and summary.types == {
        "F32": summary.tensors}
    back = load(tmp_path / "m.gguf")
    assert not back.model.config.scan_layers  # same program on both sides: compare unstacked
    theirs, ours = (hf.params_to_hf(x.variables, x.model.config) for x in (back, source))
    assert theirs.keys() == ours.keys() and all(np.array_equal(theirs[k], ours[k]) for k in ours)
    unstacked = Loaded(*unstack_layers(source.model, source.variables), tokenizer, None, {})
    # identical weights; llama3's rope comes back as per-frequency divisors: float32 rounding
    np.testing.assert_allclose(_logits(back), _logits(unstacked), rtol=0, atol=2e-6)
    assert back.tokenizer.encode(TEXT) == tokenizer.encode(TEXT)
    assert (back.tokenizer.bos_id, back.tokenizer.eos_id) == (tokenizer.bos_id, tokenizer.eos_id)


def _block_error_bound(kind: str, w: np.ndarray) -> np.ndarray:
    """Largest error the format allows for each value of `w` [rows, cols] (blocks of 32 per row)."""
    if kind == "F16":
        return np.abs(w) * 2.0**-11 + 1e-7
    if kind == "BF16":
        return np.abs(w) * 2.0**-8 + 1e-30
    blocks = w.reshape(w.shape[0], -1, 32)
    amax = np.abs(blocks).max(-1, keepdims=True)
    if kind == "Q8_0":  # round to amax/127 steps: half a step, plus the f16 scale's rounding
        bound = 0.6 * amax / 127
    elif kind == "Q4_0":  # steps of amax/8 from -8 to +7: the +8 end clips by up to one step
        bound = 1.01 * amax / 8
    else:
        assert kind == "Q4_1", kind  # 16 levels from min: half a step, plus f16 min and scale
        low, high = blocks.min(-1, keepdims=True), blocks.max(-1, keepdims=True)
        bound = 0.6 * (high - low) / 15 + np.abs(low) * 2.0**-10
    return np.broadcast_to(bound + 1e-7, blocks.shape).reshape(w.shape)


@pytest.mark.parametrize("quant", ["f16", "bf16", "q8_0", "q4_0", "q4_1"])
def test_quantized_export_is_within_the_formats_error(quant, tokenizer, tmp_path):
    source = tiny("test-phi3", tokenizer)
    gguf_export.save_gguf(source, tmp_path / "m.gguf", quant=quant)
    expected = hf.params_to_hf(source.variables, source.model.config)
    names = {"token_embd.weight": "model.embed_tokens.weight", "output.weight": "lm_head.weight"}
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    checked = 0
    for t in reader.tensors:
        if len(t.shape) != 2:
            assert t.tensor_type.name == "F32", t.name
            continue
        parts = t.name.split(".")
        if t.name in names:
            ref = expected[names[t.name]]
        else:
            suffix = {"attn_qkv": "self_attn.qkv_proj", "attn_output": "self_attn.o_proj",
                      "ffn_up": "mlp.gate_up_proj", "ffn_down": "mlp.down_proj"}[parts[2]]
            ref = expected[f"model.layers.{parts[1]}.{suffix}.weight"]
        got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(ref.shape)
        err = np.abs(got - ref)
        assert (err <= _block_error_bound(t.tensor_type.name, ref)).all(), (t.name, err.max())
        checked += 1
    assert checked == 1 + 1 + 4 * 2  # embedding, output, 4 matrices x 2 layers
    ref_logits = _logits(source)
    err = np.abs(_logits(load(tmp_path / "m.gguf")) - ref_logits).max()
    assert err <= LOGIT_BOUND[quant] * np.abs(ref_logits).max(), err


def test_gguf_reader_sees_llama_cpp_names_keys_and_permuted_rows(tokenizer, tmp_path):
    source = tiny("test-llama", tokenizer, rope_type="default", rope_factor=None,
                  rope_original_max_len=None)
    gguf_export.save_gguf(source, tmp_path / "m.gguf", quant="q8_0")
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    md = {k: f.contents() for k, f in reader.fields.items()}
    c = source.model.config
    assert md["general.architecture"] == "llama"
    assert md["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_Q8_0)
    assert {k: md[f"llama.{k}"] for k in ("context_length", "embedding_length", "feed_forward_length",
                                          "block_count", "attention.head_count",
                                          "attention.head_count_kv", "rope.dimension_count")} == {
        "context_length": c.max_len, "embedding_length": 64, "feed_forward_length": 96, "block_count": 2,
        "attention.head_count": 4, "attention.head_count_kv": 2, "rope.dimension_count": 16}
    assert md["llama.rope.freq_base"] == pytest.approx(c.rope_theta)
    assert md["tokenizer.ggml.model"] == "gpt2" and md["tokenizer.ggml.pre"] == "gpt-2"
    assert len(md["tokenizer.ggml.tokens"]) == 320 and md["tokenizer.ggml.tokens"][-1] == "[PAD319]"
    assert md["tokenizer.ggml.token_type"][0] == 3 and md["tokenizer.ggml.token_type"][-1] == 5
    merges = json.loads(tokenizer.backend.to_str())["model"]["merges"]
    assert md["tokenizer.ggml.merges"] == [m if isinstance(m, str) else " ".join(m) for m in merges]
    assert md["tokenizer.ggml.eos_token_id"] == tokenizer.eos_id
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert "output.weight" not in types  # tied embeddings: llama.cpp reuses token_embd
    assert types == {"token_embd.weight": "Q8_0", "output_norm.weight": "F32",
                     **{f"blk.{i}.{n}.weight": ("F32" if n.endswith("norm") else "Q8_0")
                        for i in range(2) for n in ("attn_norm", "ffn_norm", "attn_q", "attn_k", "attn_v",
                                                    "attn_output", "ffn_gate", "ffn_up", "ffn_down")}}
    q = next(t for t in reader.tensors if t.name == "blk.1.attn_q.weight")
    hf_q = hf.params_to_hf(source.variables, c)["model.layers.1.self_attn.q_proj.weight"]
    got = gguf.quants.dequantize(q.data, q.tensor_type).reshape(hf_q.shape)
    assert np.abs(got - llama_permute(hf_q, 4)).max() < np.abs(got - hf_q).max() / 10


def test_fallbacks_are_stored_and_reported(tokenizer, tmp_path):
    source = tiny("test-qwen2", tokenizer, mlp_dim=80)  # down_proj rows of 80: not a 32-block multiple
    summary = gguf_export.save_gguf(source, tmp_path / "m.gguf", quant="q4_0")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(tmp_path / "m.gguf")).tensors}
    assert types["blk.0.ffn_down.weight"] == "F16" and types["blk.0.ffn_up.weight"] == "Q4_0"
    assert types["token_embd.weight"] == "Q8_0"  # tied: the output projection
    fallen = {f["name"]: f["stored"] for f in summary.fallbacks}
    assert fallen == {"token_embd.weight": "Q8_0", **{f"blk.{i}.ffn_down.weight": "F16" for i in range(3)}}
    assert any("fallback to F16" in line and "80 values" in line for line in summary.lines())


def test_a_lora_adapter_is_merged_into_the_export(tokenizer, tmp_path):
    source = tiny("test-llama", tokenizer)
    config = lora.with_lora(source.model.config, 4, 8.0, "q_proj,down_proj")
    adapted = tiny("test-llama", tokenizer, lora_rank=4, lora_alpha=8.0, lora_targets=("q_proj", "down_proj"))
    assert adapted.model.config == config and lora.has_lora(adapted.variables["params"])
    gguf_export.save_gguf(adapted, tmp_path / "m.gguf")
    np.testing.assert_allclose(_logits(load(tmp_path / "m.gguf")), _logits(adapted), atol=1e-5)
    assert np.abs(_logits(adapted) - _logits(source)).max() > 1e-2  # the adapter changes the model


def test_writes_are_atomic(tokenizer, tmp_path, monkeypatch):
    source = tiny("test-qwen2", tokenizer)
    out = tmp_path / "m.gguf"
    out.write_bytes(b"old")
    with pytest.raises(InputError, match="--overwrite"):
        gguf_export.save_gguf(source, out)
    assert out.read_bytes() == b"old"

    def fail(self, *a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", fail)
    with pytest.raises(OSError, match="disk full"):
        gguf_export.save_gguf(source, out, overwrite=True)
    assert out.read_bytes() == b"old" and sorted(os.listdir(tmp_path)) == ["m.gguf"]


def test_quantized_in_memory_weights_are_refused_with_the_fix(tokenizer, tmp_path):
    source = tiny("test-qwen2", tokenizer)
    params = dict(source.variables["params"], embed_tokens={"embedding": jnp.zeros((320, 64), jnp.int8)})
    with pytest.raises(InputError, match="load without --quantize"):
        gguf_export.save_gguf(Loaded(source.model, {"params": params}, tokenizer, None, {}), tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


def test_export_to_a_bucket(gcs, tokenizer, tmp_path):
    """gs:// outputs go through the one path layer: written locally, uploaded as one object."""
    source = tiny("test-qwen2", tokenizer)
    url = gcs.url("export") + "/m.gguf"
    gguf_export.save_gguf(source, url, quant="q8_0")
    with pytest.raises(InputError, match="--overwrite"):
        gguf_export.save_gguf(source, url)
    back = load(url)
    assert back.metadata["path"] == url and back.metadata["quantization"]["Q8_0"] == 22


_KILLED = """
import os, signal, sys
import gguf, jax
sys.path.insert(0, {tests!r})
from test_gguf_export import tiny
from phi_jax import gguf_export
from phi_jax.tokenizer import train_bpe
real = gguf.GGUFWriter.write_tensors_to_file
def half_then_kill(self, *a, **k):
    self.fout[0].write(b"x" * 4096); self.fout[0].flush()
    os.kill(os.getpid(), signal.SIGKILL)
gguf.GGUFWriter.write_tensors_to_file = half_then_kill
gguf_export.save_gguf(tiny("test-qwen2", train_bpe(["a b c"] * 10, 270)), sys.argv[1])
"""


def test_a_killed_export_leaves_no_file_under_the_output_name(tmp_path):
    out = tmp_path / "m.gguf"
    proc = subprocess.run([sys.executable, "-c", _KILLED.format(tests=os.path.dirname(__file__)), str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".m.gguf.tmp-")]  # the torso only


def _cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "phi_jax.cli", "export", *args], capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def hf_dirs(tokenizer, tmp_path_factory):
    """Two HF checkpoints on disk: an exportable llama, and a phi with q/k LayerNorm (llama.cpp's
    phi2 has none)."""
    root = tmp_path_factory.mktemp("hf")
    for name in ("test-llama", "test-qk-norm"):
        loaded = tiny(name, tokenizer)
        hf.save_hf(root / name, loaded.model.config, loaded.variables)
        tokenizer.save(root / name)
    return root


def test_cli_exports_and_prints_a_summary(hf_dirs, tmp_path):
    out = tmp_path / "m.gguf"
    proc = _cli(f"--model={hf_dirs / 'test-llama'}", f"--output={out}", "--quant=q8_0")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "architecture llama" in proc.stdout and "Q8_0" in proc.stdout and out.is_file()
    assert gguf.GGUFReader(str(out)).fields["general.architecture"].contents() == "llama"


@pytest.mark.parametrize("case, args, pattern", [
    ("unknown quant", ["--quant=q3_k"], r"unknown GGUF quant 'q3_k'; use one of f32, f16"),
    ("existing output", ["--output={existing}"], r"already exists; .* pass --overwrite"),
    ("missing model", ["--model={tmp}/nope"], r"model path .*nope.* does not exist"),
    ("architecture", ["--model={hf}/test-qk-norm"], r"cannot be exported as llama.cpp 'phi2': qk_layernorm"),
])
def test_cli_bad_input_gets_one_line(case, args, pattern, hf_dirs, tmp_path):
    existing = tmp_path / "old.gguf"
    existing.write_bytes(b"old")
    values = {"existing": existing, "tmp": tmp_path, "hf": hf_dirs}
    argv = {"--model": f"--model={hf_dirs / 'test-llama'}", "--output": f"--output={tmp_path / 'new.gguf'}"}
    for a in args:
        argv[a.split("=")[0]] = a.format(**values)
    proc = _cli(*argv.values())
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert re.search(pattern, lines[0]), lines[0]
    assert existing.read_bytes() == b"old" and not (tmp_path / "new.gguf").exists()


# ------------------------------------------------------------------------------------- slow
@pytest.mark.slow
@pytest.mark.parametrize("name, quant", [("test-llama", "f32"), ("test-phi3", "f32"), ("test-llama", "q8_0")])
def test_transformers_loads_our_llama_and_phi3_files(name, quant, tokenizer, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    # transformers' GGUF loader ignores rope scaling tensors and partial rotary: default rope here
    source = tiny(name, tokenizer, rope_type="default", rope_factor=None, rope_original_max_len=None,
                  rope_short_factor=(), rope_long_factor=())
    gguf_export.save_gguf(source, tmp_path / "m.gguf", quant=quant)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, gguf_file="m.gguf", dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        theirs = model(torch.tensor(np.asarray(TOKENS))).logits.numpy()
    # f32: the source model itself; q8_0: phi_jax's reading of the same quantized file
    ours = _logits(source if quant == "f32" else load(tmp_path / "m.gguf"))
    np.testing.assert_allclose(theirs, ours, rtol=0, atol=1e-4)


@pytest.mark.slow
def test_a_sentencepiece_vocabulary_is_written_as_llama_cpp_reads_it(tmp_path):
    """Phi-3 / Llama 2 style: `tokenizer.ggml.model` = llama with scores and types; transformers'
    GGUF tokenizer rebuilt from our file gives the ids of the source sentencepiece model."""
    import io

    import sentencepiece as spm
    transformers = pytest.importorskip("transformers")
    from phi_jax.tokenizer import SentencePieceTokenizer

    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(["hello world the quick brown fox jumps over the lazy dog"] * 200
                               + ["def f(x): return x + 1"] * 200), model_writer=proto,
        vocab_size=300, model_type="bpe", byte_fallback=True, character_coverage=1.0,
        minloglevel=2)
    sp = SentencePieceTokenizer(proto.getvalue(), {})
    summary = gguf_export.save_gguf(tiny("test-phi3", sp), tmp_path / "m.gguf")
    assert summary.tokenizer == {"model": "llama", "pre": "default", "tokens": 320}
    md = {k: f.contents() for k, f in gguf.GGUFReader(str(tmp_path / "m.gguf")).fields.items()}
    assert md["tokenizer.ggml.tokens"][:4] == ["<unk>", "<s>", "</s>", "<0x00>"]
    assert md["tokenizer.ggml.token_type"][:4] == [2, 3, 3, 6]  # unknown, control, control, byte
    assert (md["tokenizer.ggml.bos_token_id"], md["tokenizer.ggml.eos_token_id"]) == (1, 2)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    for text in ("hello world", "the quick brown fox jumps", "def f(x): return x + 1 é"):
        assert theirs.encode(text, add_special_tokens=False) == sp.encode(text)


@pytest.fixture(scope="module")
def smollm2():
    from phi_jax.gguf import find_smollm2
    try:
        find_smollm2()
    except Exception as e:  # noqa: BLE001
        pytest.skip(str(e))
    return load("smollm2")


@pytest.mark.slow
@pytest.mark.parametrize("quant", ["q8_0", "q4_1"])
def test_smollm2_export_keeps_the_greedy_tokens(quant, smollm2, tmp_path):
    """q8_0: at least 95 % of 16 greedy tokens equal to the source's. q4_1: the installed file is
    Q4_1 already, so re-quantizing lands on the same grid: identical logits, a sharp check of the
    whole path (names, permutation, blocks). q4_0 (a second, symmetric 4-bit grid over the Q4_1
    values) is measured in benchmarks/export.py, not asserted: it loses most greedy tokens there."""
    from phi_jax.inference.decode import generate

    summary = gguf_export.save_gguf(smollm2, tmp_path / "s.gguf", quant=quant)
    assert summary.tokenizer["pre"] == "smollm" and summary.architecture == "llama"
    back = load(tmp_path / "s.gguf")
    prompt = [smollm2.tokenizer.encode("The capital of France is")]
    if quant == "q4_1":
        ids = jnp.asarray(prompt)
        np.testing.assert_array_equal(np.asarray(jax.jit(back.model.apply)(back.variables, ids)[0]),
                                      np.asarray(jax.jit(smollm2.model.apply)(smollm2.variables, ids)[0]))
        return
    ours = generate(smollm2.model, smollm2.variables, prompt, 16, temperature=0.0)[0]
    theirs = generate(back.model, back.variables, prompt, 16, temperature=0.0)[0]
    same = np.mean(np.asarray(ours[:16]) == np.asarray(theirs[:16]))
    assert same >= 0.95, (same, ours, theirs)
