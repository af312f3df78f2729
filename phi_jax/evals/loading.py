"""Load a model for evaluation from an HF directory or a phi_jax training workdir."""

from __future__ import annotations

import os
from typing import Any


def load_model(*, hf: str | os.PathLike | None = None, checkpoint: str | os.PathLike | None = None,
               dtype: Any = None, step: int | None = None):
    """(Phi module, variables) from exactly one of `hf` (HF safetensors dir) or `checkpoint`,
    in the layout that decodes fastest here (`phi_jax.model.inference_layout`).

    `checkpoint` reads a training workdir through
    `phi_jax.train.checkpoint.load_params_for_inference` (params only, no optimizer state).
    """
    import jax.numpy as jnp

    if (hf is None) == (checkpoint is None):
        raise ValueError("pass exactly one of --hf=DIR (an HF Phi checkpoint) or "
                         "--checkpoint=DIR (a phi_jax training workdir)")
    from phi_jax.model import Phi, decode_prefers_unstacked, inference_layout

    if hf is not None:
        import phi_jax

        return phi_jax.from_pretrained(hf, dtype=jnp.float32 if dtype is None else dtype,
                                       scan_layers=not decode_prefers_unstacked())
    from phi_jax.train.checkpoint import load_params_for_inference

    config, variables, _ = load_params_for_inference(checkpoint, step=step, dtype=dtype)
    return inference_layout(Phi(config), variables)


def load_tokenizer(path: str | os.PathLike):
    """A `phi_jax.tokenizer.Tokenizer` from a directory or file (tokenizer.json / .model)."""
    from phi_jax.tokenizer import Tokenizer

    return Tokenizer.from_pretrained(path)
