"""Tiny GGUF files for tests, written with the `gguf` package's own writer and quantizers.

`write_gguf` stores each tensor in the type asked for: F32/F16 as such, BF16 and the legacy
block types through `gguf.quants.quantize`, and the K-quants (which the package only
dequantizes) as random blocks whose scales are set small, so every type decodes to modest values.
A reference that reads the same file (transformers' GGUF loader) then sees the same weights.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

from phi_jax.tokenizer import _byte_alphabet

_K_SCALES = {"Q2_K": ((80, 1e-3), (82, 1e-3)), "Q3_K": ((108, 5e-4),),
             "Q4_K": ((0, 1e-4), (2, 1e-4)), "Q5_K": ((0, 5e-5), (2, 5e-5)), "Q6_K": ((208, 1e-5),)}


def _encode(value: np.ndarray, kind: str, rng: np.random.Generator):
    """(array to write, raw dtype or None) for `value` stored as `kind`."""
    if kind == "F32":
        return value.astype(np.float32), None
    if kind == "F16":
        return value.astype(np.float16), None
    qtype = gguf.GGMLQuantizationType[kind]
    if kind in _K_SCALES:
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        rows, cols = value.shape
        blocks = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
        for offset, scale in _K_SCALES[kind]:
            blocks[..., offset:offset + 2] = np.full(blocks.shape[:2], scale, np.float16).view(
                np.uint8).reshape(blocks.shape[:2] + (2,))
        return blocks.reshape(rows, -1), qtype
    if kind in ("IQ4_NL",):  # types phi_jax refuses: any bytes of the right size
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        return rng.integers(0, 256, (value.shape[0], value.shape[1] // block * size), dtype=np.uint8), qtype
    return gguf.quants.quantize(value.astype(np.float32), qtype), qtype


def byte_level_vocab(size: int, extra_merges: tuple[str, ...] = ()) -> tuple[list[str], list[str]]:
    """A byte-level BPE vocabulary of `size` tokens: the byte symbols (less a few) and merges."""
    alphabet = list(_byte_alphabet().values())
    merges = ["Ġ t", "h e", "Ġt he", *extra_merges]
    merged = [m.replace(" ", "") for m in merges]
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + alphabet[:size - 3 - len(merged)] + merged
    return tokens, merges


def write_gguf(path: Path, arch: str, metadata: dict, tensors: dict[str, tuple[np.ndarray, str]], *,
               vocab_size: int | None = None, seed: int = 0, pre: str = "default",
               extra_merges: tuple[str, ...] = ()) -> Path:
    """Write a GGUF of architecture `arch`: `metadata` keys (typed by their Python values),
    `tensors` name -> (float32 numpy value [out, in], type name), and a byte-level tokenizer of
    `vocab_size` tokens (None: no tokenizer metadata at all)."""
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_string("general.name", f"tiny {arch}")
    items = dict(metadata)
    if vocab_size is not None:
        tokens, merges = byte_level_vocab(vocab_size, extra_merges)
        items.update({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre,
                      "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.merges": merges,
                      "tokenizer.ggml.token_type": [3, 3, 3] + [1] * (len(tokens) - 3),
                      "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
                      "tokenizer.chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}"})
    for key, value in items.items():
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        else:
            if value and isinstance(value[0], int):
                writer.add_array(key, [int(v) for v in value])
            else:
                writer.add_array(key, list(value))
    for name, (value, kind) in tensors.items():
        data, raw = _encode(np.asarray(value, np.float32), kind, rng)
        writer.add_tensor(name, data, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def llama_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter (convert_hf_to_gguf.py LlamaModel.permute): HF's half-split q/k rows
    reordered for its interleaved rotation."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
