"""The language-model loss: masked next-token cross-entropy, optionally chunked over the sequence.

Letters: B batch rows, T sequence length, C tokens per chunk (along T), D model dim, V vocab.

Computed whole, the loss materialises float32 logits [B,T,V] and, for the backward pass, their
softmax: at a 51k vocabulary and 8x2048 tokens that is ~6.7 GB, most of a step's activation memory.
With `chunk` > 0 the LM head and cross-entropy run over chunks of C positions under
`jax.checkpoint`, so only one chunk's logits exist at a time and the backward pass recomputes them
(one extra head matmul, ~1/3 of the head's cost). The value is the same sum in another order
(float32 rounding differs at ~1e-7 relative); `chunk=0` keeps the whole-sequence computation.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from phi_jax.model import Phi, lm_head_logits


def _token_losses(logits: jax.Array, targets: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets)


def loss_sums(params, batch: dict, model: Phi, rng: jax.Array | None, deterministic: bool,
              chunk: int = 0):
    """(sum of masked token cross-entropies, number of target tokens) for one (micro-)batch."""
    rngs = None if deterministic else {"dropout": rng}
    weights = batch["loss_mask"].astype(jnp.float32)  # [B,T]
    t = batch["tokens"].shape[1]
    if chunk <= 0 or chunk >= t:
        logits, _ = model.apply({"params": params}, batch["tokens"], positions=batch["positions"],
                                segment_ids=batch["segment_ids"], deterministic=deterministic, rngs=rngs)
        return jnp.sum(_token_losses(logits, batch["targets"]) * weights), jnp.sum(weights)
    hidden, _ = model.apply({"params": params}, batch["tokens"], positions=batch["positions"],
                            segment_ids=batch["segment_ids"], deterministic=deterministic, rngs=rngs,
                            return_hidden=True)  # [B,T,D]
    pad = -t % chunk
    if pad:  # padded positions have weight 0
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(batch["targets"], ((0, 0), (0, pad)))
    masks = jnp.pad(weights, ((0, 0), (0, pad)))
    n = (t + pad) // chunk
    # [B, n*C, ...] -> [n, B, C, ...]: chunks along T, so a batch-sharded layout stays sharded.
    split = lambda x: jnp.moveaxis(x.reshape(x.shape[0], n, chunk, *x.shape[2:]), 1, 0)

    @jax.checkpoint
    def chunk_loss(h, y, w):  # [B,C,D], [B,C], [B,C]
        return jnp.sum(_token_losses(lm_head_logits(model.config, params, h), y) * w)

    def body(total, xs):
        return total + chunk_loss(*xs), None

    total, _ = jax.lax.scan(body, jnp.float32(0.0), (split(hidden), split(targets), split(masks)))
    return total, jnp.sum(weights)
