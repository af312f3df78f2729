"""Partial rotary position embedding (GPT-NeoX "rotate half" layout, as HF Phi uses).

Letters: B batch, T length, N heads, H head dim, R rotary dim (the first R of H dims rotate).

The angle table is computed in float32 from integer positions and the rotation is applied in
float32, then cast back: a bf16 model gets bf16 activations but not bf16-rounded angles.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from phi_jax.kernels import backend


def inverse_frequencies(rotary_dim: int, theta: float) -> jax.Array:
    """[R/2] float32 angular frequency of each rotated pair (shared with the Pallas kernel)."""
    exponents = jnp.arange(0, rotary_dim, 2, dtype=jnp.float32) / rotary_dim
    return 1.0 / (jnp.float32(theta) ** exponents)


def rotary_angles(positions: jax.Array, rotary_dim: int,
                  theta: float) -> tuple[jax.Array, jax.Array]:
    """cos, sin of shape [B,T,R/2] in float32 for integer positions [B,T]."""
    inv_freq = inverse_frequencies(rotary_dim, theta)  # [R/2]
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B,T,R/2]
    return jnp.cos(angles), jnp.sin(angles)


def reference_rotary(x: jax.Array, positions: jax.Array, *, rotary_dim: int,
                     theta: float = 10000.0) -> jax.Array:
    """Rotate the first `rotary_dim` dims of every head; the rest pass through untouched.

    Args:
      x: [B,T,N,H] queries or keys.
      positions: [B,T] integer positions (they restart at 0 for each packed document).
      rotary_dim: R, even, <= H.
    Returns:
      [B,T,N,H] in x's dtype.
    """
    if rotary_dim % 2 or not 0 < rotary_dim <= x.shape[-1]:
        raise ValueError(f"rotary_dim must be even and in (0, {x.shape[-1]}], got {rotary_dim}")
    cos, sin = rotary_angles(positions, rotary_dim, theta)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]  # [B,T,1,R/2]
    half = rotary_dim // 2
    x1 = x[..., :half].astype(jnp.float32)
    x2 = x[..., half:rotary_dim].astype(jnp.float32)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return jnp.concatenate([rotated.astype(x.dtype), x[..., rotary_dim:]], axis=-1)


def rotary(x: jax.Array, positions: jax.Array, *, rotary_dim: int, theta: float = 10000.0,
           impl: str = "xla", interpret: bool | None = None) -> jax.Array:
    """Partial rotary through the implementation named by `impl` (see `reference_rotary`).

    Args:
      x: [B,T,N,H]; positions: [B,T] int; rotary_dim: R (even, <= H).
      impl: "xla" (any backend) or "pallas" (TPU; CPU in interpret mode). On GPUs XLA already
        fuses this elementwise rotation into its neighbours, so there is no GPU kernel: "pallas"
        there is an error that says so.
      interpret: Pallas only: None = interpret iff the default backend is cpu; True = TPU-style
        interpret mode anywhere; a `pltpu.InterpretParams` to tune it.
    Returns:
      [B,T,N,H] in x's dtype.
    """
    where = backend.platform()
    if impl == "xla":
        return reference_rotary(x, positions, rotary_dim=rotary_dim, theta=theta)
    if impl == "pallas":
        mode = backend.interpret_mode(interpret)
        if mode is not False or where == "tpu":
            from phi_jax.kernels.rotary_pallas import rotary_pallas
            return rotary_pallas(x, positions, rotary_dim=rotary_dim, theta=theta, interpret=mode)
    raise backend.unsupported("rotary", impl, where)
