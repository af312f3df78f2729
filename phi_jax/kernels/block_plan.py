"""Which (query block, key block) tiles of a self-attention a flash kernel must visit.

Letters: B batch, T (padded) sequence length, nq / nk number of query / key blocks.

A tile is *empty* when causality or the segment ids mask all of it; flash kernels skip empty
tiles (no compute, and the index maps re-point their DMAs at a tile that is needed anyway, so
nothing is fetched). A tile is *full* when nothing in it is masked; full tiles take a path
without the mask arithmetic. Everything else is *partial*.

The plan is a few int32 words per block, computed here with cheap XLA reductions and handed to
the kernels as scalar prefetch (SMEM on TPU). It is sound for any segment layout: a tile is only
called empty when the id *intervals* of its query rows and key columns do not meet, so a
non-contiguous layout costs speed, never correctness.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

# Fields of one block's record in the flattened info arrays.
LO, HI, PURE, FIRST, LAST = range(5)
FIELDS = 5
_NO_SEGMENT = jnp.iinfo(jnp.int32).max


class BlockPlan(NamedTuple):
    """Per-block records, flattened to 1-D so that SMEM holds them without padding.

    q_info[(b * nq + i) * FIELDS + f] for query block i, with FIRST/LAST = the range of key blocks
    it may see; k_info[(b * nk + j) * FIELDS + f] for key block j, with FIRST/LAST = the range of
    query blocks that may see it. LO/HI are the smallest non-zero and the largest segment id of
    the block, PURE is 1 when the block holds a single segment and no padding.
    """

    q_info: jax.Array
    k_info: jax.Array


def _block_stats(segment_ids: jax.Array, block: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    b, t = segment_ids.shape
    seg = segment_ids.reshape(b, t // block, block)
    lo = jnp.min(jnp.where(seg != 0, seg, _NO_SEGMENT), axis=-1)
    hi = jnp.max(seg, axis=-1)
    pure = (lo == hi) & jnp.all(seg != 0, axis=-1)
    return lo, hi, pure


def _visible(q_stats, k_stats, block_q: int, block_k: int, causal: bool) -> jax.Array:
    """[B,nq,nk] True where the tile may hold an unmasked entry."""
    q_lo, q_hi, _ = q_stats
    k_lo, k_hi, _ = k_stats
    vis = (q_lo[:, :, None] <= k_hi[:, None, :]) & (k_lo[:, None, :] <= q_hi[:, :, None])
    if causal:
        nq, nk = q_lo.shape[1], k_lo.shape[1]
        q_last_row = (jnp.arange(nq) + 1) * block_q - 1
        k_first_col = jnp.arange(nk) * block_k
        vis = vis & (k_first_col[None, None, :] <= q_last_row[None, :, None])
    return vis


def _range(vis: jax.Array) -> tuple[jax.Array, jax.Array]:
    """First and last True index along the last axis; (0, -1) where there is none."""
    n = vis.shape[-1]
    any_ = jnp.any(vis, axis=-1)
    first = jnp.argmax(vis, axis=-1)
    last = n - 1 - jnp.argmax(vis[..., ::-1], axis=-1)
    return jnp.where(any_, first, 0), jnp.where(any_, last, -1)


def _pack(lo, hi, pure, first, last) -> jax.Array:
    fields = [lo, hi, pure.astype(jnp.int32), first, last]
    return jnp.stack([f.astype(jnp.int32) for f in fields], axis=-1).reshape(-1)


def make_block_plan(segment_ids: jax.Array, block_q: int, block_k: int, causal: bool) -> BlockPlan:
    """Plan for a self-attention over segment_ids [B,T] (T a multiple of both block sizes)."""
    q_stats = _block_stats(segment_ids, block_q)
    k_stats = _block_stats(segment_ids, block_k)
    vis = _visible(q_stats, k_stats, block_q, block_k, causal)  # [B,nq,nk]
    kv_first, kv_last = _range(vis)
    q_first, q_last = _range(jnp.swapaxes(vis, 1, 2))
    return BlockPlan(_pack(*q_stats, kv_first, kv_last), _pack(*k_stats, q_first, q_last))


def make_causal_plan(batch: int, length: int, block_q: int, block_k: int,
                     causal: bool) -> BlockPlan:
    """Plan without segment ids: one document per row, no padding."""
    return make_block_plan(jnp.ones((batch, length), jnp.int32), block_q, block_k, causal)


def field(info_ref, batch_index, block_index, num_blocks: int, f: int):
    """Scalar read of one field of one block's record (inside a kernel or an index map)."""
    return info_ref[(batch_index * num_blocks + block_index) * FIELDS + f]


def clamp_block(index, first, last):
    """The block to fetch at grid step `index`: itself when needed, else the nearest needed one.

    Consecutive grid steps that map to the same block index reuse the fetched tile, so skipped
    steps cost no memory traffic.
    """
    return jnp.minimum(jnp.maximum(index, first), jnp.maximum(last, first))


def tile_status(q_info, k_info, b, i, j, nq: int, nk: int, block_q: int, block_k: int,
                causal: bool):
    """(visible, full) booleans for tile (query block i, key block j) of batch row b."""
    q_lo, q_hi = field(q_info, b, i, nq, LO), field(q_info, b, i, nq, HI)
    k_lo, k_hi = field(k_info, b, j, nk, LO), field(k_info, b, j, nk, HI)
    visible = (q_lo <= k_hi) & (k_lo <= q_hi)
    full = ((field(q_info, b, i, nq, PURE) == 1) & (field(k_info, b, j, nk, PURE) == 1)
            & (q_lo == k_lo))
    if causal:
        visible = visible & (j * block_k <= (i + 1) * block_q - 1)
        full = full & ((j + 1) * block_k - 1 <= i * block_q)
    return visible, full & visible
