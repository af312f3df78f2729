"""Shared pieces of the Mosaic GPU (Hopper) attention kernels: sizes, the interpreter switches.

Letters: B batch, T padded length, N query heads, K kv heads, H padded head dim.

The Mosaic GPU interpreter (`InterpretGPUParams`, on CPU) does not model register operands of
wgmma, accumulating wgmma (`run_state`), transposed SMEM views or layout casts. `Ops` switches
exactly those to equivalents it does model (operands staged through SMEM, pre-transposed copies of
the streamed tiles, add-after-matmul, no layout annotation); the kernels are otherwise the same
code on hardware and in the interpreter.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from phi_jax.kernels import block_plan as bp
from phi_jax.kernels.backend import MASK_VALUE

LOG2E = math.log2(math.e)
EMPTY_ROW_LSE = -MASK_VALUE
COMPUTE_WGS = 2
ROWS = 64  # wgmma M: rows of one compute warpgroup


def memory_warpgroup(steps, stages: int, consumed, copies) -> None:
    """The producer warpgroup shared by every kernel: stream `steps` tiles into a ring of `stages`
    SMEM slots, waiting for a slot's consumers to release it before refilling it.

    copies(step, slot) lists the (GMEM source, SMEM destination, barrier) copies of one tile.
    """
    plgpu.set_max_registers(40, action="decrease")

    @pl.loop(0, steps)
    def _fill(step):
        slot = lax.rem(step, jnp.int32(stages))

        @pl.when(step >= stages)
        def _():
            plgpu.barrier_wait(consumed.at[slot])

        for src, dst, barrier in copies(step, slot):
            plgpu.copy_gmem_to_smem(src, dst, barrier)


@dataclasses.dataclass(frozen=True)
class GpuBlockSizes:
    """block_kv / block_q_dkv: tiles streamed by the memory warpgroup; stages: ring depth."""

    block_kv: int = 128
    block_kv_dq: int = 64
    block_q_dkv: int = 64
    stages: int = 2


@dataclasses.dataclass(frozen=True)
class Static:
    causal: bool
    scale: float
    groups: int
    blocks: GpuBlockSizes
    interpret: bool


class Ops:
    """The few operations whose hardware form the GPU interpreter cannot run (see module doc)."""

    def __init__(self, interpret: bool):
        self.interpret = interpret

    def layout(self, x, layout):
        return x if self.interpret else plgpu.layout_cast(x, layout)

    def rows(self, ref):  # [M] -> one value per accumulator row
        return self.layout(ref[...], plgpu.Layout.WGMMA.reduce(1))

    def cols(self, ref):  # [N] -> one value per accumulator column
        return self.layout(ref[...], plgpu.Layout.WGMMA.reduce(0))

    def iota(self, shape, dim):
        if self.interpret:
            return lax.broadcasted_iota(jnp.int32, shape, dim)
        return plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=plgpu.Layout.WGMMA)

    def zeros(self, shape):
        return self.layout(jnp.zeros(shape, jnp.float32), plgpu.Layout.WGMMA)

    def full_rows(self, n, value):
        return self.layout(jnp.full((n,), value, jnp.float32), plgpu.Layout.WGMMA.reduce(1))

    def _operand(self, a, stage):
        if isinstance(a, jax.Array) and self.interpret:  # registers -> SMEM for the interpreter
            stage[...] = a
            return stage
        return a

    def matmul(self, a, b, shape, stage=None):
        """a [M,K] (SMEM ref or registers) @ b [K,N] (SMEM ref) -> f32 registers [M,N]."""
        a = self._operand(a, stage)

        def body(acc_ref):
            plgpu.wgmma(acc_ref, a, b)
            return acc_ref[...]

        return pl.run_scoped(body, plgpu.ACC(shape, jnp.float32))

    def matmul_acc(self, acc, a, b, stage=None):
        """acc + a @ b, accumulating in the wgmma accumulator on hardware."""
        if self.interpret:
            return acc + self.matmul(a, b, acc.shape, stage)

        def body(acc_ref):
            plgpu.wgmma(acc_ref, a, b)

        return pl.run_state(body)(plgpu.ACC.init(acc))

    def transposed(self, natural_ref, pre_transposed_ref):
        """[R,C] tile as a [C,R] wgmma operand: a free SMEM view on hardware, a pre-transposed
        streamed copy in the interpreter."""
        if self.interpret:
            return pre_transposed_ref
        return plgpu.transpose_ref(natural_ref, (1, 0))


TRANSFORMS = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))


def smem(shape, dtype):
    return plgpu.SMEM(shape, dtype, transforms=TRANSFORMS)


def union_range(info, b, blocks, nblocks):
    """First block and count of the union of two warpgroups' block ranges."""
    firsts, lasts = [], []
    for blk in blocks:
        first = bp.field(info, b, blk, nblocks, bp.FIRST)
        last = bp.field(info, b, blk, nblocks, bp.LAST)
        firsts.append(jnp.where(last >= first, first, jnp.int32(2 ** 30)))
        lasts.append(last)
    first = jnp.minimum(*firsts)
    last = jnp.maximum(*lasts)
    return first, jnp.maximum(last - first + 1, 0)


def interpret_params(st: Static):
    if not st.interpret:
        return None
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
    return InterpretGPUParams()
