"""Flash attention (forward, dq and dk/dv) as Pallas kernels in the TPU (Mosaic) style.

Letters: B batch, T sequence length (padded to Tp), N query heads, K kv heads, G = N // K,
H head dim (padded to Hp), i / j query / key block index.

One grid step handles the G query heads that share a kv head, so a k/v tile is fetched once for
all of them. The key axis (forward, dq) or the query axis (dk/dv) is the last, sequential grid
axis; running softmax statistics and gradient sums live in VMEM scratch across it. Tiles that the
`BlockPlan` marks empty are skipped (their DMAs re-point at a needed tile), full tiles skip the
mask arithmetic. Softmax and accumulation are float32; matmul inputs keep the input dtype.

Only the log-sum-exp [B,N,1,Tp] is saved for the backward pass. Query rows that see no key
(padding, segment id 0) give output 0, log-sum-exp +big and zero gradients.

The same kernels run on CPU in interpret mode (tests) and lower to Mosaic on TPU. GPUs use
`flash_attention_gpu.py` (Mosaic GPU), whose structure differs (warpgroup matmuls, TMA).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from phi_jax.kernels import block_plan as bp
from phi_jax.kernels.backend import MASK_VALUE

LANES = 128  # TPU vreg lane count: per-row statistics are kept replicated across it.
EMPTY_ROW_LSE = -MASK_VALUE  # exp(s - EMPTY_ROW_LSE) == 0: rows that see nothing get no gradient.
_NT = (((1,), (1,)), ((), ()))  # contract the last dims: a @ b.T
_TN = (((0,), (0,)), ((), ()))  # contract the first dims: a.T @ b


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes; they change speed, never results (up to float rounding order)."""

    block_q: int = 128
    block_k: int = 128
    block_q_bwd: int = 128
    block_k_bwd: int = 128


@dataclasses.dataclass(frozen=True)
class _Static:
    causal: bool
    scale: float
    has_segments: bool
    blocks: BlockSizes
    interpret: object  # False | True | pltpu.InterpretParams


def _tile_mask(row_start, col_start, rows: int, cols: int, causal: bool, row_seg, col_seg,
               rows_are_queries: bool):
    """[rows, cols] visibility; rows are queries (forward, dq) or keys (dk/dv, transposed)."""
    row = row_start + lax.broadcasted_iota(jnp.int32, (rows, cols), 0)
    col = col_start + lax.broadcasted_iota(jnp.int32, (rows, cols), 1)
    mask = jnp.ones((rows, cols), jnp.bool_)
    if causal:
        mask = (col <= row) if rows_are_queries else (row <= col)
    if row_seg is not None:
        query_seg = row_seg if rows_are_queries else col_seg
        mask = mask & (row_seg == col_seg) & (query_seg != 0)
    return mask


def _lanes(x, width: int):
    """Broadcast a [rows, LANES]-replicated statistic to [rows, width]."""
    return jnp.broadcast_to(x[:, :1], (x.shape[0], width))


def _col_to_row(col):
    """[rows, 1] -> [1, rows] through a 2-D transpose, which Mosaic supports for float32."""
    return jnp.transpose(jnp.broadcast_to(col, (col.shape[0], LANES)))[:1, :]


def _row_to_col(row):
    """[1, rows] -> [rows, 1]."""
    return jnp.transpose(jnp.broadcast_to(row, (LANES, row.shape[1])))[:, :1]


# ----------------------------------------------------------------------------- forward


def _fwd_kernel(q_info, k_info, q_ref, k_ref, v_ref, *refs, st: _Static, nq: int, nk: int):
    if st.has_segments:
        qseg_ref, kseg_ref, o_ref, lse_ref, m_scr, l_scr, acc_scr = refs
    else:
        (o_ref, lse_ref, m_scr, l_scr, acc_scr), qseg_ref, kseg_ref = refs, None, None
    bq, bk = st.blocks.block_q, st.blocks.block_k
    groups = q_ref.shape[0]
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        m_scr[...] = jnp.full(m_scr.shape, MASK_VALUE, jnp.float32)
        l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
        acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

    visible, full = bp.tile_status(q_info, k_info, b, i, j, nq, nk, bq, bk, st.causal)

    def step(masked: bool):
        k, v = k_ref[...], v_ref[...]  # [bk,Hp]
        mask = None
        if masked:
            segs = (qseg_ref[...], kseg_ref[...]) if st.has_segments else (None, None)
            mask = _tile_mask(i * bq, j * bk, bq, bk, st.causal, *segs, rows_are_queries=True)
        @pl.loop(0, groups)
        def _head(g):
            s = lax.dot_general(q_ref[g], k, _NT, preferred_element_type=jnp.float32) * st.scale
            if masked:
                s = jnp.where(mask, s, MASK_VALUE)
            m_prev, l_prev = m_scr[g], l_scr[g]  # [bq,LANES]
            m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
            p = jnp.exp(s - _lanes(m_next, bk))
            if masked:
                p = jnp.where(mask, p, 0.0)
            alpha = jnp.exp(m_prev - m_next)
            m_scr[g] = m_next
            l_scr[g] = alpha * l_prev + jnp.sum(p, axis=1, keepdims=True)
            pv = jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
            acc_scr[g] = _lanes(alpha, pv.shape[1]) * acc_scr[g] + pv

    pl.when(visible & full)(lambda: step(masked=False))
    pl.when(visible & jnp.logical_not(full))(lambda: step(masked=True))

    @pl.when(j == nk - 1)
    def _finish():
        for g in range(groups):
            l, m = l_scr[g][:, :1], m_scr[g][:, :1]  # [bq,1]
            seen = l > 0.0
            inv = jnp.where(seen, 1.0 / jnp.where(seen, l, 1.0), 0.0)
            o_ref[g] = (acc_scr[g] * _lanes(inv, acc_scr.shape[-1])).astype(o_ref.dtype)
            lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), EMPTY_ROW_LSE)
            lse_ref[g] = _col_to_row(lse)


def _seg_specs(st: _Static, q_block: int, k_block: int, q_map, k_map):
    """BlockSpecs of the segment ids as a query column [Tp,1] and a key row [1,Tp]."""
    if not st.has_segments:
        return []
    return [pl.BlockSpec((None, q_block, 1), q_map), pl.BlockSpec((None, 1, k_block), k_map)]


def _forward(q, k, v, seg_col, seg_row, plan: bp.BlockPlan, st: _Static):
    """q [B,N,Tp,Hp], k/v [B,K,Tp,Hp] -> out [B,N,Tp,Hp], lse [B,N,1,Tp]."""
    b, n, t, hp = q.shape
    kh = k.shape[1]
    groups = n // kh
    bq, bk = st.blocks.block_q, st.blocks.block_k
    nq, nk = t // bq, t // bk

    def kv_block(bi, i, j, q_info, k_info):
        first = bp.field(q_info, bi, i, nq, bp.FIRST)
        last = bp.field(q_info, bi, i, nq, bp.LAST)
        return bp.clamp_block(j, first, last)

    q_map = lambda bi, h, i, j, qi, ki: (bi, h, i, 0)
    kv_map = lambda bi, h, i, j, qi, ki: (bi, h, kv_block(bi, i, j, qi, ki), 0)
    lse_map = lambda bi, h, i, j, qi, ki: (bi, h, 0, i)
    in_specs = [
        pl.BlockSpec((None, groups, bq, hp), q_map),
        pl.BlockSpec((None, None, bk, hp), kv_map),
        pl.BlockSpec((None, None, bk, hp), kv_map),
        *_seg_specs(st, bq, bk, lambda bi, h, i, j, qi, ki: (bi, i, 0),
                    lambda bi, h, i, j, qi, ki: (bi, 0, kv_block(bi, i, j, qi, ki))),
    ]
    out_specs = [pl.BlockSpec((None, groups, bq, hp), q_map),
                 pl.BlockSpec((None, groups, 1, bq), lse_map)]
    segs = [seg_col, seg_row] if st.has_segments else []
    out, lse = pl.pallas_call(
        functools.partial(_fwd_kernel, st=st, nq=nq, nk=nk),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(b, kh, nq, nk),
            in_specs=in_specs,
            out_specs=out_specs,
            scratch_shapes=[pltpu.VMEM((groups, bq, LANES), jnp.float32),
                            pltpu.VMEM((groups, bq, LANES), jnp.float32),
                            pltpu.VMEM((groups, bq, hp), jnp.float32)],
        ),
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct((b, n, 1, t), jnp.float32)],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=st.interpret,
        name="phi_flash_fwd",
    )(plan.q_info, plan.k_info, q, k, v, *segs)
    return out, lse


# ----------------------------------------------------------------------------- backward: dq


def _dq_kernel(q_info, k_info, q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, *refs, st: _Static,
               nq: int, nk: int):
    if st.has_segments:
        qseg_ref, kseg_ref, dq_ref, dq_scr = refs
    else:
        (dq_ref, dq_scr), qseg_ref, kseg_ref = refs, None, None
    bq, bk = st.blocks.block_q_bwd, st.blocks.block_k_bwd
    groups = q_ref.shape[0]
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        dq_scr[...] = jnp.zeros(dq_scr.shape, jnp.float32)

    visible, full = bp.tile_status(q_info, k_info, b, i, j, nq, nk, bq, bk, st.causal)

    def step(masked: bool):
        k, v = k_ref[...], v_ref[...]  # [bk,Hp]
        mask = None
        if masked:
            segs = (qseg_ref[...], kseg_ref[...]) if st.has_segments else (None, None)
            mask = _tile_mask(i * bq, j * bk, bq, bk, st.causal, *segs, rows_are_queries=True)
        @pl.loop(0, groups)
        def _head(g):
            q, do = q_ref[g], do_ref[g]  # [bq,Hp]
            s = lax.dot_general(q, k, _NT, preferred_element_type=jnp.float32) * st.scale
            p = jnp.exp(s - _row_to_col(lse_ref[g]))
            if masked:
                p = jnp.where(mask, p, 0.0)
            dp = lax.dot_general(do, v, _NT, preferred_element_type=jnp.float32)
            ds = p * (dp - _row_to_col(di_ref[g]))
            dq_scr[g] += jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

    pl.when(visible & full)(lambda: step(masked=False))
    pl.when(visible & jnp.logical_not(full))(lambda: step(masked=True))

    @pl.when(j == nk - 1)
    def _finish():
        dq_ref[...] = (dq_scr[...] * st.scale).astype(dq_ref.dtype)


def _dq(q, k, v, do, lse, di, seg_col, seg_row, plan: bp.BlockPlan, st: _Static):
    b, n, t, hp = q.shape
    kh = k.shape[1]
    groups = n // kh
    bq, bk = st.blocks.block_q_bwd, st.blocks.block_k_bwd
    nq, nk = t // bq, t // bk

    def kv_block(bi, i, j, q_info):
        return bp.clamp_block(j, bp.field(q_info, bi, i, nq, bp.FIRST),
                              bp.field(q_info, bi, i, nq, bp.LAST))

    q_map = lambda bi, h, i, j, qi, ki: (bi, h, i, 0)
    kv_map = lambda bi, h, i, j, qi, ki: (bi, h, kv_block(bi, i, j, qi), 0)
    row_map = lambda bi, h, i, j, qi, ki: (bi, h, 0, i)
    q_spec = pl.BlockSpec((None, groups, bq, hp), q_map)
    kv_spec = pl.BlockSpec((None, None, bk, hp), kv_map)
    row_spec = pl.BlockSpec((None, groups, 1, bq), row_map)
    in_specs = [q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec,
                *_seg_specs(st, bq, bk, lambda bi, h, i, j, qi, ki: (bi, i, 0),
                            lambda bi, h, i, j, qi, ki: (bi, 0, kv_block(bi, i, j, qi)))]
    segs = [seg_col, seg_row] if st.has_segments else []
    return pl.pallas_call(
        functools.partial(_dq_kernel, st=st, nq=nq, nk=nk),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(b, kh, nq, nk),
            in_specs=in_specs,
            out_specs=q_spec,
            scratch_shapes=[pltpu.VMEM((groups, bq, hp), jnp.float32)],
        ),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=st.interpret,
        name="phi_flash_dq",
    )(plan.q_info, plan.k_info, q, k, v, do, lse, di, *segs)


# ----------------------------------------------------------------------------- backward: dk, dv


def _dkv_kernel(q_info, k_info, q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, *refs,
                st: _Static, nq: int, nk: int):
    """Transposed formulation: scores are [bk, bq] so that lse and di broadcast as rows."""
    if st.has_segments:
        kseg_ref, qseg_ref, dk_ref, dv_ref, dk_scr, dv_scr = refs
    else:
        (dk_ref, dv_ref, dk_scr, dv_scr), kseg_ref, qseg_ref = refs, None, None
    bq, bk = st.blocks.block_q_bwd, st.blocks.block_k_bwd
    groups = q_ref.shape[0]
    b, j, i = pl.program_id(0), pl.program_id(2), pl.program_id(3)

    @pl.when(i == 0)
    def _init():
        dk_scr[...] = jnp.zeros(dk_scr.shape, jnp.float32)
        dv_scr[...] = jnp.zeros(dv_scr.shape, jnp.float32)

    visible, full = bp.tile_status(q_info, k_info, b, i, j, nq, nk, bq, bk, st.causal)

    def step(masked: bool):
        k, v = k_ref[...], v_ref[...]  # [bk,Hp]
        mask = None
        if masked:
            segs = (kseg_ref[...], qseg_ref[...]) if st.has_segments else (None, None)
            mask = _tile_mask(j * bk, i * bq, bk, bq, st.causal, *segs, rows_are_queries=False)
        @pl.loop(0, groups)
        def _head(g):
            q, do = q_ref[g], do_ref[g]  # [bq,Hp]
            s_t = lax.dot_general(k, q, _NT, preferred_element_type=jnp.float32) * st.scale
            p_t = jnp.exp(s_t - lse_ref[g])  # [bk,bq]
            if masked:
                p_t = jnp.where(mask, p_t, 0.0)
            dv_scr[...] += jnp.dot(p_t.astype(do.dtype), do, preferred_element_type=jnp.float32)
            dp_t = lax.dot_general(v, do, _NT, preferred_element_type=jnp.float32)
            ds_t = p_t * (dp_t - di_ref[g])
            dk_scr[...] += jnp.dot(ds_t.astype(q.dtype), q, preferred_element_type=jnp.float32)

    pl.when(visible & full)(lambda: step(masked=False))
    pl.when(visible & jnp.logical_not(full))(lambda: step(masked=True))

    @pl.when(i == nq - 1)
    def _finish():
        dk_ref[...] = (dk_scr[...] * st.scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)


def _dkv(q, k, v, do, lse, di, seg_col, seg_row, plan: bp.BlockPlan, st: _Static):
    b, n, t, hp = q.shape
    kh = k.shape[1]
    groups = n // kh
    bq, bk = st.blocks.block_q_bwd, st.blocks.block_k_bwd
    nq, nk = t // bq, t // bk

    def q_block(bi, j, i, k_info):
        return bp.clamp_block(i, bp.field(k_info, bi, j, nk, bp.FIRST),
                              bp.field(k_info, bi, j, nk, bp.LAST))

    q_map = lambda bi, h, j, i, qi, ki: (bi, h, q_block(bi, j, i, ki), 0)
    kv_map = lambda bi, h, j, i, qi, ki: (bi, h, j, 0)
    row_map = lambda bi, h, j, i, qi, ki: (bi, h, 0, q_block(bi, j, i, ki))
    q_spec = pl.BlockSpec((None, groups, bq, hp), q_map)
    kv_spec = pl.BlockSpec((None, None, bk, hp), kv_map)
    row_spec = pl.BlockSpec((None, groups, 1, bq), row_map)
    in_specs = [q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec,
                *_seg_specs(st, bk, bq, lambda bi, h, j, i, qi, ki: (bi, j, 0),
                            lambda bi, h, j, i, qi, ki: (bi, 0, q_block(bi, j, i, ki)))]
    segs = [seg_col, seg_row] if st.has_segments else []
    return pl.pallas_call(
        functools.partial(_dkv_kernel, st=st, nq=nq, nk=nk),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(b, kh, nk, nq),
            in_specs=in_specs,
            out_specs=[kv_spec, kv_spec],
            scratch_shapes=[pltpu.VMEM((bk, hp), jnp.float32), pltpu.VMEM((bk, hp), jnp.float32)],
        ),
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=st.interpret,
        name="phi_flash_dkv",
    )(plan.q_info, plan.k_info, q, k, v, do, lse, di, *segs)


# ----------------------------------------------------------------------------- custom_vjp


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _flash(q, k, v, seg_col, seg_row, plans, st: _Static):
    return _forward(q, k, v, seg_col, seg_row, plans[0], st)[0]


def _flash_fwd(q, k, v, seg_col, seg_row, plans, st: _Static):
    out, lse = _forward(q, k, v, seg_col, seg_row, plans[0], st)
    return out, (q, k, v, seg_col, seg_row, plans, out, lse)


def _flash_bwd(st: _Static, res, d_out):
    q, k, v, seg_col, seg_row, plans, out, lse = res
    di = jnp.sum(out.astype(jnp.float32) * d_out.astype(jnp.float32), axis=-1)[:, :, None, :]
    dq = _dq(q, k, v, d_out, lse, di, seg_col, seg_row, plans[1], st)
    dk, dv = _dkv(q, k, v, d_out, lse, di, seg_col, seg_row, plans[1], st)
    return dq, dk, dv, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def padded_head_dim(head_dim: int) -> int:
    """TPU lanes are 128 wide: 64 and multiples of 128 are kept, anything else (80) rounds up to
    a multiple of 128. Zero padding changes no dot product, so results are unchanged."""
    return head_dim if head_dim % 128 == 0 or head_dim == 64 else _round_up(head_dim, 128)


def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                    segment_ids: jax.Array | None = None, causal: bool = True,
                    block_sizes: BlockSizes | None = None, interpret: object = False,
                    pad_head_dim: bool = True) -> jax.Array:
    """Fused self-attention with the semantics of `reference_attention`.

    Args:
      q: [B,T,N,H]; k, v: [B,T,K,H] with K dividing N.
      segment_ids: [B,T] int32 packed-document ids, 0 = padding; None = one document per row.
      causal: mask keys after the query.
      block_sizes: tile sizes (clipped to the padded length); None = 128 everywhere.
      interpret: False (compile with Mosaic), True or a `pltpu.InterpretParams` (run on CPU).
      pad_head_dim: pad H to `padded_head_dim(H)` (what TPU lanes want).
    Returns:
      [B,T,N,H] in q's dtype; rows of padding queries are 0.
    """
    b, t, n, h = q.shape
    kh = k.shape[2]
    if n % kh:
        raise ValueError(f"{n} query heads are not a multiple of {kh} kv heads")
    if k.shape[1] != t or v.shape != k.shape:
        raise ValueError(f"flash attention is self-attention: q {q.shape}, k {k.shape}, "
                         f"v {v.shape} must share B and T; use cached_attention for a KV cache")
    blocks = block_sizes or BlockSizes()
    step = max(blocks.block_q, blocks.block_k, blocks.block_q_bwd, blocks.block_k_bwd)
    tp = _round_up(t, step)
    if tp == step:  # one block covers the whole row: shrink the tiles to the (8-aligned) length
        tp = _round_up(t, 8)
        blocks = BlockSizes(tp, tp, tp, tp)
    for name in ("block_q", "block_k", "block_q_bwd", "block_k_bwd"):
        if tp % getattr(blocks, name):
            raise ValueError(f"{name}={getattr(blocks, name)} must divide the padded length "
                             f"{tp}; use block sizes that divide each other")
    hp = padded_head_dim(h) if pad_head_dim else h
    if segment_ids is None and tp != t:
        segment_ids = jnp.ones((b, t), jnp.int32)  # marks the padded tail as padding (id 0)
    has_segments = segment_ids is not None

    def to_kernel_layout(x):  # [B,T,heads,H] -> [B,heads,Tp,Hp]
        return jnp.pad(jnp.swapaxes(x, 1, 2), ((0, 0), (0, 0), (0, tp - t), (0, hp - h)))

    if has_segments:
        seg = jnp.pad(segment_ids.astype(jnp.int32), ((0, 0), (0, tp - t)))
        plans = (bp.make_block_plan(seg, blocks.block_q, blocks.block_k, causal),
                 bp.make_block_plan(seg, blocks.block_q_bwd, blocks.block_k_bwd, causal))
        seg_col, seg_row = seg[:, :, None], seg[:, None, :]
    else:
        plans = (bp.make_causal_plan(b, tp, blocks.block_q, blocks.block_k, causal),
                 bp.make_causal_plan(b, tp, blocks.block_q_bwd, blocks.block_k_bwd, causal))
        seg_col = seg_row = None
    st = _Static(causal=causal, scale=h ** -0.5, has_segments=has_segments, blocks=blocks,
                 interpret=interpret)
    out = _flash(to_kernel_layout(q), to_kernel_layout(k), to_kernel_layout(v), seg_col, seg_row,
                 plans, st)
    return jnp.swapaxes(out[:, :, :t, :h], 1, 2)
