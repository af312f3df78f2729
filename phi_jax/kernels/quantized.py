"""Weight-only quantized matmuls and the int8 KV cache's arithmetic: pure-jnp reference + fast path.

Letters: G groups along a kernel's (flattened) input dims, g the group size (G * g = the input
size I), O... a kernel's output dims, B batch, T new tokens, K kv heads, S cache slots, H head dim.

Layout (one for int8 and int4): a float kernel [in..., out...] of a linear layer is stored as
  q:     [G, g, out...]  int8 (values in [-127, 127]) or int4 (values in [-8, 7])
  scale: [G, out...]     float16 (as GGUF's blocks store it), one per group of g input rows and output channel,
with w[i, o] = q[i // g, i % g, o] * scale[i // g, o] over the input rows flattened to I. G = 1 is
per-output-channel quantization (int8's default); G = I / 32 is llama.cpp's q8_0 / q4_0 blocking,
so those files' blocks map onto it exactly.

`reference_quantized_einsum` dequantizes the kernel and runs the layer's einsum: the definition.
`quantized_einsum` is what the model runs: with one group the scale is applied to the [.., O]
output rather than to the [I, O] kernel (a per-output-channel scale commutes with the
contraction), so only the int -> float conversion touches the kernel; with several groups it
dequantizes in the compute dtype, scale fused into the conversion, then runs one dot (XLA:CPU
runs one dot over I much faster than G small dots over g, measured in `benchmarks/quant.py`).

The int8 KV cache stores k and v [B,K,S,H] as int8 with one float32 scale per (sequence, kv head,
slot): [B,K,S], as vLLM's fp8 cache and MaxText's quantize_kvcache do per token and head. The
scale factors out of the H contraction, so attention applies k's scale to the scores [.., S] and
v's scale to the probabilities [.., S] instead of dequantizing the cache (`kv_scores`,
`kv_weighted_values` below; `phi_jax.kernels.attention` uses them).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

INT_DTYPES = {"int8": jnp.int8, "int4": jnp.int4}
_KV_MAX = 127.0


def _split_spec(spec: str, n_in: int) -> tuple[str, str, str, str]:
    """'BTD,DNH->BTNH' -> (x letters, kernel input letters, kernel output letters, out letters)."""
    ins, rest = spec.split(",")
    kernel, out = rest.split("->")
    k_in, k_out = kernel[:n_in], kernel[n_in:]
    if not ins.endswith(k_in):
        raise ValueError(f"einsum {spec!r}: the input's last letters must be the kernel's {k_in!r}")
    return ins, k_in, k_out, out


def dequantize(q: jax.Array, scale: jax.Array, in_shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
    """q [G,g,O...], scale [G,O...] -> the float kernel [*in_shape, O...] in `dtype`."""
    w = q.astype(dtype) * scale.astype(dtype)[:, None]
    return w.reshape(tuple(in_shape) + q.shape[2:])


def reference_quantized_einsum(spec: str, x: jax.Array, q: jax.Array, scale: jax.Array,
                               in_shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
    """einsum(spec, x, dequantize(q, scale)) in `dtype`: the definition the fast path is held to.

    Args:
      spec: the float layer's einsum, e.g. 'BTD,DNH->BTNH' (x's trailing letters are the
        kernel's input letters).
      x: the input; q [G,g,O...], scale [G,O...] (see the module docstring).
      in_shape: the kernel's input dims (their product is G * g).
    """
    return jnp.einsum(spec, x.astype(dtype), dequantize(q, scale, in_shape, dtype))


def quantized_einsum(spec: str, x: jax.Array, q: jax.Array, scale: jax.Array,
                     in_shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
    """`reference_quantized_einsum` as the model runs it (see the module docstring for why)."""
    _, _, k_out, _ = _split_spec(spec, len(in_shape))
    x = x.astype(dtype)
    if q.shape[0] == 1:  # per output channel: scale the output, not the kernel
        kernel = q[0].astype(dtype).reshape(tuple(in_shape) + q.shape[2:])
        return jnp.einsum(spec, x, kernel) * scale[0].astype(dtype)
    return jnp.einsum(spec, x, dequantize(q, scale, in_shape, dtype))


# --------------------------------------------------------------------------------- the KV cache
def quantize_kv(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x [..., H] -> (int8 [..., H], float32 scale [...]): absmax per vector (token, kv head)."""
    x32 = x.astype(jnp.float32)
    scale = jnp.max(jnp.abs(x32), axis=-1) / _KV_MAX
    safe = jnp.where(scale > 0, scale, 1.0)
    q = jnp.clip(jnp.round(x32 / safe[..., None]), -_KV_MAX, _KV_MAX).astype(jnp.int8)
    return q, scale


def dequantize_kv(q: jax.Array, scale: jax.Array | None, dtype=jnp.float32) -> jax.Array:
    """The float cache [..., H] from int8 values and per-vector scales (None: already float)."""
    if scale is None:
        return q.astype(dtype)
    return q.astype(dtype) * scale.astype(dtype)[..., None]


def kv_scores(qm: jax.Array, k: jax.Array, k_scale: jax.Array | None) -> jax.Array:
    """Scores 'BKMH,BKSH->BKMS' in float32 against a float or int8 cache (k_scale [B,K,S])."""
    scores = jnp.einsum("BKMH,BKSH->BKMS", qm.astype(jnp.float32), k.astype(jnp.float32))
    if k_scale is not None:
        scores = scores * k_scale.astype(jnp.float32)[:, :, None, :]
    return scores


def kv_weighted_values(probs: jax.Array, v: jax.Array, v_scale: jax.Array | None) -> jax.Array:
    """'BKMS,BKSH->BKMH' in float32 against a float or int8 cache (v_scale [B,K,S])."""
    if v_scale is not None:
        probs = probs * v_scale.astype(jnp.float32)[:, :, None, :]
    return jnp.einsum("BKMS,BKSH->BKMH", probs, v.astype(jnp.float32))


def group_count(in_size: int, group: int | None) -> int:
    """G for an input of `in_size` rows in groups of `group` (None: one group, per channel)."""
    return 1 if group is None else in_size // group


def in_size(in_shape: tuple[int, ...]) -> int:
    return math.prod(in_shape)
