"""Attention through cuDNN's fused kernel (`jax.nn.dot_product_attention`), GPU only.

Letters: B batch, T query length, S key length, N query heads, K kv heads, H head dim.

`jax.nn.dot_product_attention` takes no segment ids, so packed documents become a boolean
[B,1,T,S] mask (which cuDNN applies as a bias: it costs a [B,T,S] read that the Pallas kernel
avoids). Padding query rows are zeroed afterwards to match `reference_attention`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def segment_mask(segment_ids: jax.Array) -> jax.Array:
    """[B,1,T,T]: same non-zero segment."""
    seg = segment_ids
    return ((seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] != 0))[:, None]


def cudnn_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                    segment_ids: jax.Array | None = None, causal: bool = True,
                    implementation: str = "cudnn") -> jax.Array:
    """Self-attention with the semantics of `reference_attention`.

    Args:
      q: [B,T,N,H]; k, v: [B,T,K,H] (bfloat16 or float16 for cuDNN).
      segment_ids: [B,T] int32, 0 = padding; None = one document per row.
      implementation: "cudnn"; "xla" runs the same masking through XLA (used by the CPU tests).
    Returns:
      [B,T,N,H], padding rows 0.
    """
    if implementation == "cudnn" and q.dtype not in (jnp.bfloat16, jnp.float16):
        raise ValueError(f"cuDNN attention needs bfloat16 or float16 inputs, got {q.dtype}; "
                         "set ModelConfig.dtype='bfloat16' or use attention_impl='pallas'/'xla'")
    mask = None if segment_ids is None else segment_mask(segment_ids)
    out = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal,
                                       implementation=implementation)
    if segment_ids is not None:
        out = jnp.where((segment_ids != 0)[:, :, None, None], out, 0).astype(out.dtype)
    return out


def cudnn_cached_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, *,
                           q_start: jax.Array, implementation: str = "cudnn") -> jax.Array:
    """`reference_cached_attention` through cuDNN: query t of row b sees slots <= q_start[b] + t.

    Args:
      q: [B,T,N,H]; k_cache, v_cache: [B,K,S,H] (the model's cache layout); q_start: [B] int32.
    Returns:
      [B,T,N,H].
    """
    t, s = q.shape[1], k_cache.shape[2]
    q_slot = q_start[:, None] + jnp.arange(t)[None, :]  # [B,T]
    mask = (jnp.arange(s)[None, None, :] <= q_slot[:, :, None])[:, None]  # [B,1,T,S]
    # dot_product_attention takes keys as [B,S,K,H].
    k, v = jnp.swapaxes(k_cache, 1, 2), jnp.swapaxes(v_cache, 1, 2)
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=implementation)
