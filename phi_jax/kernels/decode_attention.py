"""Attention of a few new queries against a KV cache, as a Pallas kernel (decode / prefill).

Letters: B batch, T new queries per sequence, S cache slots, N query heads, K kv heads,
G = N // K, H head dim, i / j query / cache block index.

Decoding is bound by reading the cache, so the kernel reads it in place, in the model's
[B,K,S,H] layout: each grid step loads one block of slots for all kv heads ([K,bs,H]; a block
whose last dim is the whole head dim is legal for any H, 80 included), which the G query heads of
each kv head then share (the few new queries, not the cache, are regrouped to [B,K,T*G,H] so that
those G heads are contiguous rows).
Query t of sequence b
sits at slot q_start[b] + t and sees the slots at or before its own; cache blocks past the last
query's slot are skipped (and not fetched), blocks wholly before the first query's slot take a
path without masking. q_start is scalar-prefetched. Inference only: there is no VJP.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from phi_jax.kernels.backend import MASK_VALUE

LANES = 128
_NT = (((1,), (1,)), ((), ()))


def _decode_kernel(q_start_ref, q_ref, k_ref, v_ref, o_ref, m_scr, l_scr, acc_scr, *,
                   num_queries: int, block_t: int, block_s: int, num_s_blocks: int, scale: float):
    """q_ref, o_ref: [K, bt*G, H], row r = (query r // G, head r % G of the kv head)."""
    kv_heads, rows, head_dim = acc_scr.shape
    groups = rows // block_t
    b, i, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    first_slot = q_start_ref[b] + i * block_t
    last_slot = q_start_ref[b] + jnp.minimum((i + 1) * block_t, num_queries) - 1

    @pl.when(j == 0)
    def _init():
        m_scr[...] = jnp.full(m_scr.shape, MASK_VALUE, jnp.float32)
        l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
        acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

    visible = j * block_s <= last_slot
    full = (j + 1) * block_s - 1 <= first_slot

    def step(masked: bool):
        mask = None
        if masked:  # row r is query i * block_t + r // G
            query_slot = first_slot + lax.div(lax.broadcasted_iota(jnp.int32, (rows, block_s), 0),
                                              groups)
            key_slot = j * block_s + lax.broadcasted_iota(jnp.int32, (rows, block_s), 1)
            mask = key_slot <= query_slot
            # Slots past the last query are stale (anything, even NaN): p = 0 is not enough,
            # 0 * NaN is NaN, so they are zeroed in v as well.
            slot = j * block_s + lax.broadcasted_iota(jnp.int32, (block_s, head_dim), 0)
            fresh = slot <= last_slot
        for h in range(kv_heads):
            k, v = k_ref[h], v_ref[h]  # [bs,H]
            if masked:
                v = jnp.where(fresh, v, jnp.zeros_like(v))
            q = q_ref[h]  # [bt*G,H]
            s = lax.dot_general(q, k, _NT, preferred_element_type=jnp.float32) * scale
            if masked:
                s = jnp.where(mask, s, MASK_VALUE)
            m_prev, l_prev = m_scr[h], l_scr[h]  # [rows,LANES]
            m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
            p = jnp.exp(s - m_next[:, :1])
            if masked:
                p = jnp.where(mask, p, 0.0)
            alpha = jnp.exp(m_prev - m_next)
            m_scr[h] = m_next
            l_scr[h] = alpha * l_prev + jnp.sum(p, axis=1, keepdims=True)
            pv = jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
            acc_scr[h] = alpha[:, :1] * acc_scr[h] + pv

    pl.when(visible & full)(lambda: step(masked=False))
    pl.when(visible & jnp.logical_not(full))(lambda: step(masked=True))

    @pl.when(j == num_s_blocks - 1)
    def _finish():
        for h in range(kv_heads):
            l = l_scr[h][:, :1]
            o_ref[h] = (acc_scr[h] / jnp.where(l > 0.0, l, 1.0)).astype(o_ref.dtype)


def _block_size(length: int, target: int) -> int:
    """Largest multiple of 8 that divides `length` and is <= target (so the cache is not copied
    to pad it); `length` itself when it is small."""
    if length <= target:
        return length
    for size in range(target - target % 8, 7, -8):
        if length % size == 0:
            return size
    return 0


def cached_flash_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, *,
                           q_start: jax.Array, block_t: int = 128, block_s: int = 256,
                           interpret: object = False) -> jax.Array:
    """Fused `reference_cached_attention`.

    Args:
      q: [B,T,N,H] new queries; k_cache, v_cache: [B,K,S,H] with the new keys already written.
      q_start: [B] int32 cache slot of each sequence's first new query.
      block_t, block_s: tile sizes along T and S (S is tiled by a divisor of S when one exists).
      interpret: False (Mosaic), True or a `pltpu.InterpretParams` (CPU).
    Returns:
      [B,T,N,H] in q's dtype.
    """
    b, t, n, h = q.shape
    _, kh, s, _ = k_cache.shape
    if n % kh:
        raise ValueError(f"{n} query heads are not a multiple of {kh} kv heads")
    if v_cache.shape != k_cache.shape or k_cache.shape[0] != b or k_cache.shape[3] != h:
        raise ValueError(f"cache shapes {k_cache.shape}, {v_cache.shape} do not fit q {q.shape}")
    groups = n // kh
    bt = t if t <= block_t else block_t
    tp = -(-t // bt) * bt
    if tp != t:
        q = jnp.pad(q, ((0, 0), (0, tp - t), (0, 0), (0, 0)))
    # The new queries are few: regroup them (not the cache) so that each kv head's G query heads
    # are contiguous rows: [B,Tp,N,H] -> [B,K,Tp*G,H].
    q_rows = q.reshape(b, tp, kh, groups, h).transpose(0, 2, 1, 3, 4).reshape(b, kh, tp * groups, h)
    bs = _block_size(s, block_s)
    if bs == 0:  # no aligned divisor: pay one copy of the cache rather than fail
        bs = block_s
        pad = -(-s // bs) * bs - s
        k_cache = jnp.pad(k_cache, ((0, 0), (0, 0), (0, pad), (0, 0)))
        v_cache = jnp.pad(v_cache, ((0, 0), (0, 0), (0, pad), (0, 0)))
    ns = k_cache.shape[2] // bs

    def kv_map(bi, i, j, q_start_ref):
        last_slot = q_start_ref[bi] + jnp.minimum((i + 1) * bt, t) - 1
        # lax.div (truncation) == floor division for slots >= 0; Mosaic lowers it on any chip.
        return bi, 0, jnp.clip(jnp.minimum(j, lax.div(last_slot, bs)), 0, ns - 1), 0

    q_map = lambda bi, i, j, q_start_ref: (bi, 0, i, 0)
    kernel = functools.partial(_decode_kernel, num_queries=t, block_t=bt, block_s=bs,
                               num_s_blocks=ns, scale=h ** -0.5)
    out = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=(b, tp // bt, ns),
            in_specs=[pl.BlockSpec((None, kh, bt * groups, h), q_map),
                      pl.BlockSpec((None, kh, bs, h), kv_map),
                      pl.BlockSpec((None, kh, bs, h), kv_map)],
            out_specs=pl.BlockSpec((None, kh, bt * groups, h), q_map),
            scratch_shapes=[pltpu.VMEM((kh, bt * groups, LANES), jnp.float32),
                            pltpu.VMEM((kh, bt * groups, LANES), jnp.float32),
                            pltpu.VMEM((kh, bt * groups, h), jnp.float32)],
        ),
        out_shape=jax.ShapeDtypeStruct(q_rows.shape, q.dtype),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret,
        name="phi_cached_attention",
    )(q_start.astype(jnp.int32), q_rows, k_cache, v_cache)
    out = out.reshape(b, kh, tp, groups, h).transpose(0, 2, 1, 3, 4).reshape(b, tp, n, h)
    return out[:, :t]
