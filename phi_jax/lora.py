"""LoRA adapters: PEFT's files in and out, merging, and the parameters a fine-tune trains.

The adapter itself lives in the one model (`ModelConfig.lora_rank / lora_alpha / lora_targets`;
`model._Dense` adds `(alpha / r) * x A B` where a target's name matches). This module moves it
between phi_jax's parameter tree and PEFT's files:

    OUT/adapter_config.json         {"peft_type": "LORA", "r", "lora_alpha", "target_modules", ...}
    OUT/adapter_model.safetensors   base_model.model.model.layers.{i}.{module}.lora_{A,B}.weight

Letters: R the rank, I a target's input dims (flattened, as HF stores them), O its output dims.
phi_jax keeps A as [*in, R] and B as [R, *out] (a kernel's own in/out split, heads unflattened);
PEFT's `lora_A.weight` is [R, I] and `lora_B.weight` [O, R], flattened in the order hf.py uses for
the kernels, so the HF module names come from the same table (`hf._layer_tensors`).
"""

from __future__ import annotations

import json
import math
import os
import zlib
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from phi_jax.config import ModelConfig
from phi_jax.errors import InputError, MissingFileError

LORA_LEAVES = ("lora_a", "lora_b")
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."


def with_lora(config: ModelConfig, rank: int, alpha: float, targets) -> ModelConfig:
    """`config` with a LoRA adapter of `rank` on `targets` (HF module names); rank 0: none."""
    targets = tuple(t.strip() for t in (targets.split(",") if isinstance(targets, str) else targets)
                    if t.strip())
    if rank == 0:
        return _without_lora(config)
    return config.replace(lora_rank=int(rank), lora_alpha=float(alpha), lora_targets=targets)


def _without_lora(config: ModelConfig) -> ModelConfig:
    return config.replace(lora_rank=0, lora_alpha=ModelConfig.lora_alpha, lora_targets=())


def trainable_mask(params) -> Any:
    """True on the LoRA leaves (what a LoRA fine-tune trains), False on the frozen base."""
    def is_lora(path, _):
        return any(isinstance(p, jax.tree_util.DictKey) and p.key in LORA_LEAVES for p in path)

    return jax.tree_util.tree_map_with_path(is_lora, params)


def has_lora(params) -> bool:
    return any(jax.tree.leaves(trainable_mask(params)))


def split_adapter(params: Mapping) -> tuple[dict, dict]:
    """(adapter, frozen): the branches of a parameter dict tree that lead to LoRA leaves, and
    everything else. A LoRA step differentiates the first only, so the frozen base never gets a
    gradient, an accumulator or an update (each would be another copy of the base's size)."""
    adapter, frozen = {}, {}
    for key, value in params.items():
        if isinstance(value, Mapping):
            a, f = split_adapter(value)
            if a:
                adapter[key] = a
            if f or not a:
                frozen[key] = f
        elif key in LORA_LEAVES:
            adapter[key] = value
        else:
            frozen[key] = value
    return adapter, frozen


def join_adapter(frozen: Mapping, adapter: Mapping) -> dict:
    """The inverse of `split_adapter`: one parameter tree (keys in the frozen tree's order, then
    the adapter's)."""
    out = {k: (join_adapter(v, adapter.get(k, {})) if isinstance(v, Mapping) else v)
           for k, v in frozen.items()}
    for key, value in adapter.items():
        if key not in out:
            out[key] = dict(value) if isinstance(value, Mapping) else value
    return out


# ------------------------------------------------------------------------------ module names
def hf_module_names(config: ModelConfig) -> dict[str, tuple[str, str]]:
    """phi_jax module name -> (its group in a layer, HF module path within a layer), from hf.py's
    tensor table: {"q_proj": ("self_attn", "self_attn.q_proj"), "dense": ("self_attn",
    "self_attn.o_proj"), ...} for the modules that are one unfused HF linear layer."""
    from phi_jax.hf import _layer_tensors

    out = {}
    for suffix, parts in _layer_tensors(config):
        if len(parts) == 1 and suffix.endswith(".weight") and parts[0][0][-1] == "kernel":
            group, module = parts[0][0][0], parts[0][0][1]
            out[module] = (group, suffix[:-len(".weight")])
    return out


def _layer_node(params: dict, config: ModelConfig, layer: int, group: str, module: str):
    """(the module's dict, index into its leaves: the layer for scanned params, else None)."""
    if "layers" in params:
        return params["layers"]["block"][group][module], layer
    return params[f"layers_{layer}"][group][module], None


def _peft_key(layer: int, suffix: str, which: str) -> str:
    return f"{_PEFT_PREFIX}model.layers.{layer}.{suffix}.lora_{which}.weight"


def _targets(config: ModelConfig) -> list[tuple[str, str, str]]:
    names = hf_module_names(config)
    return [(module, *names[module]) for module in sorted(config.lora_modules)]


# ------------------------------------------------------------------------------- PEFT files out
def adapter_tensors(config: ModelConfig, variables: dict) -> dict[str, np.ndarray]:
    """The LoRA leaves of `variables` as PEFT's tensors (float32 numpy, PEFT's names)."""
    params = variables.get("params", variables)
    r, out = config.lora_rank, {}
    for module, group, suffix in _targets(config):
        for i in range(config.n_layers):
            node, index = _layer_node(params, config, i, group, module)
            a, b = (np.asarray(jax.device_get(node[k] if index is None else node[k][index]), np.float32)
                    for k in LORA_LEAVES)
            out[_peft_key(i, suffix, "A")] = np.ascontiguousarray(a.reshape(-1, r).T)  # [R, I]
            out[_peft_key(i, suffix, "B")] = np.ascontiguousarray(b.reshape(r, -1).T)  # [O, R]
    return out


def peft_config(config: ModelConfig, base_model: str = "") -> dict[str, Any]:
    """adapter_config.json for `config`'s adapter, as PEFT writes it for a LoraConfig."""
    names = hf_module_names(config)
    targets = sorted(names[m][1].rsplit(".", 1)[-1] for m in config.lora_modules)
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": config.lora_rank,
            "lora_alpha": config.lora_alpha, "target_modules": targets, "lora_dropout": 0.0,
            "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
            "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
            "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {},
            "alpha_pattern": {}, "base_model_name_or_path": base_model, "revision": None}


def save_adapter(path: str | os.PathLike, config: ModelConfig, variables: dict, *,
                 base_model: str = "", overwrite: bool = True):
    """Write `path`/adapter_config.json + adapter_model.safetensors (published whole, atomically).

    Returns the path layer's path (`fileio.as_path`: a local `Path`, or an `epath.Path` that keeps
    `gs://bucket/...` intact; `pathlib.Path` would fold it into `gs:/bucket/...`)."""
    from safetensors.numpy import save_file

    from phi_jax.fileio import as_path, staged_directory

    if not config.lora_rank:
        raise InputError("this model has no LoRA adapter to save (lora_rank is 0); fine-tune with "
                         "--config.lora.rank=8 (or save the full model with --merge / save_pretrained)")
    with staged_directory(path, overwrite=overwrite) as out:
        save_file(adapter_tensors(config, variables), str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (out / ADAPTER_CONFIG).write_text(json.dumps(peft_config(config, base_model), indent=2) + "\n")
    return as_path(path)


# -------------------------------------------------------------------------------- PEFT files in
def read_adapter_config(path: str | os.PathLike, config: ModelConfig) -> ModelConfig:
    """`config` with the adapter of `path`/adapter_config.json (rank, alpha, targets), checked."""
    file = Path(path) / ADAPTER_CONFIG
    if not file.is_file():
        raise MissingFileError(f"no {ADAPTER_CONFIG} in {path}; --adapter must be a directory "
                               "written by `phi-jax finetune` or PEFT's save_pretrained")
    try:
        cfg = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{file} is not valid JSON ({e}); regenerate the adapter") from None

    def refuse(what: str):
        raise InputError(f"{file}: {what} is not supported by phi_jax's LoRA; save the adapter "
                         "with plain LoRA settings, or merge it with PEFT first")

    if cfg.get("peft_type") != "LORA":
        refuse(f"peft_type {cfg.get('peft_type')!r}")
    for key in ("use_dora", "modules_to_save", "layers_to_transform", "rank_pattern", "alpha_pattern"):
        if cfg.get(key):
            refuse(f"{key}={cfg[key]!r}")
    if cfg.get("bias", "none") != "none":
        refuse(f"bias={cfg['bias']!r}")
    rank, alpha = cfg.get("r"), cfg.get("lora_alpha", 8)
    if not isinstance(rank, int) or rank < 1:
        raise InputError(f"{file}: 'r' must be a positive integer, got {rank!r}")
    if cfg.get("use_rslora"):  # PEFT scales by alpha / sqrt(r); phi_jax by alpha / r
        alpha = alpha * math.sqrt(rank)
    targets = cfg.get("target_modules")
    choices = config.replace(lora_rank=0).lora_target_choices()
    if targets == "all-linear":
        targets = list(choices)
    if isinstance(targets, str) or not targets:
        raise InputError(f"{file}: target_modules {targets!r} must be a list of module names "
                         f"(some of {list(choices)})")
    targets = ["o_proj" if t == "dense" and "o_proj" in choices else t for t in targets]
    try:
        return with_lora(config, rank, alpha, targets)
    except InputError as e:
        raise InputError(f"{file}: {e}") from None


def load_adapter(path: str | os.PathLike, config: ModelConfig, variables: dict
                 ) -> tuple[ModelConfig, dict]:
    """The base `variables` of `config` plus the PEFT adapter in `path`: (LoRA config, variables)."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    if config.lora_rank:
        raise InputError("the base model already carries a LoRA adapter; merge it first "
                         "(`phi-jax convert --adapter`) and load the new adapter onto the merged model")
    lora_config = read_adapter_config(path, config)
    file = Path(path) / ADAPTER_WEIGHTS
    if not file.is_file():
        raise MissingFileError(f"no {ADAPTER_WEIGHTS} in {path}; copy the adapter's weights there")
    try:
        tensors = load_file(str(file))
    except (SafetensorError, OSError) as e:
        raise InputError(f"{file} is not a readable safetensors file ({e}); copy it again") from None
    tensors = {k.replace(".default.", "."): v for k, v in tensors.items()}
    expected = {}
    r = lora_config.lora_rank
    for module, group, suffix in _targets(lora_config):
        for i in range(config.n_layers):
            expected[_peft_key(i, suffix, "A")] = (module, group, i, "lora_a")
            expected[_peft_key(i, suffix, "B")] = (module, group, i, "lora_b")
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise InputError(f"{file} does not match its adapter_config.json and this base model "
                         f"({config.n_layers} layers): missing {missing[:4]}, unexpected "
                         f"{unexpected[:4]}; use the adapter with the base model it was trained on")
    abstract = _abstract_lora_leaves(lora_config)
    dtype = lora_config.jnp_param_dtype
    per_module: dict[tuple[str, str], dict[str, list]] = {}
    for key, (module, group, i, leaf) in sorted(expected.items(), key=lambda kv: kv[1][2]):
        x = tensors[key]
        shape = abstract[(group, module, leaf)]
        want = (r, -1) if leaf == "lora_a" else (-1, r)
        if x.ndim != 2 or x.size != math.prod(shape) or (leaf == "lora_a" and x.shape[0] != r) \
                or (leaf == "lora_b" and x.shape[1] != r):
            raise InputError(f"{file}: tensor {key} has shape {tuple(x.shape)}, expected {want} with "
                             f"r={r} and {math.prod(shape) // r} features; the adapter does not match "
                             "adapter_config.json or this base model")
        value = x.T.reshape(shape)  # [R,I] -> [*in, R]; [O,R] -> [R, *out]
        per_module.setdefault((group, module), {}).setdefault(leaf, []).append(value.astype(dtype))
    params = jax.tree.map(lambda a: a, variables["params"])  # a new tree; leaves shared
    for (group, module), leaves in per_module.items():
        for leaf, values in leaves.items():
            if "layers" in params:
                node = params["layers"]["block"][group][module]
                node[leaf] = jnp.asarray(np.stack(values))
            else:
                for i, value in enumerate(values):
                    params[f"layers_{i}"][group][module][leaf] = jnp.asarray(value)
    return lora_config, {**variables, "params": params}


def _abstract_lora_leaves(config: ModelConfig) -> dict[tuple[str, str, str], tuple]:
    """(group, module, leaf) -> one layer's shape of each LoRA leaf, from the model itself."""
    from phi_jax.model import abstract_params

    layer = abstract_params(config.replace(scan_layers=False))["params"]["layers_0"]
    return {(group, module, leaf): layer[group][module][leaf].shape
            for module, group, _ in _targets(config) for leaf in LORA_LEAVES}


# ------------------------------------------------------------------------ fresh adapters, merging
def add_lora_params(config: ModelConfig, variables: dict, rng: jax.Array) -> dict:
    """Base `variables` (no LoRA leaves) plus freshly initialised LoRA leaves for `config`:
    A uniform in +-1/sqrt(fan_in) as PEFT, B zero, so the model's function is unchanged."""
    from phi_jax.model import abstract_params

    scanned = "layers" in variables["params"]
    abstract = abstract_params(config.replace(scan_layers=scanned))["params"]

    def fill(path, leaf, base):
        key = path[-1].key
        if key == "lora_b":
            return jnp.zeros(leaf.shape, leaf.dtype)
        if key == "lora_a":
            name = "/".join(str(p.key) for p in path)
            fan_in = math.prod(leaf.shape[1 if scanned else 0:-1])
            bound = 1.0 / math.sqrt(fan_in)
            k = jax.random.fold_in(rng, zlib.crc32(name.encode()) & 0x7FFFFFFF)
            return jax.random.uniform(k, leaf.shape, leaf.dtype, -bound, bound)
        return base

    base = _fill_missing(abstract, variables["params"])
    return {**variables, "params": jax.tree_util.tree_map_with_path(fill, abstract, base)}


def _fill_missing(abstract: dict, params: dict) -> dict:
    """`params` with None at the leaves `abstract` has and `params` lacks (the LoRA ones)."""
    out = {}
    for key, value in abstract.items():
        if isinstance(value, dict):
            out[key] = _fill_missing(value, params.get(key, {}))
        else:
            if key not in params and key not in LORA_LEAVES:
                raise InputError(f"the base parameters lack {key!r}, which the model needs; load the "
                                 "base with the same architecture")
            out[key] = params.get(key, jnp.zeros((), jnp.float32))
    return out


def merge(config: ModelConfig, variables: dict) -> tuple[ModelConfig, dict]:
    """(config without LoRA, variables with each target kernel += (alpha / r) * A B): the same
    function as the adapted model, as a plain model any HF tool loads."""
    if not config.lora_rank:
        return config, variables
    scale = config.lora_alpha / config.lora_rank

    def walk(node: dict, scanned: bool) -> dict:
        if "lora_a" in node:
            a, b, kernel = node["lora_a"], node["lora_b"], node["kernel"]
            dot = lambda x, y: jnp.tensordot(x.astype(jnp.float32), y.astype(jnp.float32), axes=1)
            delta = jax.vmap(dot)(a, b) if scanned else dot(a, b)
            merged = (kernel.astype(jnp.float32) + scale * delta).astype(kernel.dtype)
            return {**{k: v for k, v in node.items() if k not in LORA_LEAVES}, "kernel": merged}
        return {k: walk(v, scanned or k == "layers") if isinstance(v, dict) else v
                for k, v in node.items()}

    params = walk(variables["params"], False)
    return _without_lora(config), {**variables, "params": params}


def base_params(variables: dict) -> dict:
    """`variables` without the LoRA leaves."""
    def strip(node):
        return {k: strip(v) if isinstance(v, dict) else v for k, v in node.items() if k not in LORA_LEAVES}

    return {**variables, "params": strip(variables["params"])}


def save_merged(path: str | os.PathLike, config: ModelConfig, variables: dict, tokenizer=None, *,
                overwrite: bool = True, dtype: Any = None):
    """The model with its adapter folded in (`merge`) as an HF directory transformers loads, with
    the tokenizer files (and chat template) when given; published whole. Returns the path layer's
    path (`fileio.as_path`, which keeps a gs:// URL whole), as `save_adapter` does."""
    from phi_jax import hf
    from phi_jax.fileio import as_path, staged_directory

    config, variables = merge(config, variables)
    with staged_directory(path, overwrite=overwrite) as out:
        hf.write_hf_files(out, config, hf.params_to_hf(variables, config, dtype))
        if tokenizer is not None:
            tokenizer.save(out)
    return as_path(path)
