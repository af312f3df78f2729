"""Reading GGUF files (llama.cpp's format) through the `gguf` package, with errors that name the file.

Two layers use it and neither may import the other: `phi_jax.tokenizer` (a tokenizer rebuilt
from a file's `tokenizer.ggml.*` metadata) and `phi_jax.gguf` (weights and config). So the file
handling both need lives here: opening (a missing, truncated or foreign file is one clear error),
metadata as plain Python values, and tensors dequantized to float32 numpy by the `gguf`
package's own dequantizers.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from phi_jax.errors import InputError, MissingFileError

# The tensor types phi_jax loads: what llama.cpp's common quantizations produce and the `gguf`
# package dequantizes with numpy (IQ*, TQ* and the FP4 formats are refused by name).
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K",
                   "Q4_K", "Q5_K", "Q6_K")


def open_gguf(path: str | os.PathLike):
    """A `gguf.GGUFReader` over `path` (memory-mapped; nothing is dequantized yet)."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"GGUF file {path} does not exist; pass the path of a .gguf file")
    import gguf  # a dependency of phi_jax, imported here to keep `import phi_jax` cheap

    try:
        return _reader_class(gguf)(str(path))
    except Exception as e:  # the reader fails in numpy on a short or foreign file
        raise InputError(f"{path} is not a complete GGUF file ({type(e).__name__}: {e}); it is "
                         "truncated or not GGUF at all: download or copy it again") from None


def _reader_class(gguf):
    """`gguf.GGUFReader`, reading its header through a plain ndarray view of the memory map.

    Why: the reader parses every metadata value (SmolLM2's 49k-token vocabulary and 49k merges are
    ~250k reads) by slicing its `np.memmap`, and each memmap slice pays the subclass's
    `__getitem__`/`__array_finalize__`: 4 s of a 12 s model load. Slicing a plain view of the same
    bytes gives identical arrays 4x faster (tests/test_gguf.py compares every field with the stock
    reader's). Should a future `gguf` rename its `_get`, the stock method is used unchanged.
    """
    base = gguf.GGUFReader
    if getattr(base, "_get", None) is None:
        return base

    class Reader(base):
        def _get(self, offset, dtype, count=1, override_order=None):
            plain = self.__dict__.get("_plain")
            if plain is None:
                plain = self.__dict__["_plain"] = np.asarray(self.data)
            count = int(count)
            arr = plain[offset:offset + np.dtype(dtype).itemsize * count].view(dtype=dtype)[:count]
            return arr.view(arr.dtype.newbyteorder(self.byte_order if override_order is None else override_order))

    return Reader


def metadata(reader, prefix: str = "") -> dict[str, Any]:
    """The key/value metadata (keys starting with `prefix`) as str, int, float, bool or lists."""
    return {key: field.contents() for key, field in reader.fields.items()
            if key.startswith(prefix) and not key.startswith("GGUF.")}


def read_metadata(path: str | os.PathLike, prefix: str = "") -> dict[str, Any]:
    """`metadata` of the file at `path`."""
    return metadata(open_gguf(path), prefix)


def tensor_type(tensor) -> str:
    return tensor.tensor_type.name


def check_types(reader, path: str | os.PathLike) -> None:
    """Refuse, before any work, a file holding a tensor type phi_jax does not load."""
    bad = sorted({(tensor_type(t), t.name) for t in reader.tensors if tensor_type(t) not in SUPPORTED_TYPES})
    if bad:
        kinds = sorted({kind for kind, _ in bad})
        raise InputError(f"{path} holds tensors of quantization type(s) {kinds} (e.g. {bad[0][1]}), "
                         f"which phi_jax does not load; supported: {', '.join(SUPPORTED_TYPES)}. "
                         "Re-quantize with llama.cpp's llama-quantize (e.g. to Q8_0 or Q4_K_M)")


def dequantize(tensor) -> np.ndarray:
    """A tensor as float32 numpy in numpy axis order (GGUF's `ne` reversed: [out, in] for matrices)."""
    import gguf

    values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    shape = tuple(int(n) for n in reversed(tensor.shape.tolist()))
    return np.asarray(values, dtype=np.float32).reshape(shape)
