"""Meshes and logical-axis rules: how named model axes land on devices.

The model names its axes (`phi_jax.axes`); this module owns the one rules table that maps those
names to mesh axes (`data`, `fsdp`, `tensor`). Changing parallelism is changing `config.mesh`
(sizes) or `config.mesh.rules` (the table), never model code.

Meshes are built with `AxisType.Auto` axes: under the newer `Explicit` default,
`with_sharding_constraint` only asserts, and the logical-rules path needs the compiler to
propagate shardings from the constraints.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from phi_jax import axes
from phi_jax.config import ModelConfig

MESH_AXES = ("data", "fsdp", "tensor")

# Logical name -> mesh axis (or tuple of axes, or None = replicated). Batch is split over data and
# fsdp (FSDP is data parallelism whose parameters are sharded too); weights are split over fsdp on
# their embed axis and over tensor on heads / mlp / vocab (Megatron-style).
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    (axes.BATCH, ("data", "fsdp")),
    (axes.LENGTH, None),
    (axes.EMBED, "fsdp"),
    (axes.HEADS, "tensor"),
    (axes.KV_HEADS, "tensor"),
    (axes.HEAD_DIM, None),
    (axes.MLP, "tensor"),
    (axes.VOCAB, "tensor"),
    (axes.LAYERS, None),
    (axes.NORM, None),
)


def resolve_mesh_shape(sizes: Mapping[str, int], num_devices: int) -> dict[str, int]:
    """Fill one -1 with 'the rest of the devices' and check the product."""
    shape = {name: int(sizes.get(name, 1)) for name in MESH_AXES}
    unknown = [n for n, s in shape.items() if s == -1]
    if len(unknown) > 1:
        raise ValueError(f"mesh axes {unknown} are all -1; at most one axis may take 'the rest'")
    known = math.prod(s for s in shape.values() if s != -1)
    if any(s == 0 or s < -1 for s in shape.values()):
        raise ValueError(f"mesh sizes must be positive or -1, got {shape}")
    if unknown:
        if num_devices % known:
            raise ValueError(f"mesh {shape}: {num_devices} devices are not divisible by {known}")
        shape[unknown[0]] = num_devices // known
    if math.prod(shape.values()) != num_devices:
        raise ValueError(f"mesh {shape} uses {math.prod(shape.values())} devices but {num_devices} "
                         "are available; make the sizes multiply to the device count or use -1")
    return shape


def make_mesh(sizes: Mapping[str, int] | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh with Auto axis types over `devices` (default: all)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_mesh_shape(sizes or {"data": -1}, len(devices))
    dims = tuple(shape[n] for n in MESH_AXES)
    return jax.make_mesh(dims, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES),
                         devices=devices)


def rules_from_config(overrides: Mapping[str, Any] | None = None) -> tuple[tuple[str, Any], ...]:
    """DEFAULT_RULES with per-name overrides (values: a mesh axis, a list of them, or None)."""
    rules = dict(DEFAULT_RULES)
    for name, value in (overrides or {}).items():
        if name not in rules:
            raise ValueError(f"unknown logical axis {name!r} in mesh.rules; known: {sorted(rules)}")
        if isinstance(value, (list, tuple)):
            value = tuple(value)
        targets = value if isinstance(value, tuple) else (value,)
        bad = [t for t in targets if t is not None and t not in MESH_AXES]
        if bad:
            raise ValueError(f"mesh.rules.{name} maps to unknown mesh axes {bad}; use {MESH_AXES}")
        rules[name] = value
    return tuple(rules.items())


def _mesh_axes_of(rule_value) -> tuple[str, ...]:
    if rule_value is None:
        return ()
    return rule_value if isinstance(rule_value, tuple) else (rule_value,)


def check_divisibility(config: ModelConfig, mesh: Mesh, rules) -> None:
    """Fail early, naming the axis and a size that works, when a mesh does not divide the model."""
    dims = {axes.HEADS: config.n_heads, axes.KV_HEADS: config.num_kv_heads, axes.MLP: config.mlp_dim,
            axes.EMBED: config.d_model, axes.VOCAB: config.vocab_size}
    for logical, mesh_axes in rules:
        if logical not in dims:
            continue
        size = math.prod(mesh.shape[a] for a in _mesh_axes_of(mesh_axes))
        if dims[logical] % size:
            ok = [d for d in range(1, dims[logical] + 1) if dims[logical] % d == 0 and d <= 64]
            raise ValueError(
                f"mesh axes {_mesh_axes_of(mesh_axes)} of total size {size} split the model's "
                f"{logical!r} dimension ({dims[logical]}), which it does not divide; use a size in "
                f"{ok} for that mesh axis, or map {logical!r} elsewhere in mesh.rules")


def logical_to_sharding(logical_specs, mesh: Mesh, rules) -> Any:
    """Pytree of logical PartitionSpecs -> pytree of NamedShardings."""
    return nn.logical_to_mesh_sharding(logical_specs, mesh, rules)


def batch_sharding(mesh: Mesh, rules) -> NamedSharding:
    """Sharding of [batch, length] arrays."""
    spec = nn.logical_to_mesh_axes((axes.BATCH, axes.LENGTH), rules)
    return NamedSharding(mesh, spec)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_divisor(mesh: Mesh, rules) -> int:
    """The number of shards the batch axis is split into."""
    return math.prod(mesh.shape[a] for a in _mesh_axes_of(dict(rules)[axes.BATCH]))
