"""Flash attention (Pallas, interpret mode on CPU) against the pure-jnp reference and against
independent implementations: jax.nn.dot_product_attention with an equivalent mask, and jax's own
Pallas TPU flash attention.

Tolerances, per dtype (inputs ~N(0,1), outputs and gradients of size ~1-10):
  float32:  |kernel - reference| <= 1e-5 (values), 2e-5 (gradients); only the summation order
            differs (measured: <= 2e-6).
  bfloat16: the reference runs in float32 on the same bf16 inputs; the kernel rounds p and dS to
            bf16 before its matmuls (as every flash kernel does) and its outputs to bf16, so we
            allow 2e-2 absolute on values and 1e-2 * max|grad| on gradients (measured: <= 7.6e-3
            and <= 5e-3 * max|grad|; the reference itself, run in bf16, is off by 7.6e-3 on values).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from phi_jax.kernels import attention, reference_attention
from phi_jax.kernels import block_plan as bp
from phi_jax.kernels.cudnn_attention import cudnn_attention
from phi_jax.kernels.flash_attention import BlockSizes, flash_attention

TOL = {
    jnp.float32: {"out": 1e-5, "grad": 2e-5},
    jnp.bfloat16: {"out": 2e-2, "grad": 1e-2},  # gradient tolerance is relative to max|grad|
}
SMALL = BlockSizes(block_q=16, block_k=16, block_q_bwd=16, block_k_bwd=16)
MIXED = BlockSizes(block_q=8, block_k=16, block_q_bwd=16, block_k_bwd=8)


def packed_segments(batch: int, length: int) -> np.ndarray:
    """Row 0: three documents then padding; row 1: one document then padding; more rows repeat."""
    rows = []
    for r in range(batch):
        seg = np.zeros(length, np.int32)
        if r % 2 == 0:
            a, b = length // 4, length // 4 + length // 3
            seg[:a], seg[a:b], seg[b:length - 5] = 1, 2, 3
        else:
            seg[:length - length // 2] = 7
        rows.append(seg)
    return np.stack(rows)


def make_inputs(batch, length, heads, kv_heads, head_dim, dtype, seed=0):
    ks = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(ks[0], (batch, length, heads, head_dim)).astype(dtype)
    k = jax.random.normal(ks[1], (batch, length, kv_heads, head_dim)).astype(dtype)
    v = jax.random.normal(ks[2], (batch, length, kv_heads, head_dim)).astype(dtype)
    cot = jax.random.normal(ks[3], (batch, length, heads, head_dim)).astype(dtype)
    return q, k, v, cot


def values_and_grads(fn, q, k, v, cot):
    out, vjp = jax.vjp(fn, q, k, v)
    return (out, *vjp(cot))


def assert_close(got, want, dtype, what):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert np.all(np.isfinite(got)), f"{what}: non-finite values"
    if what == "out":
        tol = TOL[dtype]["out"]
    else:
        tol = TOL[dtype]["grad"] * (1.0 if dtype == jnp.float32 else max(1.0, np.abs(want).max()))
    err = np.abs(got - want).max()
    assert err <= tol, f"{what}: max error {err:.3g} > {tol:.3g}"


# head dim x GQA ratio x causal x segments x dtype x length: every value of every factor and the
# pairs that matter (80 with padding inside the kernel, GQA with segments, ragged lengths with and
# without segment ids), in 9 compilations rather than 96.
GRID = [
    # head_dim, groups, causal, segments, dtype, length, blocks
    (64, 1, True, True, jnp.float32, 40, SMALL),
    (64, 4, True, False, jnp.bfloat16, 48, SMALL),
    (80, 1, False, True, jnp.bfloat16, 40, SMALL),
    (80, 4, True, True, jnp.float32, 33, MIXED),
    (128, 1, True, False, jnp.float32, 37, SMALL),
    (128, 4, False, True, jnp.bfloat16, 48, MIXED),
    (64, 4, False, False, jnp.float32, 32, MIXED),
    (80, 1, True, False, jnp.bfloat16, 64, SMALL),
    (128, 1, True, True, jnp.bfloat16, 40, MIXED),
]


@pytest.mark.slow
@pytest.mark.parametrize("head_dim,groups,causal,segments,dtype,length,blocks", GRID)
def test_flash_matches_reference(head_dim, groups, causal, segments, dtype, length, blocks):
    kv_heads = 2 if groups == 1 else 1
    q, k, v, cot = make_inputs(2, length, kv_heads * groups, kv_heads, head_dim, dtype)
    seg = jnp.asarray(packed_segments(2, length)) if segments else None
    kernel = lambda q, k, v: flash_attention(q, k, v, segment_ids=seg, causal=causal,
                                             block_sizes=blocks, interpret=True)
    ref = lambda q, k, v: reference_attention(q, k, v, segment_ids=seg, causal=causal)
    got = jax.jit(lambda *a: values_and_grads(kernel, *a))(q, k, v, cot)
    up = [x.astype(jnp.float32) for x in (q, k, v, cot)]
    want = values_and_grads(ref, *up)
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        assert g.dtype == dtype
        assert_close(g, w, dtype, name)


def test_padding_rows_are_zero_and_gradients_finite():
    """Segment id 0 rows: output exactly 0 in kernel and reference, no gradient flows from them."""
    q, k, v, cot = make_inputs(2, 40, 2, 2, 64, jnp.float32, seed=1)
    seg = jnp.asarray(packed_segments(2, 40))
    pad = np.asarray(seg == 0)
    fn = lambda q, k, v: flash_attention(q, k, v, segment_ids=seg, block_sizes=SMALL,
                                         interpret=True)
    out, dq, dk, dv = jax.jit(lambda *a: values_and_grads(fn, *a))(q, k, v, cot)
    ref_out = reference_attention(q, k, v, segment_ids=seg)
    assert np.all(np.asarray(out)[pad] == 0.0)
    assert np.all(np.asarray(ref_out)[pad] == 0.0)
    assert np.all(np.asarray(dq)[pad] == 0.0)  # a padding query influences nothing
    assert np.all(np.asarray(dk)[pad] == 0.0) and np.all(np.asarray(dv)[pad] == 0.0)
    assert all(np.all(np.isfinite(np.asarray(x))) for x in (out, dq, dk, dv))


def test_skipped_tiles_are_not_read():
    """NaN in keys/values no query may see: a tile that is computed (even fully masked) would turn
    p=0 times NaN into NaN, so finite outputs prove the causal and segment skipping."""
    b, t, h = 1, 64, 64
    q, k, v, _ = make_inputs(b, t, 2, 2, h, jnp.float32, seed=2)
    seg = np.ones((b, t), np.int32)
    seg[0, 32:] = 2  # documents [0, 32) and [32, 64): tile (q 0-15, k 16-31) is needed
    poison = np.zeros((b, t, 1, 1), np.float32)
    poison[0, 48:] = np.nan  # keys 48..63: only queries >= 48 may see them (causal)
    v_bad = v + poison
    out = flash_attention(q, k, v_bad, segment_ids=jnp.asarray(seg), block_sizes=SMALL,
                          interpret=True)
    want = reference_attention(q, k, v, segment_ids=jnp.asarray(seg))
    np.testing.assert_allclose(np.asarray(out[0, :48]), np.asarray(want[0, :48]), atol=2e-5)
    # Segment skipping without causality: document 1 never reads document 2's NaN tiles.
    out = flash_attention(q, k, v_bad, segment_ids=jnp.asarray(seg), causal=False,
                          block_sizes=SMALL, interpret=True)
    assert np.all(np.isfinite(np.asarray(out[0, :32])))


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("layout", ["contiguous", "interleaved"])
def test_block_plan_matches_dense_mask(causal, layout):
    """Empty tiles hold no visible entry, full tiles no masked one; for contiguous documents the
    plan is exact (every tile with a visible entry is visited)."""
    t, bq, bk = 48, 8, 16
    if layout == "contiguous":
        seg = packed_segments(2, t)
    else:  # documents that are not contiguous: the plan must stay sound
        seg = np.stack([np.arange(t) % 3, (np.arange(t) // 5) % 2 * 4])
    plan = bp.make_block_plan(jnp.asarray(seg), bq, bk, causal)
    q_info, k_info = np.asarray(plan.q_info), np.asarray(plan.k_info)
    nq, nk = t // bq, t // bk
    idx = np.arange(t)
    for b in range(2):
        dense = (seg[b][:, None] == seg[b][None, :]) & (seg[b][:, None] != 0)
        if causal:
            dense &= idx[None, :] <= idx[:, None]
        for i in range(nq):
            for j in range(nk):
                tile = dense[i * bq:(i + 1) * bq, j * bk:(j + 1) * bk]
                visible, full = bp.tile_status(q_info, k_info, b, i, j, nq, nk, bq, bk, causal)
                assert bool(visible) or not tile.any(), (b, i, j)
                assert not bool(full) or tile.all(), (b, i, j)
                if layout == "contiguous":
                    assert bool(visible) == tile.any(), (b, i, j)
                    assert bool(full) == tile.all(), (b, i, j)
            first = bp.field(q_info, b, i, nq, bp.FIRST)
            last = bp.field(q_info, b, i, nq, bp.LAST)
            needed = [j for j in range(nk) if dense[i * bq:(i + 1) * bq, j * bk:(j + 1) * bk].any()]
            if needed:
                assert first <= min(needed) and last >= max(needed)


@pytest.mark.parametrize("groups", [1, 4])
def test_matches_dot_product_attention_with_segment_mask(groups):
    """Independent reference: jax.nn.dot_product_attention (XLA) with the boolean segment mask and
    is_causal — the same call the cudnn path makes on GPU."""
    q, k, v, _ = make_inputs(2, 40, 2 * groups, 2, 80, jnp.float32, seed=3)
    seg = jnp.asarray(packed_segments(2, 40))
    want = cudnn_attention(q, k, v, segment_ids=seg, causal=True, implementation="xla")
    got = flash_attention(q, k, v, segment_ids=seg, block_sizes=MIXED, interpret=True)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5)
    np.testing.assert_allclose(np.asarray(reference_attention(q, k, v, segment_ids=seg)),
                               np.asarray(want), atol=2e-5)


@pytest.mark.slow
def test_matches_jax_pallas_tpu_flash_attention():
    """Independent reference: jax.experimental.pallas.ops.tpu.flash_attention in TPU interpret
    mode (it needs 128-multiples and equal head counts; it lets padding rows attend to padding,
    so only non-padding rows are compared). Values and gradients."""
    from jax.experimental.pallas.ops.tpu import flash_attention as jax_fa

    b, t, n, h = 1, 128, 2, 64
    q, k, v, cot = make_inputs(b, t, n, n, h, jnp.float32, seed=4)
    seg = jnp.asarray(packed_segments(b, t))
    keep = np.asarray(seg != 0)[:, :, None, None]
    cot = cot * keep

    def theirs(q, k, v):
        tr = lambda x: jnp.swapaxes(x, 1, 2)  # [B,T,N,H] <-> [B,N,T,H]
        out = jax_fa.flash_attention(tr(q), tr(k), tr(v), segment_ids=jax_fa.SegmentIds(seg, seg),
                                     causal=True, sm_scale=h ** -0.5)
        return tr(out)

    with pltpu.force_tpu_interpret_mode():
        want = values_and_grads(theirs, q, k, v, cot)
    ours = lambda q, k, v: flash_attention(q, k, v, segment_ids=seg, block_sizes=BlockSizes(
        32, 64, 64, 32), interpret=True)
    got = values_and_grads(ours, q, k, v, cot)
    np.testing.assert_allclose(np.asarray(got[0]) * keep, np.asarray(want[0]) * keep, atol=2e-5)
    for g, w in zip(got[1:], want[1:]):  # padding rows get no cotangent, so all rows compare
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-4)


def test_dispatch_pallas_on_cpu_runs_interpret_mode():
    q, k, v, _ = make_inputs(1, 24, 4, 2, 64, jnp.float32, seed=5)
    seg = jnp.asarray(packed_segments(1, 24))
    got = attention(q, k, v, segment_ids=seg, impl="pallas")  # interpret=None -> interpret on cpu
    want = attention(q, k, v, segment_ids=seg, impl="xla")
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5)


@pytest.mark.parametrize("impl", ["cudnn", "triton"])
def test_unsupported_combination_names_itself_and_the_alternatives(impl):
    q = jnp.zeros((1, 8, 2, 64))
    with pytest.raises(ValueError) as err:
        attention(q, q, q, impl=impl)
    assert repr(impl) in str(err.value) and "'pallas'" in str(err.value)
    assert "supported" in str(err.value)
