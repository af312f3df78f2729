"""Where a kernel runs: the default backend and the interpret-mode switch.

Pallas kernels compile for TPU (Mosaic) and GPU (Mosaic GPU); on CPU they run in interpret
mode. The TPU-style interpreter (`pltpu.InterpretParams`) is the CPU default because our kernels
are written for Mosaic TPU: it simulates VMEM/SMEM, raises on out-of-bounds block reads and
fills uninitialized memory with NaN, so it catches more bugs than the generic interpreter
(`interpret=True` on `pl.pallas_call`), which the fast tests also use.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu

# What every attention implementation writes for a masked score: finite (not -inf), so a row whose
# keys are all masked gives exp(0)-free sums instead of NaN, and far below any real score.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)

SUPPORTED = {
    "attention": {"xla": ("cpu", "gpu", "tpu"),
                  "pallas": ("cpu (interpret)", "tpu", "gpu (Hopper, bf16/fp16)"),
                  "cudnn": ("gpu",)},
    "cached_attention": {"xla": ("cpu", "gpu", "tpu"),
                         "pallas": ("cpu (interpret)", "tpu", "gpu (runs the XLA reference)"),
                         "cudnn": ("gpu",)},
    "rotary": {"xla": ("cpu", "gpu", "tpu"), "pallas": ("cpu (interpret)", "tpu")},
}


def platform() -> str:
    """'cpu', 'gpu' or 'tpu' (jax.default_backend() says 'gpu' for CUDA and ROCm)."""
    return jax.default_backend()


def interpret_mode(interpret: object) -> object:
    """Resolve the `interpret` argument of the public kernels.

    None: interpret iff the default backend is cpu. True: TPU-style interpret mode. False: compile.
    A `pltpu.InterpretParams` (or any other value `pl.pallas_call` accepts) passes through.
    """
    if interpret is None:
        interpret = platform() == "cpu"
    if interpret is True:
        return pltpu.InterpretParams()
    return interpret


def unsupported(op: str, impl: str, where: str) -> ValueError:
    """The error for an (op, impl, backend) combination we do not run, listing those we do."""
    table = SUPPORTED[op]
    options = "; ".join(f"{name!r} on {', '.join(places)}" for name, places in table.items())
    if impl not in table:
        return ValueError(f"{op}: unknown impl {impl!r}; supported: {options}")
    return ValueError(f"{op}: impl {impl!r} does not run on {where}; supported: {options}. "
                      "Set ModelConfig.attention_impl / rotary_impl to one of those (or pass "
                      "interpret=True to run a Pallas kernel in interpret mode anywhere).")
