"""GGUF out: a loaded phi_jax model written as the single file llama.cpp, Ollama and LM Studio run.

    loaded = phi_jax.inference.loader.load("runs/tiny")             # or an HF dir, a .gguf
    summary = save_gguf(loaded, "tiny-q8_0.gguf", quant="q8_0")   # -> ExportSummary
    print("\\n".join(summary.lines()))

Why a writer of our own: none of the JAX training libraries writes GGUF, and llama.cpp's converter
needs the HF directory and torch. The file is what that converter (convert_hf_to_gguf.py, then
llama-quantize for q4_*) writes for the same model: the architecture's llama.cpp name (phi2,
phi3, llama for Llama/SmolLM2/Mistral, qwen2), its tensor names (from the `gguf` package's own
`TensorNameMap`, the table the converter uses), its `<arch>.*` keys, the tokenizer
(`phi_jax.gguf_vocab`), and for 'llama' files the q/k projection rows permuted for llama.cpp's
interleaved rotation. Everything goes through the `gguf` package: `GGUFWriter` and
`gguf.quants.quantize`; nothing is packed by hand.

Quantization, per tensor (`quant`): f32 | f16 | bf16 | q8_0 | q4_0 | q4_1 for the matrices;
1-D tensors (norms, biases, rope factors) stay F32, as in every llama.cpp file. Fallbacks, each
listed in the summary: a matrix whose rows are not a multiple of the block (32 values) is stored
F16, as the converter does; under q4_0/q4_1 the output projection (or the tied token embedding)
is stored Q8_0: llama-quantize gives it Q6_K, which the `gguf` package cannot write, and Q8_0 is
llama-quantize's own fallback for it.

A LoRA adapter is merged first (`phi_jax.lora.merge`); stacked (scanned) and unstacked layers
both export (`phi_jax.hf.params_to_hf` reads either). The file is written to a temporary sibling
and renamed into place (`fileio.staged_file`): a killed export leaves nothing under the output's
name, and an existing output is replaced only with `overwrite=True`.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from phi_jax import fileio, gguf_file, gguf_vocab, hf, lora
from phi_jax.config import ModelConfig
from phi_jax.errors import InputError
from phi_jax.hf_config import FAMILY_SWITCHES
from phi_jax.model import rope_scaling

QUANTS = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1")
# phi_jax model_type -> llama.cpp architecture (Mistral is stored as llama, as the converter does)
ARCHITECTURES = {"phi": "phi2", "llama": "llama", "mistral": "llama", "qwen2": "qwen2", "phi3": "phi3"}
# the model_type the GGUF reader builds for each architecture (whose switches the config must have)
_READ_AS = {"phi2": "phi", "llama": "llama", "qwen2": "qwen2", "phi3": "phi3"}
_TYPE_NAMES = {"f32": "F32", "f16": "F16", "bf16": "BF16", "q8_0": "Q8_0", "q4_0": "Q4_0", "q4_1": "Q4_1"}
_FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0",
               "q4_0": "MOSTLY_Q4_0", "q4_1": "MOSTLY_Q4_1"}


@dataclasses.dataclass
class ExportSummary:
    """What `save_gguf` wrote.

    Attributes:
      types: GGUF tensor type -> count. fallbacks: one dict per tensor not stored in the asked
      type (name, wanted, stored, why). notes: what differs from the phi_jax model (a dropped
      sliding window, an unnamed pre-tokenizer, no tokenizer). tokenizer: None or {"model",
      "pre", "tokens"}.
    """

    path: str
    architecture: str
    quant: str
    file_size: int
    seconds: float
    parameters: int
    tensors: int
    types: dict[str, int]
    fallbacks: list[dict[str, str]]
    notes: list[str]
    tokenizer: dict[str, Any] | None

    def lines(self) -> list[str]:
        """A one-screen report (what the CLI prints)."""
        types = ", ".join(f"{n} {k}" for k, n in self.types.items())
        tok = ("none" if self.tokenizer is None else
               f"{self.tokenizer['model']} (pre {self.tokenizer['pre']}), {self.tokenizer['tokens']} tokens")
        out = [f"wrote {self.path}: {self.file_size / 2**20:.1f} MiB in {self.seconds:.1f} s",
               f"  architecture {self.architecture}, {self.parameters / 1e6:.1f}M parameters, "
               f"quant {self.quant}",
               f"  {self.tensors} tensors: {types}", f"  tokenizer: {tok}"]
        by_reason = collections.defaultdict(list)
        for f in self.fallbacks:
            by_reason[(f["stored"], f["why"])].append(f["name"])
        for (stored, why), names in by_reason.items():
            shown = ", ".join(names[:3]) + (f" (+{len(names) - 3} more)" if len(names) > 3 else "")
            out.append(f"  fallback to {stored}: {shown}: {why}")
        out += [f"  note: {n}" for n in self.notes]
        return out


def check_quant(quant: str) -> str:
    """The quant name, or a one-line error listing the ones that exist."""
    if quant not in QUANTS:
        raise InputError(f"unknown GGUF quant {quant!r}; use one of {', '.join(QUANTS)} (--quant=...)")
    return quant


def check_output(path: str | os.PathLike, *, overwrite: bool) -> None:
    """Refuse an existing output unless `overwrite`, before any model is loaded or written."""
    fileio.check_bucket(path)
    p = fileio.as_path(path)
    if p.exists() and not overwrite:
        raise InputError(f"{os.fspath(path)} already exists; choose a new output path, or pass "
                         "--overwrite to replace it (only once the new file is complete)")


def architecture(config: ModelConfig) -> str:
    """The llama.cpp architecture `config` exports as, or a one-line error naming what does not fit.

    A config exports when its switches are those of the family llama.cpp (and phi_jax's GGUF
    reader) build for that architecture: anything else would load as a different model.
    """
    arch = ARCHITECTURES.get(config.model_type)
    if arch is None:
        raise InputError(f"model_type {config.model_type!r} has no llama.cpp architecture phi_jax "
                         f"exports; exportable: {sorted(ARCHITECTURES)}")
    expected = dict(FAMILY_SWITCHES[_READ_AS[arch]], qk_layernorm=False)
    if arch == "llama":  # llama.cpp's llama takes q/k/v/o biases together (InternLM-style)
        expected.update(qkv_bias=config.qkv_bias, out_bias=config.qkv_bias)
    if arch == "phi2":
        expected["tie_embeddings"] = False
    bad = {f: getattr(config, f) for f, want in expected.items() if getattr(config, f) != want}
    if bad:
        raise InputError(f"this {config.model_type} model cannot be exported as llama.cpp {arch!r}: "
                         f"{', '.join(f'{k}={v!r}' for k, v in bad.items())} (llama.cpp's {arch} has "
                         f"{', '.join(f'{k}={expected[k]!r}' for k in bad)})")
    return arch


# ------------------------------------------------------------------------------- metadata
def _rope_metadata(config: ModelConfig, arch: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(keys, extra F32 tensors) for the rotary scaling, as the converter writes it."""
    keys: dict[str, Any] = {}
    tensors: dict[str, np.ndarray] = {}
    kind = config.rope_type
    if arch == "phi3":
        keys["rope.scaling.original_context_length"] = config.rope_original_max_len or config.max_len
    if kind == "linear":
        keys.update({"rope.scaling.type": "linear", "rope.scaling.factor": float(config.rope_factor)})
    elif kind == "llama3" and arch == "llama":  # llama.cpp: per-frequency divisors in rope_freqs
        from phi_jax.kernels.rope import inverse_frequencies

        plain = np.asarray(inverse_frequencies(config.rotary_dim, config.rope_theta))
        scaled = np.asarray(inverse_frequencies(config.rotary_dim, config.rope_theta, rope_scaling(config)))
        tensors["rope_freqs.weight"] = (plain / scaled).astype(np.float32)
    elif kind == "longrope" and arch == "phi3":
        s = rope_scaling(config)
        keys["rope.scaling.attn_factor"] = float(s.attention_factor)
        tensors["rope_factors_long.weight"] = np.asarray(config.rope_long_factor, np.float32)
        tensors["rope_factors_short.weight"] = np.asarray(config.rope_short_factor, np.float32)
    elif (kind == "longrope" and arch == "llama" and config.rope_short_factor == config.rope_long_factor
          and config.rope_factor == 1.0 and config.rope_attention_factor in (None, 1.0)):
        # a Llama 3 GGUF read back: its divisors became a longrope with equal factors
        tensors["rope_freqs.weight"] = np.asarray(config.rope_short_factor, np.float32)
    elif kind != "default":
        raise InputError(f"rope_type {kind!r} has no representation in llama.cpp's {arch!r} files; "
                         "export a model with default, linear rope (or llama3 for llama, longrope for phi3)")
    return keys, tensors


def _arch_metadata(config: ModelConfig, arch: str) -> tuple[dict[str, Any], list[str]]:
    c = config
    keys: dict[str, Any] = {
        "vocab_size": c.vocab_size, "context_length": c.max_len, "embedding_length": c.d_model,
        "feed_forward_length": c.mlp_dim, "block_count": c.n_layers, "attention.head_count": c.n_heads,
        "attention.head_count_kv": c.num_kv_heads, "rope.freq_base": float(c.rope_theta),
        "rope.dimension_count": c.rotary_dim,
    }
    eps = "attention.layer_norm_epsilon" if arch == "phi2" else "attention.layer_norm_rms_epsilon"
    keys[eps] = float(c.layer_norm_eps)
    if c.head_dim is not None and c.head_dim != c.d_model // c.n_heads:
        keys["attention.key_length"] = keys["attention.value_length"] = c.dim_per_head
    notes = []
    if c.sliding_window is not None:
        if arch == "phi3":
            keys["attention.sliding_window"] = c.sliding_window
        else:
            notes.append(f"sliding window {c.sliding_window} dropped: llama.cpp's {arch} attends to the "
                         f"whole context (same logits for contexts up to {c.sliding_window} tokens)")
    return keys, notes


def _add_key(writer, key: str, value: Any) -> None:
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    else:
        writer.add_string(key, value)


def _source_pre(loaded) -> str | None:
    """A GGUF source's own `tokenizer.ggml.pre` (the name its converter chose), if it has one."""
    meta = loaded.metadata or {}
    if meta.get("source") != "gguf" or "path" not in meta:
        return None
    try:
        return gguf_file.read_metadata(fileio.local_copy(meta["path"]), "tokenizer.ggml.pre").get(
            "tokenizer.ggml.pre")
    except Exception:  # noqa: BLE001 - the source moved or is unreadable: derive the name instead
        return None


# -------------------------------------------------------------------------------- tensors
def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's q/k row order for 'llama' files: per head, HF's two halves interleaved."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_names(config: ModelConfig, arch: str, hf_names) -> dict[str, str]:
    import gguf

    table = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], config.n_layers)
    names, unknown = {}, []
    for hf_name in hf_names:
        name = table.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            unknown.append(hf_name)
        else:
            names[hf_name] = name
    if unknown:
        raise InputError(f"tensors {unknown[:4]} have no name in llama.cpp's {arch!r} architecture; "
                         "this model cannot be exported to GGUF")
    return names


def _stored_type(name: str, shape: tuple[int, ...], quant: str, tied: bool) -> tuple[str, str | None]:
    """(GGUF type name, why it differs from the asked one, or None)."""
    import gguf

    if len(shape) == 1:
        return "F32", None
    wanted = _TYPE_NAMES[quant]
    kind, why = wanted, None
    if quant in ("q4_0", "q4_1") and (name == "output.weight" or (tied and name == "token_embd.weight")):
        kind, why = "Q8_0", ("the output projection: llama-quantize stores it Q6_K, which the gguf "
                             "package cannot write; Q8_0 is llama-quantize's fallback for it")
    block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[kind]][0]
    if shape[-1] % block:
        kind, why = "F16", f"rows of {shape[-1]} values are not a multiple of the {block}-value block"
    return kind, why if kind != wanted else None


def _add_tensors(writer, config: ModelConfig, arch: str, tensors: dict[str, np.ndarray], quant: str
                 ) -> tuple[collections.Counter, list[dict[str, str]]]:
    import gguf

    names = _gguf_names(config, arch, tensors)
    types: collections.Counter = collections.Counter()
    fallbacks = []
    for hf_name, value in tensors.items():
        name = names[hf_name]
        if arch == "llama" and ".attn_q." in name:
            value = _permute(value, config.n_heads)
        elif arch == "llama" and ".attn_k." in name:
            value = _permute(value, config.num_kv_heads)
        kind, why = _stored_type(name, value.shape, quant, config.tie_embeddings)
        if why is not None:
            fallbacks.append({"name": name, "wanted": _TYPE_NAMES[quant], "stored": kind, "why": why})
        qtype = gguf.GGMLQuantizationType[kind]
        writer.add_tensor(name, gguf.quants.quantize(np.ascontiguousarray(value, np.float32), qtype),
                          raw_dtype=qtype)
        types[kind] += 1
    return types, fallbacks


# ------------------------------------------------------------------------------ public API
def save_gguf(loaded, path: str | os.PathLike, *, quant: str = "f32", overwrite: bool = False) -> ExportSummary:
    """Write `loaded` (a `phi_jax.inference.loader.Loaded`) as a GGUF file at `path`.

    Args:
      loaded: model, variables (stacked or unstacked layers, LoRA merged here if present),
        tokenizer (None writes no vocabulary: llama.cpp then cannot run the file), metadata.
      path: the .gguf to write, local or gs://...; written whole or not at all.
      quant: f32 | f16 | bf16 | q8_0 | q4_0 | q4_1 (see the module docstring for fallbacks).
      overwrite: replace an existing file (once the new one is complete).
    Returns:
      ExportSummary (`.lines()` prints it).
    Raises:
      InputError: unknown quant, a model llama.cpp's architectures cannot hold, an existing
        output without overwrite, a tokenizer that cannot be written.
    """
    import gguf

    start = time.perf_counter()
    quant = check_quant(quant)
    if any(jnp.issubdtype(x.dtype, jnp.integer) for x in jax.tree.leaves(loaded.variables)):
        raise InputError("the model holds integer (quantized) weights; export from a float load "
                         "(load without --quantize) and choose the file's quantization with --quant")
    config, variables = lora.merge(loaded.model.config, loaded.variables)
    arch = architecture(config)
    keys, notes = _arch_metadata(config, arch)
    rope_keys, rope_tensors = _rope_metadata(config, arch)
    keys.update(rope_keys)
    check_output(path, overwrite=overwrite)
    tensors = hf.params_to_hf(variables, config, "float32")
    meta = loaded.metadata or {}
    name = meta.get("name") or Path(str(meta.get("path", "phi_jax model"))).stem
    with fileio.staged_file(path, overwrite=overwrite) as tmp:
        writer = gguf.GGUFWriter(str(tmp), arch)
        writer.add_name(str(name))
        writer.add_file_type(int(gguf.LlamaFileType[_FILE_TYPES[quant]]))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for key, value in keys.items():
            _add_key(writer, f"{arch}.{key}", value)
        tokenizer = None
        if loaded.tokenizer is not None:
            info = gguf_vocab.add_tokenizer(writer, loaded.tokenizer, n_vocab=config.vocab_size,
                                            pre=_source_pre(loaded), add_bos=False if arch == "phi2" else None)
            notes += info.pop("notes")
            tokenizer = info
        else:
            notes.append("no tokenizer: llama.cpp cannot run a file without one (load with tokenizer=DIR)")
        types, fallbacks = _add_tensors(writer, config, arch, tensors, quant)
        for tensor_name, value in rope_tensors.items():
            writer.add_tensor(tensor_name, value, raw_dtype=gguf.GGMLQuantizationType.F32)
            types["F32"] += 1
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return ExportSummary(path=os.fspath(path), architecture=arch, quant=quant, file_size=fileio.size(path),
                         seconds=time.perf_counter() - start, parameters=config.param_count(),
                         tensors=sum(types.values()), types=dict(types.most_common()),
                         fallbacks=fallbacks, notes=notes, tokenizer=tokenizer)
