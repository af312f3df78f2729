"""Inference: the one place a model is turned into text.

    loader.py    any model source (HF dir, workdir, .gguf) -> model, variables, tokenizer, template
    decode.py    THE decoder: slot prefill, chunked on-device decode, per-row sampling keys;
                 `generate` and the serving engine both run on it
    sampling.py  greedy / temperature / top-k / top-p, exact and sort-free
    scoring.py   log-likelihoods of continuations (evals, the server's echo + logprobs)
"""

import importlib

_LAZY = {
    "Loaded": "phi_jax.inference.loader",
    "load": "phi_jax.inference.loader",
    "load_tokenizer": "phi_jax.inference.loader",
    "generate": "phi_jax.inference.decode",
    "SamplingParams": "phi_jax.inference.sampling",
}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'phi_jax.inference' has no attribute {name!r}")


__all__ = sorted(_LAZY)
