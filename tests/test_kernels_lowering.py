"""The accelerator lowerings, checked without an accelerator.

* `jax.export(..., platforms=["tpu"])` runs the Mosaic TPU lowering of every Pallas TPU kernel
  (block-shape rules, supported primitives); `platforms=["cuda"]` runs the Mosaic GPU lowering of
  the Hopper kernels (layout inference, wgmma/TMA shapes). What only the device compiler checks
  (libtpu's Mosaic passes, ptxas, register allocation) and speed stay untested here.
* The Mosaic GPU kernels also run in the Mosaic GPU interpreter on CPU: the same kernel skeleton
  (warp-specialized pipeline, mbarriers, TMA copies, block skipping, masks, online softmax), with
  the substitutions listed in `flash_attention_gpu._Ops`. bf16 tolerance as in
  test_kernels_attention: 2e-2 on values, 1e-2 * max|grad| on gradients.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from phi_jax.kernels import reference_attention
from phi_jax.kernels.decode_attention import cached_flash_attention
from phi_jax.kernels.flash_attention import BlockSizes, flash_attention
from phi_jax.kernels.flash_attention_gpu import GpuBlockSizes, flash_attention_gpu
from phi_jax.kernels.rotary_pallas import rotary_pallas

TPU_BLOCKS = BlockSizes(block_q=128, block_k=128, block_q_bwd=128, block_k_bwd=128)


def spec(*shape, dtype=jnp.bfloat16):
    return jax.ShapeDtypeStruct(shape, dtype)


def export(fn, platform, *args):
    return jax.export.export(jax.jit(fn), platforms=[platform])(*args)


def forward_and_grads(attend):
    def fn(q, k, v, seg):
        out, vjp = jax.vjp(lambda *a: attend(*a, seg), q, k, v)
        return out, vjp(out)
    return fn


@pytest.mark.parametrize("head_dim,groups,causal", [(64, 1, True), (80, 4, True), (128, 2, False)])
def test_tpu_flash_attention_lowers(head_dim, groups, causal):
    b, t, kh = 1, 384, 2
    attend = lambda q, k, v, seg: flash_attention(q, k, v, segment_ids=seg, causal=causal,
                                                  block_sizes=TPU_BLOCKS)
    module = export(forward_and_grads(attend), "tpu", spec(b, t, kh * groups, head_dim),
                    spec(b, t, kh, head_dim), spec(b, t, kh, head_dim),
                    spec(b, t, dtype=jnp.int32)).mlir_module()
    assert module.count("tpu_custom_call") >= 3  # forward, dq, dk/dv


def test_tpu_decode_and_rotary_lower():
    export(lambda q, k, v, s: cached_flash_attention(q, k, v, q_start=s), "tpu",
           spec(2, 1, 8, 80), spec(2, 2, 512, 80), spec(2, 2, 512, 80), spec(2, dtype=jnp.int32))
    grad = jax.grad(lambda x, p: rotary_pallas(x, p, rotary_dim=32).astype(jnp.float32).sum())
    export(grad, "tpu", spec(2, 256, 32, 80), spec(2, 256, dtype=jnp.int32))


@pytest.mark.parametrize("head_dim,groups,causal,segments", [
    (64, 1, True, True), (80, 4, True, False), (128, 2, False, True)])
def test_gpu_flash_attention_lowers_for_hopper(head_dim, groups, causal, segments):
    b, t, kh = 1, 384, 2
    attend = lambda q, k, v, seg: flash_attention_gpu(
        q, k, v, segment_ids=seg if segments else None, causal=causal)
    module = export(forward_and_grads(attend), "cuda", spec(b, t, kh * groups, head_dim),
                    spec(b, t, kh, head_dim), spec(b, t, kh, head_dim),
                    spec(b, t, dtype=jnp.int32)).mlir_module()
    assert module.count("mosaic_gpu") >= 3  # forward, dq, dk/dv


def test_gpu_kernel_rejects_what_it_cannot_run():
    x = jnp.zeros((1, 64, 2, 64), jnp.float32)
    with pytest.raises(ValueError, match="bfloat16 or float16"):
        flash_attention_gpu(x, x, x)
    y = jnp.zeros((1, 64, 2, 256), jnp.bfloat16)
    with pytest.raises(ValueError, match="at most 128"):
        flash_attention_gpu(y, y, y)


@pytest.mark.slow
def test_gpu_kernel_matches_reference_in_mosaic_gpu_interpreter():
    """GQA 2, head dim 80 (padded to 128), ragged T = 120 (padded to 128), two documents and
    padding, causal: values and gradients. (The interpreter runs each warpgroup as a thread that
    blocks in XLA callbacks: it needs the 8 host devices conftest sets up, or it can starve.)"""
    b, t, n, kh, h = 1, 120, 2, 1, 80
    ks = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(ks[0], (b, t, n, h), jnp.bfloat16)
    k = jax.random.normal(ks[1], (b, t, kh, h), jnp.bfloat16)
    v = jax.random.normal(ks[2], (b, t, kh, h), jnp.bfloat16)
    cot = jax.random.normal(ks[3], (b, t, n, h), jnp.bfloat16)
    seg = jnp.asarray([[1] * 50 + [2] * 60 + [0] * 10], jnp.int32)
    blocks = GpuBlockSizes(block_kv=64, block_kv_dq=64, block_q_dkv=64)

    def values_and_grads(fn, *args):
        out, vjp = jax.vjp(fn, *args)
        return (out, *vjp(cot.astype(out.dtype)))

    got = values_and_grads(lambda q, k, v: flash_attention_gpu(
        q, k, v, segment_ids=seg, block_sizes=blocks, interpret=True), q, k, v)
    want = values_and_grads(lambda q, k, v: reference_attention(q, k, v, segment_ids=seg),
                            *(x.astype(jnp.float32) for x in (q, k, v)))
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        g, w = np.asarray(g, np.float32), np.asarray(w)
        tol = 2e-2 if name == "out" else 1e-2 * max(1.0, np.abs(w).max())
        assert np.abs(g - w).max() <= tol, (name, np.abs(g - w).max(), tol)
