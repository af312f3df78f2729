"""Attention: the pure-jnp reference and the dispatch to fused kernels.

Letters: B batch, T query length, S key length, N query heads, K kv heads, G = N // K query heads
per kv head, H head dim.

Two entry points, because training and decoding mask differently:
  * `attention`: self-attention over a (packed) sequence; causal by index, never across
    `segment_ids` (0 = padding).
  * `cached_attention`: T new queries per sequence against a preallocated KV cache, laid out
    [B,K,S,H] (each kv head's slots contiguous, so a decode step's dots read the cache in place
    with no transpose); the query t of sequence b sits at cache slot `q_start[b] + t` and sees the
    slots at or before its own.
Scores and softmax are computed in float32 whatever the input dtype; the result has q's dtype.
A query that may see no key at all (padding, segment id 0) gets output 0 and no gradient, in
every implementation.

Implementations (`impl`); `backend.SUPPORTED` lists where each runs:
  * "xla": the pure-jnp references below, on any backend.
  * "pallas": fused Pallas kernels. TPU: Mosaic TPU (`flash_attention.py`, `decode_attention.py`).
    GPU: Mosaic GPU (`flash_attention_gpu.py`, Hopper, bf16/fp16) for `attention`; there is no GPU
    decode kernel, so `cached_attention` runs the XLA reference there (and warns once). CPU: the
    TPU kernels in interpret mode (`interpret=None` means interpret iff the backend is cpu).
  * "cudnn": `jax.nn.dot_product_attention(implementation="cudnn")` with a segment mask; GPU only.
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp

from phi_jax.kernels import backend
from phi_jax.kernels.cudnn_attention import cudnn_attention, cudnn_cached_attention
from phi_jax.kernels.quantized import kv_scores, kv_weighted_values



def _split_heads(q: jax.Array, num_kv_heads: int) -> jax.Array:
    """[B,T,N,H] -> [B,T,K,G,H] so that GQA needs no repeat of k and v."""
    b, t, n, h = q.shape
    if n % num_kv_heads:
        raise ValueError(f"{n} query heads are not a multiple of {num_kv_heads} kv heads")
    return q.reshape(b, t, num_kv_heads, n // num_kv_heads, h)


def _queries_by_kv_head(q: jax.Array, num_kv_heads: int) -> jax.Array:
    """[B,T,N,H] -> [B,K,M,H] with M = (G,T) rows: one plain batched matmul per kv head. (A separate
    size-1 G axis, the MHA case, makes XLA:CPU lower the backward dots as broadcast-multiply-reduce
    over [.., T, S, H]: 10x slower.)"""
    b, t, n, h = q.shape
    grouped = _split_heads(q, num_kv_heads).transpose(0, 2, 3, 1, 4)  # [B,K,G,T,H]
    return grouped.reshape(b, num_kv_heads, n // num_kv_heads * t, h)


def _heads_back(out: jax.Array, t: int) -> jax.Array:
    """The inverse of `_queries_by_kv_head`: [B,K,M,H] -> [B,T,N,H]."""
    b, kv_heads, m, h = out.shape
    out = out.reshape(b, kv_heads, m // t, t, h).transpose(0, 3, 1, 2, 4)  # [B,T,K,G,H]
    return out.reshape(b, t, kv_heads * (m // t), h)


def masked_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *,
                     kv_layout: str = "BSKH", k_scale: jax.Array | None = None,
                     v_scale: jax.Array | None = None) -> jax.Array:
    """Softmax attention under an explicit boolean mask, in float32.

    Args:
      q: [B,T,N,H]; k, v: [B,S,K,H] (kv_layout "BSKH") or [B,K,S,H] ("BKSH", the cache's);
      mask: [B,T,S], True where query t may see key s.
      k_scale, v_scale: [B,K,S] per-(slot, kv head) scales of an int8 cache ("BKSH" only), or None.
    Returns:
      [B,T,N,H] in q's dtype; 0 in rows whose mask is all False.
    """
    _, t, n, h = q.shape
    kv_heads = k.shape[kv_layout.index("K")]
    groups = n // kv_heads
    qm = _queries_by_kv_head(q, kv_heads)
    if kv_layout == "BKSH":
        scores = kv_scores(qm, k, k_scale)
    else:
        scores = jnp.einsum(f"BKMH,{kv_layout}->BKMS", qm.astype(jnp.float32), k.astype(jnp.float32))
    scores = scores * (h ** -0.5)
    mask_m = jnp.tile(mask, (1, groups, 1))[:, None]  # [B,1,M,S], row m is query m % T
    scores = jnp.where(mask_m, scores, backend.MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1)
    if kv_layout == "BKSH":
        out = kv_weighted_values(probs, v, v_scale)
    else:
        out = jnp.einsum(f"BKMS,{kv_layout}->BKMH", probs, v.astype(jnp.float32))
    out = jnp.where(jnp.any(mask_m, axis=-1, keepdims=True), out, 0.0)
    return _heads_back(out, t).astype(q.dtype)


def self_attention_mask(segment_ids: jax.Array | None, batch: int, length: int,
                        causal: bool) -> jax.Array:
    """[B,T,T] mask: same non-zero segment and (if causal) key index <= query index."""
    mask = jnp.ones((batch, length, length), dtype=bool)
    if causal:
        idx = jnp.arange(length)
        mask = mask & (idx[None, :, None] >= idx[None, None, :])
    if segment_ids is not None:
        seg = segment_ids
        mask = mask & (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] != 0)
    return mask


def reference_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                        segment_ids: jax.Array | None = None, causal: bool = True) -> jax.Array:
    """Pure-jnp self-attention.

    Args:
      q: [B,T,N,H]; k, v: [B,T,K,H] (K divides N).
      segment_ids: [B,T] int32 document ids of a packed row, 0 = padding; None = one document.
      causal: mask keys after the query.
    Returns:
      [B,T,N,H]; rows of padding queries (segment id 0) are 0.
    """
    b, t = q.shape[:2]
    if k.shape[1] != t:
        raise ValueError(f"self-attention needs as many keys as queries, got T={t}, "
                         f"S={k.shape[1]}; "
                         "use cached_attention to attend to a KV cache")
    return masked_attention(q, k, v, self_attention_mask(segment_ids, b, t, causal))


def reference_cached_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, *,
                               q_start: jax.Array, k_scale: jax.Array | None = None,
                               v_scale: jax.Array | None = None) -> jax.Array:
    """Pure-jnp attention of T new queries against a KV cache that already holds their keys.

    Args:
      q: [B,T,N,H]; k_cache, v_cache: [B,K,S,H] (float, or int8 with k_scale / v_scale [B,K,S]).
      q_start: [B] int32 cache slot of each sequence's first new query.
    Returns:
      [B,T,N,H].
    """
    t, s = q.shape[1], k_cache.shape[2]
    q_slot = q_start[:, None] + jnp.arange(t)[None, :]  # [B,T]
    mask = jnp.arange(s)[None, None, :] <= q_slot[:, :, None]  # [B,T,S]
    return masked_attention(q, k_cache, v_cache, mask, kv_layout="BKSH", k_scale=k_scale,
                            v_scale=v_scale)


def reference_cached_attention_before_write(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array,
                                            k_new: jax.Array, v_new: jax.Array, *, q_start: jax.Array,
                                            window: int | None = None, k_scale: jax.Array | None = None,
                                            v_scale: jax.Array | None = None) -> jax.Array:
    """`reference_cached_attention` computed from the cache as it was *before* the new keys were
    written: the filled slots (< q_start) plus the new tokens' own keys and values.

    Why: when the attention reads the cache after the write, XLA:CPU fuses the in-place update into
    both the loop-carried cache and the attention's read of it, and then copies each layer's cache
    three times per decode step to keep the two apart (42 copies, ~40 % of a batch-1 step of the
    tiny model). Read before the write, the update has one consumer and stays in place. The result
    equals the reference up to float32 summation order.

    Args:
      q: [B,T,N,H]; k_cache, v_cache: [B,K,S,H] without the new tokens; k_new, v_new: [B,T,K,H].
      q_start: [B] int32 slot of each sequence's first new token (slots >= it are ignored).
      window: sliding window (query slot minus key slot < window), or None.
      k_scale, v_scale: [B,K,S] scales of an int8 cache (see `phi_jax.kernels.quantized`), or None.
    Returns:
      [B,T,N,H] in q's dtype.
    """
    b, t, n, h = q.shape
    kv_heads, s = k_cache.shape[1], k_cache.shape[2]
    groups = n // kv_heads
    qm = _queries_by_kv_head(q, kv_heads).astype(jnp.float32) * (h ** -0.5)
    old = kv_scores(qm, k_cache, k_scale)
    new = jnp.einsum("BKMH,BTKH->BKMT", qm, k_new.astype(jnp.float32))
    slot, index = jnp.arange(s), jnp.arange(t)
    see_old = slot[None, None, :] < q_start[:, None, None]  # [B,1,S]
    see_new = (index[None, :, None] >= index[None, None, :])  # [1,T,T]: new key j <= query t
    if window is not None:
        q_slot = q_start[:, None] + index[None, :]  # [B,T]
        see_old = see_old & (slot[None, None, :] > q_slot[:, :, None] - window)  # [B,T,S]
        see_new = see_new & (index[None, :, None] - index[None, None, :] < window)
    see_old = jnp.tile(jnp.broadcast_to(see_old, (b, t, s)), (1, groups, 1))[:, None]  # [B,1,M,S]
    see_new = jnp.tile(jnp.broadcast_to(see_new, (b, t, t)), (1, groups, 1))[:, None]  # [B,1,M,T]
    scores = jnp.concatenate([jnp.where(see_old, old, backend.MASK_VALUE),
                              jnp.where(see_new, new, backend.MASK_VALUE)], axis=-1)
    probs = jax.nn.softmax(scores, axis=-1)
    out = (kv_weighted_values(probs[..., :s], v_cache, v_scale)
           + jnp.einsum("BKMT,BTKH->BKMH", probs[..., s:], v_new.astype(jnp.float32)))
    return _heads_back(out, t).astype(q.dtype)


@functools.lru_cache(maxsize=None)
def _warn_once(message: str) -> None:
    warnings.warn(message, stacklevel=3)


def _flash_block_sizes(where: str):
    from phi_jax.kernels.flash_attention import BlockSizes
    if where == "tpu":  # big tiles keep the MXU busy; VMEM use stays a few MiB per step
        return BlockSizes(block_q=512, block_k=512, block_q_bwd=256, block_k_bwd=256)
    return BlockSizes()


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, segment_ids: jax.Array | None = None,
              causal: bool = True, impl: str = "xla", interpret: bool | None = None) -> jax.Array:
    """Self-attention through the implementation named by `impl` (see `reference_attention`).

    Args:
      q: [B,T,N,H]; k, v: [B,T,K,H]; segment_ids: [B,T] int32 (0 = padding) or None.
      impl: "xla", "pallas" or "cudnn" (see the module docstring for where each runs).
      interpret: Pallas only: None = interpret iff the default backend is cpu; True = TPU-style
        interpret mode anywhere; a `pltpu.InterpretParams` to tune it.
    Returns:
      [B,T,N,H] in q's dtype.
    """
    where = backend.platform()
    if impl == "xla":
        return reference_attention(q, k, v, segment_ids=segment_ids, causal=causal)
    if impl == "pallas":
        mode = backend.interpret_mode(interpret)
        if mode is not False or where == "tpu":
            from phi_jax.kernels.flash_attention import flash_attention
            return flash_attention(q, k, v, segment_ids=segment_ids, causal=causal,
                                   block_sizes=_flash_block_sizes(where), interpret=mode)
        if where == "gpu":
            from phi_jax.kernels.flash_attention_gpu import flash_attention_gpu
            return flash_attention_gpu(q, k, v, segment_ids=segment_ids, causal=causal)
    if impl == "cudnn" and where == "gpu":
        return cudnn_attention(q, k, v, segment_ids=segment_ids, causal=causal)
    raise backend.unsupported("attention", impl, where)


def cached_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, *, q_start: jax.Array,
                     impl: str = "xla", interpret: bool | None = None, k_scale: jax.Array | None = None,
                     v_scale: jax.Array | None = None) -> jax.Array:
    """Attention against a KV cache through `impl` (see `reference_cached_attention`).

    Args:
      q: [B,T,N,H]; k_cache, v_cache: [B,K,S,H]; q_start: [B] int32.
      impl, interpret: as for `attention`. The Pallas kernel is inference-only (no VJP).
      k_scale, v_scale: [B,K,S] scales of an int8 cache; only the XLA reference reads one.
    Returns:
      [B,T,N,H] in q's dtype.
    """
    where = backend.platform()
    if impl == "xla":
        return reference_cached_attention(q, k_cache, v_cache, q_start=q_start, k_scale=k_scale,
                                          v_scale=v_scale)
    if k_scale is not None:
        raise ValueError(f"an int8 KV cache is read by impl='xla' only, not {impl!r}")
    if impl == "pallas":
        mode = backend.interpret_mode(interpret)
        if mode is not False or where == "tpu":
            from phi_jax.kernels.decode_attention import cached_flash_attention
            return cached_flash_attention(q, k_cache, v_cache, q_start=q_start, interpret=mode)
        if where == "gpu":  # no Mosaic GPU decode kernel; decoding is bandwidth-bound anyway
            _warn_once("cached_attention(impl='pallas') on GPU runs the XLA reference (there is "
                       "no Mosaic GPU decode kernel); training attention still uses the kernel")
            return reference_cached_attention(q, k_cache, v_cache, q_start=q_start)
    if impl == "cudnn" and where == "gpu":
        return cudnn_cached_attention(q, k_cache, v_cache, q_start=q_start)
    raise backend.unsupported("cached_attention", impl, where)
