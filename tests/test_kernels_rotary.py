"""Fused partial rotary (Pallas, interpret mode on CPU) against the pure-jnp reference.

Tolerances: float32 |kernel - reference| <= 1e-6 (same float32 angle values and cos/sin; only
a - b versus a + (-b) + 0 evaluation order differs, measured 2.4e-7); bfloat16: equal up to one
bf16 rounding of the rotated dims, 1e-2 (measured 0). The dims past rotary_dim pass through
bit-exactly in every dtype.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from phi_jax.kernels import reference_rotary, rotary
from phi_jax.kernels.rope import RopeScaling, inverse_frequencies
from phi_jax.kernels.rotary_pallas import rotary_pallas

TOL = {jnp.float32: 1e-6, jnp.bfloat16: 1e-2}


@pytest.mark.parametrize("head_dim,rotary_dim,dtype,length", [
    (80, 32, jnp.float32, 20),   # phi-2: factor 0.4, T not a multiple of the block
    (64, 32, jnp.bfloat16, 16),  # phi-1 / phi-1.5: factor 0.5
    (128, 128, jnp.float32, 12),  # full rotary
])
def test_rotary_matches_reference_values_and_grads(head_dim, rotary_dim, dtype, length):
    ks = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(ks[0], (2, length, 3, head_dim)).astype(dtype)
    positions = jax.random.randint(ks[1], (2, length), 0, 4096)  # packed: arbitrary restarts
    cot = jax.random.normal(ks[2], x.shape).astype(dtype)
    kernel = lambda x: rotary_pallas(x, positions, rotary_dim=rotary_dim, theta=10000.0,
                                     block_t=8, interpret=True)
    ref = lambda x: reference_rotary(x, positions, rotary_dim=rotary_dim, theta=10000.0)
    got, got_vjp = jax.vjp(kernel, x)
    want, want_vjp = jax.vjp(ref, x)
    assert got.dtype == dtype
    np.testing.assert_array_equal(np.asarray(got[..., rotary_dim:]),
                                  np.asarray(x[..., rotary_dim:]))
    tol = TOL[dtype]
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=tol)
    np.testing.assert_allclose(np.asarray(got_vjp(cot)[0], np.float32),
                               np.asarray(want_vjp(cot)[0], np.float32), atol=tol)


LONGROPE = RopeScaling("longrope", factor=32.0, original_max_len=64,
                       short_factor=tuple(1.0 + 0.05 * i for i in range(24)),
                       long_factor=tuple(1.0 + 2.5 * i for i in range(24)), attention_factor=1.19)


@pytest.mark.parametrize("max_position", [50, 4000])  # short factors, then long ones
def test_scaled_rotary_kernel_matches_reference(max_position):
    """Phi-4-mini's shape: head dim 64 here with R = 48 (factor 0.75), longrope with its
    attention factor; the dims past R still pass through bit-exactly."""
    ks = jax.random.split(jax.random.key(2), 3)
    x = jax.random.normal(ks[0], (2, 10, 2, 64))
    positions = jax.random.randint(ks[1], (2, 10), 0, max_position)
    cot = jax.random.normal(ks[2], x.shape)
    kernel = lambda x: rotary_pallas(x, positions, rotary_dim=48, scaling=LONGROPE, block_t=8,
                                     interpret=True)
    ref = lambda x: reference_rotary(x, positions, rotary_dim=48, scaling=LONGROPE)
    got, got_vjp = jax.vjp(kernel, x)
    want, want_vjp = jax.vjp(ref, x)
    np.testing.assert_array_equal(np.asarray(got[..., 48:]), np.asarray(x[..., 48:]))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
    np.testing.assert_allclose(np.asarray(got_vjp(cot)[0]), np.asarray(want_vjp(cot)[0]), atol=1e-5)
    # the rotated pairs' norms grow by exactly the attention factor
    pair = lambda y: jnp.hypot(y[..., :24], y[..., 24:48])
    np.testing.assert_allclose(np.asarray(pair(got)), 1.19 * np.asarray(pair(x)), rtol=1e-5)


def test_llama3_frequencies_known_answer():
    """Llama 3.1's rule by hand: wavelengths under 8192/4 kept, over 8192/1 divided by 8, and a
    linear blend of the two in between."""
    scaling = RopeScaling("llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_len=8192)
    plain = np.asarray(inverse_frequencies(128, 500000.0))
    got = np.asarray(inverse_frequencies(128, 500000.0, scaling))
    wavelen = 2 * np.pi / plain
    np.testing.assert_array_equal(got[wavelen < 2048], plain[wavelen < 2048])
    np.testing.assert_allclose(got[wavelen > 8192], plain[wavelen > 8192] / 8, rtol=1e-6)
    mid = (wavelen >= 2048) & (wavelen <= 8192)
    smooth = (8192 / wavelen[mid] - 1) / 3
    np.testing.assert_allclose(got[mid], (1 - smooth) * plain[mid] / 8 + smooth * plain[mid], rtol=1e-5)
    assert mid.any() and (wavelen < 2048).any() and (wavelen > 8192).any()


def test_rotary_is_a_rotation_and_relative():
    """Known answers independent of the reference: norms of rotated pairs are kept, and the
    score of q at position p against k at position p' depends only on p - p'."""
    ks = jax.random.split(jax.random.key(1), 2)
    q = jax.random.normal(ks[0], (1, 1, 1, 64))
    k = jax.random.normal(ks[1], (1, 1, 1, 64))
    rot = lambda x, p: rotary(x, jnp.array([[p]]), rotary_dim=32, impl="pallas", interpret=True)
    score = lambda pq, pk: float(jnp.sum(rot(q, pq) * rot(k, pk)))
    assert abs(score(7, 3) - score(104, 100)) < 1e-4
    np.testing.assert_allclose(float(jnp.linalg.norm(rot(q, 123))), float(jnp.linalg.norm(q)),
                               rtol=1e-6)


def test_rotary_dispatch_errors():
    x = jnp.zeros((1, 4, 2, 64))
    with pytest.raises(ValueError, match="'xla' on cpu"):
        rotary(x, jnp.zeros((1, 4), jnp.int32), rotary_dim=32, impl="cudnn")
    with pytest.raises(ValueError, match="rotary_dim"):
        rotary(x, jnp.zeros((1, 4), jnp.int32), rotary_dim=30 + 1, impl="pallas")
