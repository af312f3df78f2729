"""Flash attention for NVIDIA Hopper (sm_90a) as Mosaic GPU kernels: forward, dq and dk/dv.

Letters: B batch, T sequence length (padded to Tp), N query heads, K kv heads, G = N // K,
H head dim (padded to Hp, a multiple of 64), i / j query / key block index.

Why Mosaic GPU and not the Triton lowering: Triton is deprecated upstream (Mosaic GPU is the
default `pallas_call` GPU backend), and the H100 targets need what only Mosaic GPU exposes:
warpgroup matmuls (wgmma) with register operands, TMA copies, mbarriers and warp specialization.

Structure (FlashAttention-3 style): one CTA = two compute warpgroups, each owning 64 query rows
(forward, dq) or 64 key rows (dk/dv), plus one memory warpgroup that streams the other side's
tiles through a `stages`-deep ring of SMEM buffers with TMA. Only the tiles in the `BlockPlan`
range of the CTA are streamed; tiles that the plan marks empty for one warpgroup are skipped,
full tiles skip the mask arithmetic. Softmax runs in base 2 (exp2) with float32 statistics; the
log-sum-exp (base 2) is the only residual. dk/dv are produced per query head and summed over the
G heads of a kv head by XLA.

The backward kernels live in `flash_attention_gpu_bwd.py`, the shared sizes and the few switches
that let the GPU interpreter run the same kernels in `gpu_ops.py`.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from phi_jax.kernels import block_plan as bp
from phi_jax.kernels.flash_attention_gpu_bwd import compute_dkv, compute_dq
from phi_jax.kernels.gpu_ops import (COMPUTE_WGS, EMPTY_ROW_LSE, LOG2E, MASK_VALUE, ROWS,
                                     GpuBlockSizes, Ops, Static, interpret_params,
                                     memory_warpgroup, smem, union_range)


# ----------------------------------------------------------------------------- forward


def _fwd_kernel(q_ref, k_ref, v_ref, seg_ref, q_info, k_info, *refs, st: Static, nq: int,
                nk: int):
    ops = Ops(st.interpret)
    if st.interpret:
        kt_ref, out_ref, lse_ref, scratch = refs
    else:
        (out_ref, lse_ref, scratch), kt_ref = refs, None
    (q_smem, qseg_smem, lse_smem, k_smem, kt_smem, v_smem, kseg_smem, p_stage,
     q_bar, qseg_bar, k_bar, kseg_bar, kt_bar, v_bar, consumed) = scratch
    bq, bk, stages = ROWS, st.blocks.block_kv, st.blocks.stages
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
        plgpu.copy_gmem_to_smem(q_ref.at[b, rows, n], q_smem.at[wg], q_bar.at[wg])
        plgpu.copy_gmem_to_smem(seg_ref.at[b, rows], qseg_smem.at[wg], qseg_bar.at[wg])
        plgpu.barrier_wait(q_bar.at[wg])
        plgpu.barrier_wait(qseg_bar.at[wg])
        q_seg = ops.rows(qseg_smem.at[wg])
        stage = None if p_stage is None else p_stage.at[wg]

        def tile_step(masked, slot, j, carry):
            acc, m, l = carry
            kt = ops.transposed(k_smem.at[slot], None if kt_smem is None else kt_smem.at[slot])
            s = ops.matmul(q_smem.at[wg], kt, (bq, bk)) * (st.scale * LOG2E)
            if masked:
                k_seg = ops.cols(kseg_smem.at[slot])
                mask = ((lax.broadcast_in_dim(q_seg, s.shape, [0])
                         == lax.broadcast_in_dim(k_seg, s.shape, [1]))
                        & (lax.broadcast_in_dim(q_seg, s.shape, [0]) != 0))
                if st.causal:
                    mask = mask & (ops.iota(s.shape, 1) + j * bk <= ops.iota(s.shape, 0) + i * bq)
                s = jnp.where(mask, s, MASK_VALUE)
            m_new = jnp.maximum(m, s.max(axis=1))
            alpha = jnp.exp2(m - m_new)
            p = jnp.exp2(s - lax.broadcast_in_dim(m_new, s.shape, [0]))
            if masked:
                p = jnp.where(mask, p, 0.0)
            l = l * alpha + p.sum(axis=1)
            acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
            plgpu.barrier_wait(v_bar.at[slot])
            acc = ops.matmul_acc(acc, p.astype(v_smem.dtype), v_smem.at[slot], stage)
            return acc, m_new, l

        def kv_loop(step, carry):
            slot = lax.rem(step, jnp.int32(stages))
            j = first + step
            plgpu.barrier_wait(k_bar.at[slot])
            plgpu.barrier_wait(kseg_bar.at[slot])
            if kt_bar is not None:
                plgpu.barrier_wait(kt_bar.at[slot])
            visible, full = bp.tile_status(q_info, k_info, b, i, j, nq, nk, bq, bk, st.causal)

            def run(c):
                return lax.cond(full, functools.partial(tile_step, False, slot, j),
                                functools.partial(tile_step, True, slot, j), c)

            def skip(c):
                plgpu.barrier_wait(v_bar.at[slot])  # keep this warpgroup's barrier phases in step
                return c

            carry = lax.cond(visible, run, skip, carry)
            plgpu.barrier_arrive(consumed.at[slot])
            return carry

        init = (ops.zeros((bq, hp)), ops.full_rows(bq, MASK_VALUE), ops.full_rows(bq, 0.0))
        acc, m, l = lax.fori_loop(0, steps, kv_loop, init)
        seen = l > 0.0
        inv = jnp.where(seen, 1.0 / jnp.where(seen, l, 1.0), 0.0)
        q_smem.at[wg][...] = (acc * lax.broadcast_in_dim(inv, acc.shape, [0])).astype(q_smem.dtype)
        lse_smem.at[wg][...] = jnp.where(seen, m + jnp.log2(jnp.where(seen, l, 1.0)), EMPTY_ROW_LSE)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(q_smem.at[wg], out_ref.at[b, rows, n])
        plgpu.copy_smem_to_gmem(lse_smem.at[wg], lse_ref.at[b, n, rows])
        plgpu.wait_smem_to_gmem(0)

    def copies(step, slot):
        keys = pl.ds((first + step) * bk, bk)
        yield k_ref.at[b, keys, kvh], k_smem.at[slot], k_bar.at[slot]
        yield seg_ref.at[b, keys], kseg_smem.at[slot], kseg_bar.at[slot]
        if kt_ref is not None:
            yield kt_ref.at[b, kvh, :, keys], kt_smem.at[slot], kt_bar.at[slot]
        yield v_ref.at[b, keys, kvh], v_smem.at[slot], v_bar.at[slot]

    pl.when(wg == COMPUTE_WGS)(lambda: memory_warpgroup(steps, stages, consumed, copies))


def _forward(q, k, v, seg, plan: bp.BlockPlan, st: Static):
    """q [B,Tp,N,Hp], k/v [B,Tp,K,Hp], seg [B,Tp] -> out [B,Tp,N,Hp], lse (base 2) [B,N,Tp]."""
    b, t, n, hp = q.shape
    bk, stages = st.blocks.block_kv, st.blocks.stages
    nq, nk = t // ROWS, t // bk
    dtype = q.dtype
    extra = [jnp.transpose(k, (0, 2, 3, 1))] if st.interpret else []  # [B,K,Hp,Tp]
    scratch = [
        smem((COMPUTE_WGS, ROWS, hp), dtype),  # q, then the output
        plgpu.SMEM((COMPUTE_WGS, ROWS), jnp.int32),
        plgpu.SMEM((COMPUTE_WGS, ROWS), jnp.float32),
        smem((stages, bk, hp), dtype),
        smem((stages, hp, bk), dtype) if st.interpret else None,
        smem((stages, bk, hp), dtype),
        plgpu.SMEM((stages, bk), jnp.int32),
        smem((COMPUTE_WGS, ROWS, bk), dtype) if st.interpret else None,
        plgpu.Barrier(num_barriers=COMPUTE_WGS),  # q
        plgpu.Barrier(num_barriers=COMPUTE_WGS),  # q segment ids
        plgpu.Barrier(num_barriers=stages),  # k
        plgpu.Barrier(num_barriers=stages),  # k segment ids
        plgpu.Barrier(num_barriers=stages) if st.interpret else None,  # k transposed
        plgpu.Barrier(num_barriers=stages),  # v
        plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=stages),  # slot consumed
    ]
    kernel = functools.partial(_fwd_kernel, st=st, nq=nq, nk=nk)

    def entry(*refs):
        pl.run_scoped(lambda *s: kernel(*refs, s), *scratch, collective_axes="wg")

    return plgpu.kernel(
        entry,
        out_type=[jax.ShapeDtypeStruct(q.shape, dtype),
                  jax.ShapeDtypeStruct((b, n, t), jnp.float32)],
        grid=(n, t // (COMPUTE_WGS * ROWS), b),
        grid_names=("heads", "tiles", "batch"),
        num_threads=COMPUTE_WGS + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=interpret_params(st),
    )(q, k, v, seg, plan.q_info, plan.k_info, *extra)


# ----------------------------------------------------------------------------- custom_vjp


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _flash(q, k, v, seg, plans, st: Static):
    return _forward(q, k, v, seg, plans[0], st)[0]


def _flash_fwd(q, k, v, seg, plans, st: Static):
    out, lse = _forward(q, k, v, seg, plans[0], st)
    return out, (q, k, v, seg, plans, out, lse)


def _flash_bwd(st: Static, res, d_out):
    q, k, v, seg, plans, out, lse = res
    di = jnp.einsum("BTNH,BTNH->BNT", out.astype(jnp.float32), d_out.astype(jnp.float32))
    dq = compute_dq(q, k, v, d_out, lse, di, seg, plans[1], st)
    dk, dv = compute_dkv(q, k, v, d_out, lse, di, seg, plans[2], st)
    return dq, dk, dv, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _check_hopper() -> None:
    """wgmma exists on sm_90 only (Blackwell has tcgen05 instead): fail early and clearly.
    (Skipped when the default backend is not a GPU, e.g. when exporting for CUDA from a CPU.)"""
    if jax.default_backend() != "gpu":
        return
    device = jax.devices()[0]
    capability = str(getattr(device, "compute_capability", ""))
    if not capability.startswith("9."):
        raise ValueError(f"the Mosaic GPU attention kernel needs a Hopper GPU (sm_90); "
                         f"{device.device_kind} has compute capability {capability or 'unknown'}. "
                         "Use attention_impl='cudnn' or 'xla' on this GPU.")


def flash_attention_gpu(q: jax.Array, k: jax.Array, v: jax.Array, *,
                        segment_ids: jax.Array | None = None, causal: bool = True,
                        block_sizes: GpuBlockSizes | None = None,
                        interpret: bool = False) -> jax.Array:
    """Fused self-attention with the semantics of `reference_attention`, for Hopper GPUs.

    Args:
      q: [B,T,N,H]; k, v: [B,T,K,H] (bfloat16 or float16; K divides N).
      segment_ids: [B,T] int32, 0 = padding; None = one document per row.
      block_sizes: streamed tile sizes (multiples of 64) and pipeline depth.
      interpret: run in the Mosaic GPU interpreter (CPU) instead of compiling.
    Returns:
      [B,T,N,H] in q's dtype; rows of padding queries are 0.
    """
    b, t, n, h = q.shape
    kh = k.shape[2]
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        raise ValueError(f"the Mosaic GPU attention kernel needs bfloat16 or float16 inputs, got "
                         f"{q.dtype}; set ModelConfig.dtype='bfloat16' or attention_impl='xla'")
    if n % kh or k.shape != (b, t, kh, h) or v.shape != k.shape:
        raise ValueError(f"q {q.shape}, k {k.shape}, v {v.shape}: need k == v == [B,T,K,H] "
                         "with K dividing N")
    if not interpret:
        _check_hopper()
    blocks = block_sizes or GpuBlockSizes()
    for name in ("block_kv", "block_kv_dq", "block_q_dkv"):
        if getattr(blocks, name) % ROWS:
            raise ValueError(f"{name}={getattr(blocks, name)} must be a multiple of {ROWS}")
    step = math.lcm(COMPUTE_WGS * ROWS, blocks.block_kv, blocks.block_kv_dq, blocks.block_q_dkv)
    tp = _round_up(t, step)
    hp = _round_up(h, 64)  # SMEM tiles are (8, 64) with a 128-byte swizzle: pad 80 -> 128
    if hp > 128:  # the SMEM ring (about 160 KiB at Hp = 128) would not fit in 227 KiB
        raise ValueError(f"head dim {h} is not supported by the Mosaic GPU kernel (at most 128); "
                         "use attention_impl='cudnn' or 'xla'")
    seg = jnp.ones((b, t), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
    seg = jnp.pad(seg, ((0, 0), (0, tp - t)))
    pad = lambda x: jnp.pad(x, ((0, 0), (0, tp - t), (0, 0), (0, hp - h)))
    plans = (bp.make_block_plan(seg, ROWS, blocks.block_kv, causal),
             bp.make_block_plan(seg, ROWS, blocks.block_kv_dq, causal),
             bp.make_block_plan(seg, blocks.block_q_dkv, ROWS, causal))
    st = Static(causal=causal, scale=h ** -0.5, groups=n // kh, blocks=blocks,
                 interpret=interpret)
    out = _flash(pad(q), pad(k), pad(v), seg, plans, st)
    return out[:, :t, :, :h]
