"""Fused partial rotary embedding as a Pallas kernel (TPU style; interpret mode on CPU).

Letters: B batch, T length, N heads, H head dim, R rotary dim (the first R of H dims rotate).

One pass over x: the angles are computed in the kernel from integer positions, so no [B,T,R]
cos/sin table goes through memory. "Rotate half" is written without lane slicing or
concatenation, which TPU lanes dislike: with per-lane tables over the full head dim,

    out = x * cos + roll(x, -R/2) * sin_lo + roll(x, R/2) * sin_hi

where cos = 1 and sin_lo = sin_hi = 0 outside the rotary dims, so those dims pass through
bit-exactly. The rotation is orthogonal, so the backward pass is the same kernel with the
angles negated.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from phi_jax.kernels.rotary import inverse_frequencies


def _rotary_kernel(pos_ref, freq_ref, x_ref, o_ref, *, rotary_dim: int, inverse: bool):
    head_dim = x_ref.shape[-1]
    half = rotary_dim // 2
    angles = pos_ref[...].astype(jnp.float32) * freq_ref[...]  # [bt,1] * [1,H] -> [bt,H]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    if inverse:
        sin = -sin
    lane = lax.broadcasted_iota(jnp.int32, angles.shape, 1)
    sin_lo = jnp.where(lane < half, -sin, 0.0)  # pairs x[d] with x[d + R/2]
    sin_hi = jnp.where((lane >= half) & (lane < rotary_dim), sin, 0.0)  # with x[d - R/2]
    x = x_ref[...].astype(jnp.float32)  # [bt,N,H]
    ahead = pltpu.roll(x, head_dim - half, 2)  # ahead[..., d] = x[..., d + R/2]
    behind = pltpu.roll(x, half, 2)  # behind[..., d] = x[..., d - R/2]
    out = x * cos[:, None, :] + ahead * sin_lo[:, None, :] + behind * sin_hi[:, None, :]
    o_ref[...] = out.astype(o_ref.dtype)


def _frequencies(rotary_dim: int, head_dim: int, theta: float) -> jax.Array:
    """[1,H]: the inverse frequency of each lane (0 beyond R), the reference's own values."""
    inv_freq = inverse_frequencies(rotary_dim, theta)  # [R/2]
    rest = jnp.zeros(head_dim - rotary_dim, jnp.float32)
    return jnp.concatenate([inv_freq, inv_freq, rest])[None]


def _apply(x, positions, rotary_dim: int, theta: float, inverse: bool, block_t: int, interpret):
    b, t, n, h = x.shape
    bt = t if t <= block_t else block_t
    tp = -(-t // bt) * bt
    pos = positions.astype(jnp.int32)
    if tp != t:
        x = jnp.pad(x, ((0, 0), (0, tp - t), (0, 0), (0, 0)))
        pos = jnp.pad(pos, ((0, 0), (0, tp - t)))
    out = pl.pallas_call(
        functools.partial(_rotary_kernel, rotary_dim=rotary_dim, inverse=inverse),
        grid=(b, tp // bt),
        in_specs=[pl.BlockSpec((None, bt, 1), lambda bi, ti: (bi, ti, 0)),
                  pl.BlockSpec((1, h), lambda bi, ti: (0, 0)),
                  pl.BlockSpec((None, bt, n, h), lambda bi, ti: (bi, ti, 0, 0))],
        out_specs=pl.BlockSpec((None, bt, n, h), lambda bi, ti: (bi, ti, 0, 0)),
        out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel")),
        interpret=interpret,
        name="phi_rotary_bwd" if inverse else "phi_rotary",
    )(pos[:, :, None], _frequencies(rotary_dim, h, theta), x)
    return out[:, :t]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _rotary(x, positions, rotary_dim, theta, block_t, interpret):
    return _apply(x, positions, rotary_dim, theta, False, block_t, interpret)


def _rotary_fwd(x, positions, rotary_dim, theta, block_t, interpret):
    return _rotary(x, positions, rotary_dim, theta, block_t, interpret), positions


def _rotary_bwd(rotary_dim, theta, block_t, interpret, positions, g):
    return _apply(g, positions, rotary_dim, theta, True, block_t, interpret), None


_rotary.defvjp(_rotary_fwd, _rotary_bwd)


def rotary_pallas(x: jax.Array, positions: jax.Array, *, rotary_dim: int, theta: float = 10000.0,
                  block_t: int = 256, interpret: object = False) -> jax.Array:
    """Partial rotary with the semantics of `reference_rotary`.

    Args:
      x: [B,T,N,H] queries or keys.
      positions: [B,T] integer positions.
      rotary_dim: R, even, <= H.
      block_t: rows of T per grid step.
      interpret: False (Mosaic), True or a `pltpu.InterpretParams` (CPU).
    Returns:
      [B,T,N,H] in x's dtype.
    """
    if rotary_dim % 2 or not 0 < rotary_dim <= x.shape[-1]:
        raise ValueError(f"rotary_dim must be even and in (0, {x.shape[-1]}], got {rotary_dim}")
    if positions.shape != x.shape[:2]:
        raise ValueError(f"positions {positions.shape} must be [B,T] = {x.shape[:2]}")
    return _rotary(x, positions, rotary_dim, float(theta), block_t, interpret)
