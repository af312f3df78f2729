"""Attention and rotary kernels: pure-jnp references, Pallas kernels and the dispatch between them.

Nothing here imports the rest of phi_jax, so the kernels can be tested and benchmarked alone.
"""

from phi_jax.kernels.attention import attention, cached_attention, reference_attention
from phi_jax.kernels.rotary import reference_rotary, rotary

__all__ = ["attention", "cached_attention", "reference_attention", "reference_rotary", "rotary"]
