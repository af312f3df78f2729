"""Inference: the one place a model is turned into text.

    loader.py    any model source (HF dir, workdir, .gguf) -> model, variables, tokenizer, template
    decode.py    THE decoder: slot prefill, chunked on-device decode, per-row sampling keys;
                 `generate` and the serving engine both run on it
    sampling.py  greedy / temperature / top-k / top-p, exact and sort-free
    scoring.py   log-likelihoods of continuations (evals, the server's echo + logprobs)
"""

from phi_jax import _lazy

_LAZY = {
    "Loaded": "phi_jax.inference.loader",
    "load": "phi_jax.inference.loader",
    "load_tokenizer": "phi_jax.inference.loader",
    "generate": "phi_jax.inference.decode",
    "SamplingParams": "phi_jax.inference.sampling",
}

__getattr__ = _lazy.exports(globals(), _LAZY)


__all__ = sorted(_LAZY)
