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
from phi_jax.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")

# Logical name -> mesh axis (or tuple of axes, or None = replicated). Batch is split over data and
# fsdp (FSDP is data parallelism whose parameters are sharded too); weights are split over fsdp on
# their embed axis and over tensor on heads / mlp / vocab (Megatron-style). One table serves
# parameters and activations: flax never uses a mesh axis twice in one spec, so an activation
# [batch, length, embed] splits its batch over fsdp and leaves embed whole.
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
    (axes.LORA_RANK, None),
)


def resolve_mesh_shape(sizes: Mapping[str, int], num_devices: int) -> dict[str, int]:
    """Fill one -1 with 'the rest of the devices' and check the product.

    Args:
      sizes: mesh axis name -> size (or -1); axes left out have size 1.
      num_devices: how many devices the mesh must use.
    """
    unknown_names = sorted(set(sizes) - set(MESH_AXES))
    if unknown_names:
        raise ConfigError(f"unknown mesh axes {unknown_names} in mesh.shape; the axes are {MESH_AXES}")
    shape = {name: int(sizes.get(name, 1)) for name in MESH_AXES}
    unknown = [n for n, s in shape.items() if s == -1]
    if len(unknown) > 1:
        raise ConfigError(f"mesh axes {unknown} are all -1; at most one axis may take 'the rest'")
    if any(s == 0 or s < -1 for s in shape.values()):
        raise ConfigError(f"mesh sizes must be positive or -1, got {shape}")
    known = math.prod(s for s in shape.values() if s != -1)
    if unknown:
        if num_devices % known:
            raise ConfigError(f"mesh {shape}: the fixed axes use {known} devices, which does not divide "
                             f"the {num_devices} devices; make their product a divisor of {num_devices}")
        shape[unknown[0]] = num_devices // known
    if math.prod(shape.values()) != num_devices:
        raise ConfigError(f"mesh {shape} uses {math.prod(shape.values())} devices but {num_devices} "
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
    """DEFAULT_RULES with per-name overrides.

    A value is a mesh axis, a list/tuple of them, or None (replicated); or, as the command line
    gives it, a string: "fsdp", "fsdp,tensor", "none" (replicated), or "default" (keep the table's).
    """
    rules = dict(DEFAULT_RULES)
    for name, value in (overrides or {}).items():
        if name not in rules:
            raise ConfigError(f"unknown logical axis {name!r} in mesh.rules; known: {sorted(rules)}")
        if isinstance(value, str):
            if value.strip().lower() == "default":
                continue
            parts = tuple(p.strip() for p in value.split(",") if p.strip())
            value = None if parts in ((), ("none",), ("None",)) else parts
        if isinstance(value, (list, tuple)):
            value = tuple(value) if len(value) != 1 else value[0]
        targets = value if isinstance(value, tuple) else (value,)
        bad = [t for t in targets if t is not None and t not in MESH_AXES]
        if bad:
            raise ConfigError(f"mesh.rules.{name} maps to unknown mesh axes {bad}; use {MESH_AXES}, "
                             "a comma-separated list of them, or none")
        rules[name] = value
    return tuple(rules.items())


def _mesh_axes_of(rule_value) -> tuple[str, ...]:
    if rule_value is None:
        return ()
    return rule_value if isinstance(rule_value, tuple) else (rule_value,)


def _model_dims(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Sizes of the parameter dimensions each logical axis names (a name may label several)."""
    norm = (config.d_model, config.dim_per_head) if config.qk_layernorm else (config.d_model,)
    return {axes.HEADS: (config.n_heads,), axes.KV_HEADS: (config.num_kv_heads,),
            axes.HEAD_DIM: (config.dim_per_head,), axes.MLP: (config.mlp_dim,),
            axes.EMBED: (config.d_model,), axes.VOCAB: (config.vocab_size,),
            axes.LAYERS: (config.n_layers,), axes.NORM: norm}


def check_divisibility(config: ModelConfig, mesh: Mesh, rules) -> None:
    """Fail early, naming the mesh axis and sizes that work, when a mesh does not divide the model.

    jit would otherwise fail deep inside sharding propagation (or pad silently), with no hint of
    which config value to change.
    """
    num_devices = mesh.devices.size
    for logical, rule in rules:
        for dim in _model_dims(config).get(logical, ()):
            mesh_axes = _mesh_axes_of(rule)
            split = math.prod(mesh.shape[a] for a in mesh_axes)
            if dim % split == 0:
                continue
            culprit = next((a for a in mesh_axes if dim % mesh.shape[a]), mesh_axes[-1])
            others = split // mesh.shape[culprit]
            ok = [s for s in range(1, num_devices + 1)
                  if num_devices % s == 0 and dim % (s * others) == 0]
            raise ConfigError(
                f"mesh axis {culprit!r} of size {mesh.shape[culprit]} does not divide the model's "
                f"{logical!r} dimension ({dim}) (rule {logical!r} -> {mesh_axes}, {split} parts); "
                f"set mesh.shape.{culprit} to one of {ok} (sizes that divide the {num_devices} "
                f"devices and {dim}) with another axis at -1, or map {logical!r} to other mesh "
                "axes (or None) in the config's mesh.rules")


def abstract_and_shardings(init_fn, *args, mesh: Mesh, rules) -> tuple[Any, Any]:
    """(abstract pytree, NamedShardings) of what `init_fn(*args)` returns, allocating nothing.

    `init_fn` returns logically boxed leaves (flax `Partitioned`, from `model.init`); the abstract
    tree comes back unboxed, as ShapeDtypeStructs carrying their shardings, ready for
    `jit(init_fn, out_shardings=...)`, an Orbax restore target, or `.lower(...)`.
    """
    boxed = jax.eval_shape(init_fn, *args)
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, rules)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            nn.unbox(boxed), shardings)
    return abstract, shardings


def spec_table(shardings) -> dict[str, str]:
    """'layers/block/mlp/fc1/kernel' -> 'P(None, 'fsdp', 'tensor')': readable, for logs and plans."""
    flat = jax.tree_util.tree_flatten_with_path(shardings)[0]
    return {"/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path): str(s.spec)
            for path, s in flat}


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
