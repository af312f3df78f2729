"""Backward pass of the Hopper flash attention (Mosaic GPU): the dq and the dk/dv kernels.

Letters: B batch, T padded length, N query heads, K kv heads, G = N // K, H padded head dim.

Same structure as the forward (`flash_attention_gpu.py`): two compute warpgroups own 64 rows each
(query rows for dq, key rows for dk/dv), a memory warpgroup streams the other side through a ring
of SMEM buffers, restricted to the `BlockPlan` range. Probabilities are recomputed from the base-2
log-sum-exp. dk/dv are produced per query head and summed over each kv head's G heads by XLA.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from phi_jax.kernels import block_plan as bp
from phi_jax.kernels.gpu_ops import (COMPUTE_WGS, LOG2E, ROWS, Ops, Static, interpret_params,
                                     memory_warpgroup, smem, union_range)


# ----------------------------------------------------------------------------- backward: dq


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, seg_ref, q_info, k_info, *refs,
               st: Static, nq: int, nk: int):
    ops = Ops(st.interpret)
    if st.interpret:
        kt_ref, vt_ref, dq_ref, scratch = refs
    else:
        (dq_ref, scratch), kt_ref, vt_ref = refs, None, None
    (q_smem, do_smem, lse_smem, di_smem, qseg_smem, k_smem, v_smem, kt_smem, vt_smem, kseg_smem,
     stage_smem, own_bar, k_bar, v_bar, kt_bar, vt_bar, kseg_bar, consumed) = scratch
    bq, bk, stages = ROWS, st.blocks.block_kv_dq, st.blocks.stages
    hp = q_smem.shape[-1]
    n, tile, b = lax.axis_index("heads"), lax.axis_index("tiles"), lax.axis_index("batch")
    wg = lax.axis_index("wg")
    kvh = lax.div(n, jnp.int32(st.groups))
    first, steps = union_range(q_info, b, [2 * tile, 2 * tile + 1], nq)

    @pl.when(wg < COMPUTE_WGS)
    def _compute():
        plgpu.set_max_registers(232, action="increase")
        i = 2 * tile + wg
        rows = pl.ds(i * bq, bq)
        own = [(q_ref.at[b, rows, n], q_smem), (do_ref.at[b, rows, n], do_smem),
               (lse_ref.at[b, n, rows], lse_smem), (di_ref.at[b, n, rows], di_smem),
               (seg_ref.at[b, rows], qseg_smem)]
        for c, (src, dst) in enumerate(own):
            plgpu.copy_gmem_to_smem(src, dst.at[wg], own_bar.at[c * COMPUTE_WGS + wg])
        for c in range(len(own)):
            plgpu.barrier_wait(own_bar.at[c * COMPUTE_WGS + wg])
        lse, di, q_seg = ops.rows(lse_smem.at[wg]), ops.rows(di_smem.at[wg]), ops.rows(
            qseg_smem.at[wg])
        stage = None if stage_smem is None else stage_smem.at[wg]

        def tile_step(masked, slot, j, dq):
            kt = ops.transposed(k_smem.at[slot], None if kt_smem is None else kt_smem.at[slot])
            s = ops.matmul(q_smem.at[wg], kt, (bq, bk)) * (st.scale * LOG2E)
            p = jnp.exp2(s - lax.broadcast_in_dim(lse, s.shape, [0]))
            if masked:
                k_seg = ops.cols(kseg_smem.at[slot])
                row_seg = lax.broadcast_in_dim(q_seg, s.shape, [0])
                mask = (row_seg == lax.broadcast_in_dim(k_seg, s.shape, [1])) & (row_seg != 0)
                if st.causal:
                    mask = mask & (ops.iota(s.shape, 1) + j * bk <= ops.iota(s.shape, 0) + i * bq)
                p = jnp.where(mask, p, 0.0)
            plgpu.barrier_wait(v_bar.at[slot])
            if vt_bar is not None:
                plgpu.barrier_wait(vt_bar.at[slot])
            vt = ops.transposed(v_smem.at[slot], None if vt_smem is None else vt_smem.at[slot])
            dp = ops.matmul(do_smem.at[wg], vt, (bq, bk))
            ds = p * (dp - lax.broadcast_in_dim(di, s.shape, [0]))
            return ops.matmul_acc(dq, ds.astype(k_smem.dtype), k_smem.at[slot], stage)

        def kv_loop(step, dq):
            slot = lax.rem(step, jnp.int32(stages))
            j = first + step
            for bar in (k_bar, kseg_bar, kt_bar):
                if bar is not None:
                    plgpu.barrier_wait(bar.at[slot])
            visible, full = bp.tile_status(q_info, k_info, b, i, j, nq, nk, bq, bk, st.causal)

            def run(c):
                return lax.cond(full, functools.partial(tile_step, False, slot, j),
                                functools.partial(tile_step, True, slot, j), c)

            def skip(c):
                plgpu.barrier_wait(v_bar.at[slot])
                if vt_bar is not None:
                    plgpu.barrier_wait(vt_bar.at[slot])
                return c

            dq = lax.cond(visible, run, skip, dq)
            plgpu.barrier_arrive(consumed.at[slot])
            return dq

        dq = lax.fori_loop(0, steps, kv_loop, ops.zeros((bq, hp)))
        q_smem.at[wg][...] = (dq * st.scale).astype(q_smem.dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(q_smem.at[wg], dq_ref.at[b, rows, n])
        plgpu.wait_smem_to_gmem(0)

    def copies(step, slot):
        keys = pl.ds((first + step) * bk, bk)
        yield k_ref.at[b, keys, kvh], k_smem.at[slot], k_bar.at[slot]
        yield seg_ref.at[b, keys], kseg_smem.at[slot], kseg_bar.at[slot]
        if kt_ref is not None:
            yield kt_ref.at[b, kvh, :, keys], kt_smem.at[slot], kt_bar.at[slot]
            yield vt_ref.at[b, kvh, :, keys], vt_smem.at[slot], vt_bar.at[slot]
        yield v_ref.at[b, keys, kvh], v_smem.at[slot], v_bar.at[slot]

    pl.when(wg == COMPUTE_WGS)(lambda: memory_warpgroup(steps, stages, consumed, copies))


def compute_dq(q, k, v, d_out, lse, di, seg, plan: bp.BlockPlan, st: Static):
    """dq [B,Tp,N,Hp] from q, d_out [B,Tp,N,Hp], k, v [B,Tp,K,Hp], lse, di [B,N,Tp]."""
    b, t, n, hp = q.shape
    bk, stages = st.blocks.block_kv_dq, st.blocks.stages
    nq, nk = t // ROWS, t // bk
    dtype = q.dtype
    interp = st.interpret
    extra = [jnp.transpose(x, (0, 2, 3, 1)) for x in (k, v)] if interp else []
    scratch = [
        smem((COMPUTE_WGS, ROWS, hp), dtype),  # q, then dq
        smem((COMPUTE_WGS, ROWS, hp), dtype),  # d_out
        plgpu.SMEM((COMPUTE_WGS, ROWS), jnp.float32),  # lse
        plgpu.SMEM((COMPUTE_WGS, ROWS), jnp.float32),  # di
        plgpu.SMEM((COMPUTE_WGS, ROWS), jnp.int32),  # q segment ids
        smem((stages, bk, hp), dtype),
        smem((stages, bk, hp), dtype),
        smem((stages, hp, bk), dtype) if interp else None,
        smem((stages, hp, bk), dtype) if interp else None,
        plgpu.SMEM((stages, bk), jnp.int32),
        smem((COMPUTE_WGS, ROWS, bk), dtype) if interp else None,
        plgpu.Barrier(num_barriers=5 * COMPUTE_WGS),
        plgpu.Barrier(num_barriers=stages),
        plgpu.Barrier(num_barriers=stages),
        plgpu.Barrier(num_barriers=stages) if interp else None,
        plgpu.Barrier(num_barriers=stages) if interp else None,
        plgpu.Barrier(num_barriers=stages),
        plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=stages),
    ]
    kernel = functools.partial(_dq_kernel, st=st, nq=nq, nk=nk)

    def entry(*refs):
        pl.run_scoped(lambda *s: kernel(*refs, s), *scratch, collective_axes="wg")

    return plgpu.kernel(
        entry,
        out_type=jax.ShapeDtypeStruct(q.shape, dtype),
        grid=(n, t // (COMPUTE_WGS * ROWS), b),
        grid_names=("heads", "tiles", "batch"),
        num_threads=COMPUTE_WGS + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=interpret_params(st),
    )(q, k, v, d_out, lse, di, seg, plan.q_info, plan.k_info, *extra)


# ----------------------------------------------------------------------------- backward: dk, dv


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, seg_ref, q_info, k_info, *refs,
                st: Static, nq: int, nk: int):
    """Transposed formulation: scores are [keys, queries]; lse and di broadcast along rows."""
    ops = Ops(st.interpret)
    if st.interpret:
        qt_ref, dot_ref, dk_ref, dv_ref, scratch = refs
    else:
        (dk_ref, dv_ref, scratch), qt_ref, dot_ref = refs, None, None
    (k_smem, v_smem, kseg_smem, q_smem, do_smem, qt_smem, dot_smem, lse_smem, di_smem, qseg_smem,
     stage_smem, own_bar, q_bar, do_bar, qt_bar, dot_bar, row_bar, consumed) = scratch
    bk, bq, stages = ROWS, st.blocks.block_q_dkv, st.blocks.stages
    hp = k_smem.shape[-1]
    n, tile, b = lax.axis_index("heads"), lax.axis_index("tiles"), lax.axis_index("batch")
    wg = lax.axis_index("wg")
    kvh = lax.div(n, jnp.int32(st.groups))
    first, steps = union_range(k_info, b, [2 * tile, 2 * tile + 1], nk)

    @pl.when(wg < COMPUTE_WGS)
    def _compute():
        plgpu.set_max_registers(232, action="increase")
        j = 2 * tile + wg
        keys = pl.ds(j * bk, bk)
        own = [(k_ref.at[b, keys, kvh], k_smem), (v_ref.at[b, keys, kvh], v_smem),
               (seg_ref.at[b, keys], kseg_smem)]
        for c, (src, dst) in enumerate(own):
            plgpu.copy_gmem_to_smem(src, dst.at[wg], own_bar.at[c * COMPUTE_WGS + wg])
        for c in range(len(own)):
            plgpu.barrier_wait(own_bar.at[c * COMPUTE_WGS + wg])
        k_seg = ops.rows(kseg_smem.at[wg])
        stage = None if stage_smem is None else stage_smem.at[wg]

        def tile_step(masked, slot, i, carry):
            dk, dv = carry
            qt = ops.transposed(q_smem.at[slot], None if qt_smem is None else qt_smem.at[slot])
            s_t = ops.matmul(k_smem.at[wg], qt, (bk, bq)) * (st.scale * LOG2E)
            lse = ops.cols(lse_smem.at[slot])
            p_t = jnp.exp2(s_t - lax.broadcast_in_dim(lse, s_t.shape, [1]))
            if masked:
                q_seg = lax.broadcast_in_dim(ops.cols(qseg_smem.at[slot]), s_t.shape, [1])
                mask = (lax.broadcast_in_dim(k_seg, s_t.shape, [0]) == q_seg) & (q_seg != 0)
                if st.causal:
                    key = ops.iota(s_t.shape, 0) + j * bk
                    mask = mask & (key <= ops.iota(s_t.shape, 1) + i * bq)
                p_t = jnp.where(mask, p_t, 0.0)
            plgpu.barrier_wait(do_bar.at[slot])
            if dot_bar is not None:
                plgpu.barrier_wait(dot_bar.at[slot])
            dv = ops.matmul_acc(dv, p_t.astype(v_smem.dtype), do_smem.at[slot], stage)
            dot = ops.transposed(do_smem.at[slot], None if dot_smem is None else dot_smem.at[slot])
            dp_t = ops.matmul(v_smem.at[wg], dot, (bk, bq))
            di = ops.cols(di_smem.at[slot])
            ds_t = p_t * (dp_t - lax.broadcast_in_dim(di, s_t.shape, [1]))
            dk = ops.matmul_acc(dk, ds_t.astype(q_smem.dtype), q_smem.at[slot], stage)
            return dk, dv

        def q_loop(step, carry):
            slot = lax.rem(step, jnp.int32(stages))
            i = first + step
            for bar in (q_bar, qt_bar):
                if bar is not None:
                    plgpu.barrier_wait(bar.at[slot])
            for c in range(3):  # lse, di, q segment ids
                plgpu.barrier_wait(row_bar.at[c * stages + slot])
            visible, full = bp.tile_status(q_info, k_info, b, i, j, nq, nk, bq, bk, st.causal)

            def run(c):
                return lax.cond(full, functools.partial(tile_step, False, slot, i),
                                functools.partial(tile_step, True, slot, i), c)

            def skip(c):
                plgpu.barrier_wait(do_bar.at[slot])
                if dot_bar is not None:
                    plgpu.barrier_wait(dot_bar.at[slot])
                return c

            carry = lax.cond(visible, run, skip, carry)
            plgpu.barrier_arrive(consumed.at[slot])
            return carry

        dk, dv = lax.fori_loop(0, steps, q_loop, (ops.zeros((bk, hp)), ops.zeros((bk, hp))))
        k_smem.at[wg][...] = (dk * st.scale).astype(k_smem.dtype)
        v_smem.at[wg][...] = dv.astype(v_smem.dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(k_smem.at[wg], dk_ref.at[b, keys, n])
        plgpu.copy_smem_to_gmem(v_smem.at[wg], dv_ref.at[b, keys, n])
        plgpu.wait_smem_to_gmem(0)

    def copies(step, slot):
        rows = pl.ds((first + step) * bq, bq)
        yield q_ref.at[b, rows, n], q_smem.at[slot], q_bar.at[slot]
        if qt_ref is not None:
            yield qt_ref.at[b, n, :, rows], qt_smem.at[slot], qt_bar.at[slot]
        for c, (src, dst) in enumerate([(lse_ref.at[b, n, rows], lse_smem),
                                        (di_ref.at[b, n, rows], di_smem),
                                        (seg_ref.at[b, rows], qseg_smem)]):
            yield src, dst.at[slot], row_bar.at[c * stages + slot]
        yield do_ref.at[b, rows, n], do_smem.at[slot], do_bar.at[slot]
        if dot_ref is not None:
            yield dot_ref.at[b, n, :, rows], dot_smem.at[slot], dot_bar.at[slot]

    pl.when(wg == COMPUTE_WGS)(lambda: memory_warpgroup(steps, stages, consumed, copies))


def compute_dkv(q, k, v, d_out, lse, di, seg, plan: bp.BlockPlan, st: Static):
    """dk, dv [B,Tp,K,Hp]: per query head in the kernel, summed over each kv head's G heads."""
    b, t, n, hp = q.shape
    kh = k.shape[2]
    bq, stages = st.blocks.block_q_dkv, st.blocks.stages
    nq, nk = t // bq, t // ROWS
    dtype = q.dtype
    interp = st.interpret
    extra = [jnp.transpose(x, (0, 2, 3, 1)) for x in (q, d_out)] if interp else []
    scratch = [
        smem((COMPUTE_WGS, ROWS, hp), dtype),  # k, then dk
        smem((COMPUTE_WGS, ROWS, hp), dtype),  # v, then dv
        plgpu.SMEM((COMPUTE_WGS, ROWS), jnp.int32),
        smem((stages, bq, hp), dtype),
        smem((stages, bq, hp), dtype),
        smem((stages, hp, bq), dtype) if interp else None,
        smem((stages, hp, bq), dtype) if interp else None,
        plgpu.SMEM((stages, bq), jnp.float32),
        plgpu.SMEM((stages, bq), jnp.float32),
        plgpu.SMEM((stages, bq), jnp.int32),
        smem((COMPUTE_WGS, ROWS, bq), dtype) if interp else None,
        plgpu.Barrier(num_barriers=3 * COMPUTE_WGS),
        plgpu.Barrier(num_barriers=stages),
        plgpu.Barrier(num_barriers=stages),
        plgpu.Barrier(num_barriers=stages) if interp else None,
        plgpu.Barrier(num_barriers=stages) if interp else None,
        plgpu.Barrier(num_barriers=3 * stages),
        plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=stages),
    ]
    kernel = functools.partial(_dkv_kernel, st=st, nq=nq, nk=nk)

    def entry(*refs):
        pl.run_scoped(lambda *s: kernel(*refs, s), *scratch, collective_axes="wg")

    per_head = jax.ShapeDtypeStruct((b, t, n, hp), dtype)
    dk, dv = plgpu.kernel(
        entry,
        out_type=[per_head, per_head],
        grid=(n, t // (COMPUTE_WGS * ROWS), b),
        grid_names=("heads", "tiles", "batch"),
        num_threads=COMPUTE_WGS + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=interpret_params(st),
    )(q, k, v, d_out, lse, di, seg, plan.q_info, plan.k_info, *extra)
    if st.groups > 1:  # sum the G query heads of each kv head, in float32
        group_sum = lambda x: x.reshape(b, t, kh, st.groups, hp).astype(jnp.float32).sum(3)
        return group_sum(dk).astype(dtype), group_sum(dv).astype(dtype)
    return dk, dv
