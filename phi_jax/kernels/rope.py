"""Rotary frequencies and their long-context scalings, shared by the XLA and the Pallas rotary.

Letters: B batch, T length, R rotary dim (R/2 frequencies, one per rotated pair).

The scalings are the ones transformers names in `rope_parameters["rope_type"]`, computed the
same way so that logits match its models:
  * default:  inv_freq[i] = theta ** (-2i / R).
  * linear:   inv_freq / factor (positions interpolated by `factor`).
  * llama3:   wavelengths longer than original_max_len / low_freq_factor are stretched by
    `factor`, those shorter than original_max_len / high_freq_factor are kept, with a linear
    ramp in between (Llama 3.1 / 3.2).
  * longrope: inv_freq / ext[i] with one factor per frequency: `short_factor` while the longest
    sequence of the call (max position + 1) fits in `original_max_len`, `long_factor` beyond it;
    cos and sin are multiplied by `attention_factor` (Phi-3.5-mini, Phi-4-mini). Like
    transformers, the choice is made per call, so keys cached before a sequence grew past
    `original_max_len` keep their short-factor rotation.
Everything here is float32 whatever the activations' dtype.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

ROPE_TYPES = ("default", "linear", "llama3", "longrope")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """A rotary scaling (hashable: it is a static argument of jitted kernels).

    Attributes:
      rope_type: one of ROPE_TYPES.
      factor: linear / llama3 stretch.
      low_freq_factor, high_freq_factor: llama3's wavelength thresholds.
      original_max_len: the pretraining context (llama3, longrope).
      short_factor, long_factor: longrope's per-frequency factors, R/2 each.
      attention_factor: longrope's cos/sin multiplier (already resolved; 1.0 = none).
    """

    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_len: int = 0
    short_factor: tuple[float, ...] = ()
    long_factor: tuple[float, ...] = ()
    attention_factor: float = 1.0


def check_rotary_dim(head_dim: int, rotary_dim: int) -> None:
    """Rotary rotates pairs of the first R of H dims: R must be even and at most H."""
    if rotary_dim % 2 or not 0 < rotary_dim <= head_dim:
        raise ValueError(f"rotary_dim must be even and in (0, {head_dim}], got {rotary_dim}")


def longrope_attention_factor(scale: float, original_max_len: int) -> float:
    """LongRoPE's default cos/sin multiplier for a context `scale` times the pretraining one:
    sqrt(1 + ln(scale) / ln(original_max_len)), and 1 when not extended."""
    if scale <= 1.0:
        return 1.0
    return math.sqrt(1.0 + math.log(scale) / math.log(original_max_len))


def inverse_frequencies(rotary_dim: int, theta: float, scaling: RopeScaling | None = None,
                        *, seq_len: jax.Array | int | None = None) -> jax.Array:
    """[R/2] float32 angular frequency of each rotated pair.

    Args:
      rotary_dim: R, even.
      theta: the rotary base.
      scaling: None or a RopeScaling (see the module docstring).
      seq_len: longrope only: the call's longest sequence (max position + 1), traced or not;
        None means short factors.
    """
    exponents = jnp.arange(0, rotary_dim, 2, dtype=jnp.float32) / rotary_dim
    base = jnp.float32(theta) ** exponents  # [R/2]
    kind = "default" if scaling is None else scaling.rope_type
    if kind == "default":
        return 1.0 / base
    if kind == "linear":
        return (1.0 / base) / jnp.float32(scaling.factor)
    if kind == "llama3":
        return _llama3(1.0 / base, scaling)
    if kind == "longrope":
        half = rotary_dim // 2
        if len(scaling.short_factor) != half or len(scaling.long_factor) != half:
            raise ValueError(f"longrope needs {half} short and long factors (rotary_dim {rotary_dim} / 2), "
                             f"got {len(scaling.short_factor)} and {len(scaling.long_factor)}")
        ext = jnp.asarray(scaling.short_factor, jnp.float32)
        if seq_len is not None:
            ext = jnp.where(jnp.asarray(seq_len) > scaling.original_max_len,
                            jnp.asarray(scaling.long_factor, jnp.float32), ext)
        return 1.0 / (ext * base)
    raise ValueError(f"unknown rope_type {kind!r}; use one of {ROPE_TYPES}")


def _llama3(inv_freq: jax.Array, s: RopeScaling) -> jax.Array:
    low_freq_wavelen = s.original_max_len / s.low_freq_factor
    high_freq_wavelen = s.original_max_len / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    stretched = jnp.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_len / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * stretched / s.factor + smooth * stretched
    medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return jnp.where(medium, smoothed, stretched)


def attention_factor(scaling: RopeScaling | None) -> float:
    """The static multiplier of cos and sin (1.0 unless longrope says otherwise)."""
    return 1.0 if scaling is None else float(scaling.attention_factor)


def call_inverse_frequencies(positions: jax.Array, rotary_dim: int, theta: float,
                             scaling: RopeScaling | None = None) -> jax.Array:
    """[R/2] frequencies for one call over `positions` [B,T] (longrope picks its factors here)."""
    seq_len = None
    if scaling is not None and scaling.rope_type == "longrope":
        seq_len = jnp.max(positions) + 1
    return inverse_frequencies(rotary_dim, theta, scaling, seq_len=seq_len)


def rotary_angles(positions: jax.Array, rotary_dim: int, theta: float,
                  scaling: RopeScaling | None = None) -> tuple[jax.Array, jax.Array]:
    """cos, sin of shape [B,T,R/2] in float32 for integer positions [B,T], times the
    scaling's attention factor."""
    inv_freq = call_inverse_frequencies(positions, rotary_dim, theta, scaling)  # [R/2]
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B,T,R/2]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    factor = attention_factor(scaling)
    if factor != 1.0:
        cos, sin = cos * factor, sin * factor
    return cos, sin
