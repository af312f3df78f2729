"""Partial rotary position embedding (GPT-NeoX "rotate half" layout, as HF Phi, Llama and Phi-3 use).

Letters: B batch, T length, N heads, H head dim, R rotary dim (the first R of H dims rotate).

The angle table is computed in float32 from integer positions and the rotation is applied in
float32, then cast back: a bf16 model gets bf16 activations but not bf16-rounded angles. The
frequencies, and their long-context scalings, come from `phi_jax.kernels.rope`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from phi_jax.kernels import backend
from phi_jax.kernels.rope import RopeScaling, check_rotary_dim, rotary_angles


def reference_rotary(x: jax.Array, positions: jax.Array, *, rotary_dim: int,
                     theta: float = 10000.0, scaling: RopeScaling | None = None) -> jax.Array:
    """Rotate the first `rotary_dim` dims of every head; the rest pass through untouched.

    Args:
      x: [B,T,N,H] queries or keys.
      positions: [B,T] integer positions (they restart at 0 for each packed document).
      rotary_dim: R, even, <= H.
      theta: the rotary base.
      scaling: None or a `RopeScaling` (linear, llama3, longrope).
    Returns:
      [B,T,N,H] in x's dtype.
    """
    check_rotary_dim(x.shape[-1], rotary_dim)
    cos, sin = rotary_angles(positions, rotary_dim, theta, scaling)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]  # [B,T,1,R/2]
    half = rotary_dim // 2
    x1 = x[..., :half].astype(jnp.float32)
    x2 = x[..., half:rotary_dim].astype(jnp.float32)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return jnp.concatenate([rotated.astype(x.dtype), x[..., rotary_dim:]], axis=-1)


def rotary(x: jax.Array, positions: jax.Array, *, rotary_dim: int, theta: float = 10000.0,
           scaling: RopeScaling | None = None, impl: str = "xla",
           interpret: bool | None = None) -> jax.Array:
    """Partial rotary through the implementation named by `impl` (see `reference_rotary`).

    Args:
      x: [B,T,N,H]; positions: [B,T] int; rotary_dim: R (even, <= H); scaling: as for
        `reference_rotary`.
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
        return reference_rotary(x, positions, rotary_dim=rotary_dim, theta=theta, scaling=scaling)
    if impl == "pallas":
        mode = backend.interpret_mode(interpret)
        if mode is not False or where == "tpu":
            from phi_jax.kernels.rotary_pallas import rotary_pallas
            return rotary_pallas(x, positions, rotary_dim=rotary_dim, theta=theta, scaling=scaling,
                                 interpret=mode)
    raise backend.unsupported("rotary", impl, where)
