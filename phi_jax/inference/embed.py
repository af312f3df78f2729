"""Text embeddings from any model `load` accepts: mean-pooled final hidden states, batched and jitted.

Letters: B batch rows, T padded length (a power-of-two bucket), D model dim.

    embedder = Embedder(model, variables, tokenizer, max_tokens=512, batch_size=16)
    vectors = embedder(texts)            # float32 [len(texts), D]; embedder.tokens counts tokens seen

Texts are tokenized, cut to their first `max_tokens` tokens, sorted by length (so a batch pads
little) and padded to a power-of-two bucket with a fixed batch size, so the jitted forward compiles
once per bucket, never per batch. Padding has segment id 0 and is left out of the mean. The order of
the result is the order of `texts`. phi-1's quality classifier worked the same way: a code model's
embeddings (mean over the output) fed to a small classifier.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from phi_jax.errors import InputError
from phi_jax.inference.decode import prompt_bucket


@functools.partial(jax.jit, static_argnums=0)
def _pooled(model, variables, tokens: jax.Array, segment_ids: jax.Array) -> jax.Array:
    """Mean over the real tokens of each row of the final-normed hidden states: [B,T] -> [B,D]."""
    hidden, _ = model.apply(variables, tokens, segment_ids=segment_ids, return_hidden=True)  # [B,T,D]
    mask = (segment_ids != 0).astype(jnp.float32)[..., None]  # [B,T,1]
    total = jnp.sum(hidden.astype(jnp.float32) * mask, axis=1)  # [B,D]
    return total / jnp.maximum(jnp.sum(mask, axis=1), 1.0)


class Embedder:
    """A model turned into `texts -> [N, D] float32` (see the module docstring).

    Args:
      model, variables, tokenizer: what `phi_jax.inference.load` returns.
      max_tokens: tokens per text (the rest is ignored); at most the model's max_len.
      batch_size: rows per device call.
      add_bos: start every text with BOS (models trained with it, e.g. Llama-family GGUFs).
    """

    def __init__(self, model, variables, tokenizer, *, max_tokens: int = 512, batch_size: int = 16,
                 add_bos: bool = False):
        if max_tokens < 1 or batch_size < 1:
            raise InputError(f"embedding max_tokens={max_tokens} and batch_size={batch_size} must be >= 1")
        self.model, self.variables, self.tokenizer = model, variables, tokenizer
        self.max_tokens = min(max_tokens, model.config.max_len)
        self.batch_size, self.add_bos = batch_size, add_bos
        self.tokens = 0
        self.dim = model.config.d_model

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), np.float32)
        if not texts:
            return out
        ids = [x[:self.max_tokens] or [self._filler()]
               for x in self.tokenizer.encode_batch(list(texts), add_bos=self.add_bos)]
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        for start in range(0, len(order), self.batch_size):
            rows = order[start:start + self.batch_size]
            width = min(prompt_bucket(max(len(ids[i]) for i in rows)), self.max_tokens)
            tokens = np.zeros((self.batch_size, width), np.int32)  # [B,T]
            segments = np.zeros((self.batch_size, width), np.int32)
            for r, i in enumerate(rows):
                tokens[r, :len(ids[i])] = ids[i]
                segments[r, :len(ids[i])] = 1
                self.tokens += len(ids[i])
            pooled = _pooled(self.model, self.variables, jnp.asarray(tokens), jnp.asarray(segments))
            out[rows] = np.asarray(pooled)[:len(rows)]
        return out

    def _filler(self) -> int:
        """An empty text still needs one token; EOS (or BOS, or 0) stands for "nothing"."""
        for candidate in (self.tokenizer.eos_id, self.tokenizer.bos_id):
            if candidate is not None:
                return candidate
        return 0
