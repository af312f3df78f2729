"""HF checkpoints (config.json + safetensors) <-> phi_jax parameters, for every family phi_jax loads.

Reads a single `model.safetensors` or shards listed in `model.safetensors.index.json`, in fp16, bf16
or fp32 on disk, into any dtype in memory; writes the same layout back (sharded by size, with the
index) so `transformers.AutoModelForCausalLM.from_pretrained` loads it. Pickle files are never
opened: a `.bin` checkpoint gets an error explaining how to convert it.

The mapping is a table of rows (HF tensor name, its parts): each part is a phi_jax parameter
path, a layout and its HF shape. HF linear weights are [out, in] and phi_jax kernels are
[in, ...out], with heads split out for attention. Phi-3 fuses tensors (qkv_proj, gate_up_proj):
such a row has several parts, stacked along HF's output dim, which phi_jax keeps separate
(q/k/v, gate/up), so one model serves every family.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from phi_jax.config import ModelConfig, dtype_name
from phi_jax.errors import ConfigError, InputError, MissingFileError
from phi_jax.fileio import as_path, local_copy, staged_directory
from phi_jax.hf_config import from_hf_config, to_hf_config

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_NP_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}

Part = tuple[tuple[str, ...], str, tuple[int, ...]]  # (phi_jax path, layout, HF shape)
Row = tuple[str, tuple[Part, ...]]  # (HF name, parts stacked along HF's first axis)


# ------------------------------------------------------------------------------ name mapping
def _layer_tensors(config: ModelConfig) -> list[Row]:
    """(HF suffix within a layer, parts) for one decoder layer of `config`'s family."""
    c = config
    d, f = c.d_model, c.mlp_dim
    n, k, h = c.n_heads, c.num_kv_heads, c.dim_per_head
    rows: list[Row] = []

    def add(suffix: str, *parts: Part) -> None:
        rows.append((suffix, parts))

    def proj(name: str, heads: int, what: str) -> Part:
        if what == "weight":
            return ("self_attn", name, "kernel"), "in_heads", (heads * h, d)
        return ("self_attn", name, "bias"), "heads", (heads * h,)

    def mlp(name: str, what: str, out_dim: int, in_dim: int) -> Part:
        if what == "weight":
            return ("mlp", name, "kernel"), "transpose", (out_dim, in_dim)
        return ("mlp", name, "bias"), "copy", (out_dim,)

    def norm(name: str, what: str, size: int = d) -> Part:
        return (name, "scale" if what == "weight" else "bias"), "copy", (size,)

    out_w: Part = (("self_attn", "dense", "kernel"), "heads_out", (d, n * h))
    out_b: Part = (("self_attn", "dense", "bias"), "copy", (d,))
    if c.model_type == "phi":
        for what in ("weight", "bias"):
            add(f"input_layernorm.{what}", norm("input_layernorm", what))
        for name, heads in (("q_proj", n), ("k_proj", k), ("v_proj", k)):
            for what in ("weight", "bias"):
                add(f"self_attn.{name}.{what}", proj(name, heads, what))
        add("self_attn.dense.weight", out_w)
        add("self_attn.dense.bias", out_b)
        for what in ("weight", "bias"):
            add(f"mlp.fc1.{what}", mlp("fc1", what, f, d))
            add(f"mlp.fc2.{what}", mlp("fc2", what, d, f))
        if c.qk_layernorm:
            for name in ("q_layernorm", "k_layernorm"):
                for what in ("weight", "bias"):
                    add(f"self_attn.{name}.{what}", (("self_attn",) + norm(name, what, h)[0],
                                                     "copy", (h,)))
        return rows
    add("input_layernorm.weight", norm("input_layernorm", "weight"))
    add("post_attention_layernorm.weight", norm("post_attention_layernorm", "weight"))
    if c.model_type == "phi3":  # fused in the checkpoint, separate in phi_jax
        add("self_attn.qkv_proj.weight", proj("q_proj", n, "weight"), proj("k_proj", k, "weight"),
            proj("v_proj", k, "weight"))
        add("mlp.gate_up_proj.weight", mlp("gate_proj", "weight", f, d), mlp("up_proj", "weight", f, d))
    else:
        for name, heads in (("q_proj", n), ("k_proj", k), ("v_proj", k)):
            add(f"self_attn.{name}.weight", proj(name, heads, "weight"))
            if c.qkv_bias:
                add(f"self_attn.{name}.bias", proj(name, heads, "bias"))
        for name in ("gate_proj", "up_proj"):
            add(f"mlp.{name}.weight", mlp(name, "weight", f, d))
            if c.mlp_bias:
                add(f"mlp.{name}.bias", mlp(name, "bias", f, d))
    add("self_attn.o_proj.weight", out_w)
    if c.out_bias:
        add("self_attn.o_proj.bias", out_b)
    add("mlp.down_proj.weight", mlp("down_proj", "weight", d, f))
    if c.mlp_bias:
        add("mlp.down_proj.bias", mlp("down_proj", "bias", d, f))
    return rows


def _top_tensors(config: ModelConfig) -> list[Row]:
    d, v = config.d_model, config.vocab_size
    final = "model.final_layernorm" if config.model_type == "phi" else "model.norm"
    rows: list[Row] = [("model.embed_tokens.weight", ((("embed_tokens", "embedding"), "copy", (v, d)),)),
                       (f"{final}.weight", ((("final_layernorm", "scale"), "copy", (d,)),))]
    if config.norm == "layernorm":
        rows.append((f"{final}.bias", ((("final_layernorm", "bias"), "copy", (d,)),)))
    if not config.tie_embeddings:
        rows.append(("lm_head.weight", ((("lm_head", "kernel"), "transpose", (v, d)),)))
        if config.lm_head_bias:
            rows.append(("lm_head.bias", ((("lm_head", "bias"), "copy", (v,)),)))
    return rows


def _row_shape(parts: tuple[Part, ...]) -> tuple[int, ...]:
    first = parts[0][2]
    return (sum(p[2][0] for p in parts),) + tuple(first[1:])


def hf_tensor_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The HF name -> shape table that a checkpoint for `config` must contain exactly."""
    shapes = {name: _row_shape(parts) for name, parts in _top_tensors(config)}
    per_layer = {suffix: _row_shape(parts) for suffix, parts in _layer_tensors(config)}
    for i in range(config.n_layers):
        shapes.update({f"model.layers.{i}.{s}": shape for s, shape in per_layer.items()})
    return shapes


def _to_phi_jax(x: np.ndarray, layout: str, config: ModelConfig) -> np.ndarray:
    h = config.dim_per_head
    if layout == "copy":
        return x
    if layout == "transpose":
        return x.T
    if layout == "in_heads":  # [heads*H, D] -> [D, heads, H]
        return x.T.reshape(x.shape[1], x.shape[0] // h, h)
    if layout == "heads":  # [heads*H] -> [heads, H]
        return x.reshape(-1, h)
    if layout == "heads_out":  # [D, N*H] -> [N, H, D]
        return x.T.reshape(-1, h, x.shape[0])
    raise AssertionError(layout)


def _to_hf(x: np.ndarray, layout: str) -> np.ndarray:
    if layout == "copy":
        return x
    if layout == "transpose":
        return x.T
    if layout == "in_heads":  # [D, heads, H] -> [heads*H, D]
        return x.reshape(x.shape[0], -1).T
    if layout == "heads":
        return x.reshape(-1)
    if layout == "heads_out":  # [N, H, D] -> [D, N*H]
        return x.reshape(-1, x.shape[-1]).T
    raise AssertionError(layout)


def _split_row(x: np.ndarray, parts: tuple[Part, ...]) -> list[np.ndarray]:
    """A fused HF tensor cut into its parts along the first (output) axis."""
    if len(parts) == 1:
        return [x]
    offsets = np.cumsum([p[2][0] for p in parts])[:-1]
    return np.split(x, offsets, axis=0)


def _get(tree: dict, path: Iterable[str]):
    for key in path:
        tree = tree[key]
    return tree


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


# ---------------------------------------------------------------------------------- reading
def _checkpoint_files(path: Path) -> list[Path]:
    if (path / INDEX_FILE).exists():
        try:
            index = json.loads((path / INDEX_FILE).read_text())
            files = sorted(set(index["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError, TypeError) as e:
            raise InputError(f"{path / INDEX_FILE} is not a valid safetensors index ({e}); "
                             "regenerate it or remove it to load a single model.safetensors") from e
        missing = [f for f in files if not (path / f).exists()]
        if missing:
            raise MissingFileError(f"{path / INDEX_FILE} lists shard(s) {missing} that are not in "
                                   f"{path}; copy the missing shard files")
        return [path / f for f in files]
    if (path / SINGLE_FILE).exists():
        return [path / SINGLE_FILE]
    pickles = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
    if pickles:
        raise InputError(
            f"{path} holds only pickle checkpoint(s) {pickles}; phi_jax never unpickles files. "
            "Convert them to safetensors once, in an environment you trust: "
            "`AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)`")
    raise MissingFileError(f"no {SINGLE_FILE} or {INDEX_FILE} in {path}; point to an HF checkpoint "
                           "directory (config.json + safetensors)")


def read_hf_tensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of a (possibly sharded) safetensors checkpoint as numpy arrays, dtype as on disk."""
    tensors: dict[str, np.ndarray] = {}
    for file in _checkpoint_files(Path(path)):
        try:
            with safe_open(str(file), framework="numpy") as f:
                for name in f.keys():
                    if name in tensors:
                        raise InputError(f"tensor {name!r} appears in more than one shard ({file}); "
                                         "the checkpoint is inconsistent: re-export it")
                    tensors[name] = f.get_tensor(name)
        except (SafetensorError, OSError) as e:
            raise InputError(f"{file} is not a readable safetensors file ({e}); the file is corrupt or "
                             "truncated: copy it again") from e
    return tensors


def read_hf_config(path: str | os.PathLike) -> dict[str, Any]:
    file = Path(path) / "config.json"
    if not file.exists():
        raise MissingFileError(f"no config.json in {path}; an HF checkpoint directory needs one")
    try:
        return json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{file} is not valid JSON ({e}); fix or regenerate it") from e


def check_tensors(present: dict[str, np.ndarray], config: ModelConfig, source: str) -> None:
    """Raise an InputError naming `source` unless `present` holds exactly the HF tensors of `config`."""
    expected = hf_tensor_shapes(config)
    missing = sorted(set(expected) - set(present))
    unexpected = sorted(set(present) - set(expected))
    if missing or unexpected:
        layers = {int(k.split(".")[2]) for k in present if k.startswith("model.layers.")}
        hint = ""
        if layers and max(layers) + 1 != config.n_layers:
            hint = (f" The checkpoint has {max(layers) + 1} layers but the config has "
                    f"{config.n_layers}: use the checkpoint's own config.json.")
        elif any("layernorm" in k and "self_attn" in k for k in missing + unexpected):
            hint = " q/k LayerNorm tensors disagree with config qk_layernorm: fix the config."
        elif any(k.endswith(".bias") for k in missing + unexpected):
            hint = " Bias tensors disagree with the config's bias switches: fix the config."
        raise InputError(f"{source} does not match its config: missing tensors {missing[:8]}"
                         f"{' …' if len(missing) > 8 else ''}, unexpected tensors {unexpected[:8]}"
                         f"{' …' if len(unexpected) > 8 else ''}.{hint}")
    for name, shape in expected.items():
        if tuple(present[name].shape) != shape:
            raise InputError(f"tensor {name!r} has shape {tuple(present[name].shape)} in {source} but "
                             f"the config implies {shape}; the config does not describe these weights")


def hf_to_params(tensors: dict[str, np.ndarray], config: ModelConfig, dtype: Any = None, *,
                 source: str = "the checkpoint") -> dict:
    """Map HF tensors onto phi_jax's parameter tree ({"params": ...}), checking names and shapes."""
    # rotary inv_freq buffers appear in some old exports; they are derived, not learned. A tied
    # model's lm_head.weight, when a file has one, is the embedding again (transformers ignores it).
    present = {k: v for k, v in tensors.items() if not k.endswith("rotary_emb.inv_freq")
               and not (config.tie_embeddings and k == "lm_head.weight")}
    check_tensors(present, config, source)
    np_dtype = _NP_DTYPES[dtype_name(dtype if dtype is not None else config.param_dtype)]

    def convert(name: str, parts: tuple[Part, ...]) -> list[np.ndarray]:
        return [np.ascontiguousarray(_to_phi_jax(x, layout, config).astype(np_dtype))
                for x, (_, layout, _) in zip(_split_row(present[name], parts), parts)]

    params: dict = {}
    for name, parts in _top_tensors(config):
        for (path, _, _), value in zip(parts, convert(name, parts)):
            _set(params, path, value)
    for suffix, parts in _layer_tensors(config):
        per_layer = [convert(f"model.layers.{i}.{suffix}", parts) for i in range(config.n_layers)]
        for j, (path, _, _) in enumerate(parts):
            if config.scan_layers:
                _set(params, ("layers", "block") + path, np.stack([values[j] for values in per_layer]))
            else:
                for i, values in enumerate(per_layer):
                    _set(params, (f"layers_{i}",) + path, values[j])
    return {"params": params}


def params_to_hf(variables: dict, config: ModelConfig, dtype: Any = None) -> dict[str, np.ndarray]:
    """phi_jax parameters -> HF tensor dict (numpy, `dtype` or the params' own dtype)."""
    params = variables["params"] if "params" in variables else variables

    def fetch(path, layout, layer=None):
        if layer is not None:
            path = ("layers", "block") + path if config.scan_layers else (f"layers_{layer}",) + path
        value = _get(params, path)
        if layer is not None and config.scan_layers:
            value = value[layer]
        value = np.asarray(jax.device_get(value))
        if dtype is not None:
            value = value.astype(_NP_DTYPES[dtype_name(dtype)])
        return _to_hf(value, layout)

    def row(parts, layer=None) -> np.ndarray:
        values = [fetch(path, layout, layer) for path, layout, _ in parts]
        return np.ascontiguousarray(values[0] if len(values) == 1 else np.concatenate(values, axis=0))

    out = {name: row(parts) for name, parts in _top_tensors(config)}
    for i in range(config.n_layers):
        for suffix, parts in _layer_tensors(config):
            out[f"model.layers.{i}.{suffix}"] = row(parts, layer=i)
    return out


# ---------------------------------------------------------------------------------- writing
def _shard(tensors: dict[str, np.ndarray], max_shard_bytes: int) -> list[dict[str, np.ndarray]]:
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, value in tensors.items():
        if shards[-1] and size + value.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = value
        size += value.nbytes
    return shards


def write_hf_files(directory: str | os.PathLike, config: ModelConfig, tensors: dict[str, np.ndarray],
                   *, max_shard_size: int = 5 * 2**30, torch_dtype: str | None = None,
                   legacy_config: bool = False) -> None:
    """Write config.json and the safetensors shards (+ index) into an existing directory.

    No atomicity of its own: callers write into a staging directory they publish (see
    `write_hf_checkpoint`, or `fileio.staged_directory`).
    """
    directory = Path(directory)
    torch_dtype = torch_dtype or dtype_name(next(iter(tensors.values())).dtype)
    hf_config = to_hf_config(config, torch_dtype=torch_dtype, legacy=legacy_config)
    shards = _shard(tensors, max_shard_size)
    if len(shards) == 1:
        save_file(shards[0], str(directory / SINGLE_FILE), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(directory / fname), metadata={"format": "pt"})
            weight_map.update({name: fname for name in shard})
        index = {"metadata": {"total_size": int(sum(v.nbytes for v in tensors.values()))},
                 "weight_map": weight_map}
        (directory / INDEX_FILE).write_text(json.dumps(index, indent=2))
    (directory / "config.json").write_text(json.dumps(hf_config, indent=2))


def write_hf_checkpoint(path: str | os.PathLike, config: ModelConfig, tensors: dict[str, np.ndarray],
                        *, max_shard_size: int = 5 * 2**30, torch_dtype: str | None = None,
                        legacy_config: bool = False, extra_files: dict[str, str] | None = None):
    """Write config.json and safetensors shards whole (`fileio.staged_directory`: a temp dir renamed
    into place; in a bucket, config.json uploaded last). A crash mid-write leaves the previous
    checkpoint (if any) untouched locally, and never a directory that loads as a checkpoint."""
    with staged_directory(path, overwrite=True) as tmp:
        write_hf_files(tmp, config, tensors, max_shard_size=max_shard_size, torch_dtype=torch_dtype,
                       legacy_config=legacy_config)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    return as_path(path)


# ------------------------------------------------------------------------------- public API
def load_hf(path: str | os.PathLike, dtype: Any = jnp.float32, **config_overrides):
    """(ModelConfig, variables) from an HF checkpoint directory of any supported family (phi,
    llama, mistral, qwen2, phi3); params and compute in `dtype`. `config_overrides` set
    ModelConfig fields config.json does not hold (attention_impl, scan_layers, ...)."""
    name = dtype_name(dtype)
    path = local_copy(path)  # a bucket's checkpoint (gs://...) is read from a local copy
    config = from_hf_config(read_hf_config(path), source=str(Path(path) / "config.json"), dtype=name,
                            param_dtype=name, **config_overrides)
    variables = hf_to_params(read_hf_tensors(path), config, source=str(path))
    return config, jax.tree.map(jnp.asarray, variables)


def save_hf(path: str | os.PathLike, config: ModelConfig, variables: dict, *, dtype: Any = None,
            max_shard_size: int = 5 * 2**30, legacy_config: bool = False) -> Path:
    """Write `variables` as an HF checkpoint of `config.model_type`'s class that transformers loads."""
    tensors = params_to_hf(variables, config, dtype)
    return write_hf_checkpoint(path, config, tensors, max_shard_size=max_shard_size,
                               legacy_config=legacy_config)
