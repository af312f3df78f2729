"""Cached (decode / prefill) attention kernel against the pure-jnp reference and against
jax.nn.dot_product_attention with the equivalent slot mask.

Tolerances: float32 1e-5 absolute (measured <= 5e-7); bfloat16 2e-2 absolute against the float32
reference on the same bf16 inputs (p is rounded to bf16 before the PV matmul).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from phi_jax.kernels import cached_attention
from phi_jax.kernels.attention import (reference_cached_attention,
                                       reference_cached_attention_before_write)
from phi_jax.kernels.cudnn_attention import cudnn_cached_attention
from phi_jax.kernels.decode_attention import cached_flash_attention

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}


@pytest.mark.parametrize("new_tokens,groups,head_dim,slots,dtype", [
    (1, 1, 64, 48, jnp.float32),    # decode, MHA
    (1, 4, 80, 64, jnp.bfloat16),   # decode, GQA, phi-2 head dim
    (6, 4, 64, 40, jnp.float32),    # prefill of 6 tokens; 40 slots: blocks of 8 divide it
    (5, 1, 128, 36, jnp.float32),   # 36 slots: no aligned divisor, the cache gets padded
])
def test_cached_kernel_matches_reference(new_tokens, groups, head_dim, slots, dtype):
    b, kv_heads = 3, 2
    ks = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(ks[0], (b, new_tokens, kv_heads * groups, head_dim)).astype(dtype)
    k_cache = jax.random.normal(ks[1], (b, kv_heads, slots, head_dim)).astype(dtype)  # [B,K,S,H]
    v_cache = jax.random.normal(ks[2], (b, kv_heads, slots, head_dim)).astype(dtype)
    q_start = jnp.array([0, 13, slots - new_tokens], jnp.int32)  # first slot, middle, last slot
    got = cached_flash_attention(q, k_cache, v_cache, q_start=q_start, block_t=4, block_s=16,
                                 interpret=True)
    up = [x.astype(jnp.float32) for x in (q, k_cache, v_cache)]
    want = reference_cached_attention(*up, q_start=q_start)
    assert got.dtype == dtype
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want), atol=TOL[dtype])
    independent = cudnn_cached_attention(*up, q_start=q_start, implementation="xla")
    np.testing.assert_allclose(np.asarray(want), np.asarray(independent), atol=1e-5)


def test_cached_attention_dispatch_and_stale_slots():
    """Slots past each sequence's query hold stale data (NaN here): it never leaks into the output,
    also inside the cache block that holds the query's own slot."""
    b, s, h = 2, 32, 64
    ks = jax.random.split(jax.random.key(1), 3)
    q = jax.random.normal(ks[0], (b, 1, 2, h))
    k_cache = jax.random.normal(ks[1], (b, 2, s, h))
    v_cache = jax.random.normal(ks[2], (b, 2, s, h))
    q_start = jnp.array([5, 20], jnp.int32)
    stale = (jnp.arange(s)[None, None, :, None] > q_start[:, None, None, None])
    v_bad = jnp.where(stale, jnp.nan, v_cache)
    got = cached_attention(q, k_cache, v_bad, q_start=q_start, impl="pallas")
    want = cached_attention(q, k_cache, v_cache, q_start=q_start, impl="xla")
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
    with pytest.raises(ValueError, match="supported"):
        cached_attention(q, k_cache, v_cache, q_start=q_start, impl="cudnn")


@pytest.mark.parametrize("new_tokens,groups,window", [(1, 1, None), (1, 3, None), (1, 2, 5), (4, 2, None),
                                                      (4, 1, 3)])
def test_attention_before_the_write_equals_attention_after_it(new_tokens, groups, window):
    """Reading the cache as it was plus the new keys (the CPU decode step) equals writing the new
    keys into their slots first and attending over the cache (the reference), windowed or not;
    what the unwritten slots hold (large garbage here) never matters."""
    b, kv_heads, slots, h = 3, 2, 24, 16
    ks = jax.random.split(jax.random.key(5), 5)
    q = jax.random.normal(ks[0], (b, new_tokens, kv_heads * groups, h))
    k_new = jax.random.normal(ks[1], (b, new_tokens, kv_heads, h))
    v_new = jax.random.normal(ks[2], (b, new_tokens, kv_heads, h))
    k_cache = jax.random.normal(ks[3], (b, kv_heads, slots, h))
    v_cache = jax.random.normal(ks[4], (b, kv_heads, slots, h))
    q_start = jnp.array([0, 9, slots - new_tokens], jnp.int32)
    slot = jnp.arange(slots)[None, None, :, None]
    unwritten = slot >= q_start[:, None, None, None]
    k_before, v_before = (jnp.where(unwritten, 1e4 * x[::-1], x) for x in (k_cache, v_cache))
    got = reference_cached_attention_before_write(q, k_before, v_before, k_new, v_new,
                                                  q_start=q_start, window=window)
    rows = jnp.arange(b)[:, None]
    where = q_start[:, None] + jnp.arange(new_tokens)[None, :]
    k_after = k_cache.at[rows, :, where].set(k_new)
    v_after = v_cache.at[rows, :, where].set(v_new)
    if window is None:
        want = reference_cached_attention(q, k_after, v_after, q_start=q_start)
    else:  # the independent definition: jax.nn.dot_product_attention under the slot mask
        q_slot = where[:, :, None]
        mask = (jnp.arange(slots)[None, None, :] <= q_slot) & (jnp.arange(slots) > q_slot - window)
        rep = lambda x: jnp.repeat(x.transpose(0, 2, 1, 3), groups, axis=2)  # [B,S,N,H]
        want = jax.nn.dot_product_attention(q, rep(k_after), rep(v_after), mask=mask[:, None])
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
