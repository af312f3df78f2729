"""Fused partial rotary embedding as a Pallas kernel (TPU style; interpret mode on CPU).

Letters: B batch, T length, N heads, H head dim, R rotary dim (the first R of H dims rotate).

One pass over x: the angles are computed in the kernel from integer positions, so no [B,T,R]
cos/sin table goes through memory. "Rotate half" is written without lane slicing or
concatenation, which TPU lanes dislike: with per-lane tables over the full head dim,

    out = x * cos + roll(x, -R/2) * sin_lo + roll(x, R/2) * sin_hi

where cos = 1 and sin_lo = sin_hi = 0 outside the rotary dims, so those dims pass through
bit-exactly. The rotation is orthogonal (times longrope's attention factor, a scalar), so the
backward pass is the same kernel with the angles negated. The per-lane frequencies come in as a
[1,H] input computed by `phi_jax.kernels.rope` (longrope picks them per call from the positions).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from phi_jax.kernels.rope import (RopeScaling, attention_factor, call_inverse_frequencies,
                                  check_rotary_dim)


def _rotary_kernel(pos_ref, freq_ref, x_ref, o_ref, *, rotary_dim: int, scale: float,
                   inverse: bool):
    head_dim = x_ref.shape[-1]
    half = rotary_dim // 2
    angles = pos_ref[...].astype(jnp.float32) * freq_ref[...]  # [bt,1] * [1,H] -> [bt,H]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    if inverse:
        sin = -sin
    lane = lax.broadcasted_iota(jnp.int32, angles.shape, 1)
    if scale != 1.0:  # longrope's attention factor scales the rotated lanes only
        cos = jnp.where(lane < rotary_dim, cos * scale, cos)
        sin = sin * scale
    sin_lo = jnp.where(lane < half, -sin, 0.0)  # pairs x[d] with x[d + R/2]
    sin_hi = jnp.where((lane >= half) & (lane < rotary_dim), sin, 0.0)  # with x[d - R/2]
    x = x_ref[...].astype(jnp.float32)  # [bt,N,H]
    ahead = pltpu.roll(x, head_dim - half, 2)  # ahead[..., d] = x[..., d + R/2]
    behind = pltpu.roll(x, half, 2)  # behind[..., d] = x[..., d - R/2]
    out = x * cos[:, None, :] + ahead * sin_lo[:, None, :] + behind * sin_hi[:, None, :]
    o_ref[...] = out.astype(o_ref.dtype)


def _lane_frequencies(inv_freq: jax.Array, head_dim: int) -> jax.Array:
    """[1,H]: the inverse frequency of each lane (0 beyond R), the reference's own values."""
    rest = jnp.zeros(head_dim - 2 * inv_freq.shape[0], jnp.float32)
    return jnp.concatenate([inv_freq, inv_freq, rest])[None]


def _apply(x, positions, freq, rotary_dim: int, scale: float, inverse: bool, block_t: int,
           interpret):
    b, t, n, h = x.shape
    bt = t if t <= block_t else block_t
    tp = -(-t // bt) * bt
    pos = positions.astype(jnp.int32)
    if tp != t:
        x = jnp.pad(x, ((0, 0), (0, tp - t), (0, 0), (0, 0)))
        pos = jnp.pad(pos, ((0, 0), (0, tp - t)))
    out = pl.pallas_call(
        functools.partial(_rotary_kernel, rotary_dim=rotary_dim, scale=scale, inverse=inverse),
        grid=(b, tp // bt),
        in_specs=[pl.BlockSpec((None, bt, 1), lambda bi, ti: (bi, ti, 0)),
                  pl.BlockSpec((1, h), lambda bi, ti: (0, 0)),
                  pl.BlockSpec((None, bt, n, h), lambda bi, ti: (bi, ti, 0, 0))],
        out_specs=pl.BlockSpec((None, bt, n, h), lambda bi, ti: (bi, ti, 0, 0)),
        out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel")),
        interpret=interpret,
        name="phi_rotary_bwd" if inverse else "phi_rotary",
    )(pos[:, :, None], freq, x)
    return out[:, :t]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _rotary(x, positions, freq, rotary_dim, scale, block_t, interpret):
    return _apply(x, positions, freq, rotary_dim, scale, False, block_t, interpret)


def _rotary_fwd(x, positions, freq, rotary_dim, scale, block_t, interpret):
    return _rotary(x, positions, freq, rotary_dim, scale, block_t, interpret), (positions, freq)


def _rotary_bwd(rotary_dim, scale, block_t, interpret, residuals, g):
    positions, freq = residuals
    return _apply(g, positions, freq, rotary_dim, scale, True, block_t, interpret), None, None


_rotary.defvjp(_rotary_fwd, _rotary_bwd)


def rotary_pallas(x: jax.Array, positions: jax.Array, *, rotary_dim: int, theta: float = 10000.0,
                  scaling: RopeScaling | None = None, block_t: int = 256,
                  interpret: object = False) -> jax.Array:
    """Partial rotary with the semantics of `reference_rotary`.

    Args:
      x: [B,T,N,H] queries or keys.
      positions: [B,T] integer positions.
      rotary_dim: R, even, <= H.
      theta, scaling: the rotary base and its long-context scaling (`phi_jax.kernels.rope`).
      block_t: rows of T per grid step.
      interpret: False (Mosaic), True or a `pltpu.InterpretParams` (CPU).
    Returns:
      [B,T,N,H] in x's dtype.
    """
    check_rotary_dim(x.shape[-1], rotary_dim)
    if positions.shape != x.shape[:2]:
        raise ValueError(f"positions {positions.shape} must be [B,T] = {x.shape[:2]}")
    inv_freq = call_inverse_frequencies(positions, rotary_dim, theta, scaling)  # [R/2]
    freq = _lane_frequencies(inv_freq, x.shape[-1])  # [1,H]
    return _rotary(x, positions, freq, rotary_dim, attention_factor(scaling), block_t, interpret)
