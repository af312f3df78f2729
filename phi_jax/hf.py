"""HF Phi checkpoints (config.json + safetensors) <-> phi_jax parameters.

Reads a single `model.safetensors` or shards listed in `model.safetensors.index.json`, in fp16, bf16
or fp32 on disk, into any dtype in memory; writes the same layout back (sharded by size, with the
index) so `transformers.AutoModelForCausalLM.from_pretrained` loads it. Pickle files are never
opened: a `.bin` checkpoint gets an error explaining how to convert it.

The mapping is a table from HF tensor names to (phi_jax path, layout); HF linear weights are
[out, in] and phi_jax kernels are [in, ...out], with heads split out for attention.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from phi_jax.config import ModelConfig, dtype_name, from_hf_config, to_hf_config

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_NP_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}


# ------------------------------------------------------------------------------ name mapping
def _layer_tensors(config: ModelConfig) -> list[tuple[str, tuple[str, ...], str]]:
    """(HF suffix within a layer, phi_jax path within a block, layout) for one decoder layer."""
    rows = [
        ("input_layernorm.weight", ("input_layernorm", "scale"), "copy"),
        ("input_layernorm.bias", ("input_layernorm", "bias"), "copy"),
        ("self_attn.q_proj.weight", ("self_attn", "q_proj", "kernel"), "in_heads"),
        ("self_attn.q_proj.bias", ("self_attn", "q_proj", "bias"), "heads"),
        ("self_attn.k_proj.weight", ("self_attn", "k_proj", "kernel"), "in_heads"),
        ("self_attn.k_proj.bias", ("self_attn", "k_proj", "bias"), "heads"),
        ("self_attn.v_proj.weight", ("self_attn", "v_proj", "kernel"), "in_heads"),
        ("self_attn.v_proj.bias", ("self_attn", "v_proj", "bias"), "heads"),
        ("self_attn.dense.weight", ("self_attn", "dense", "kernel"), "heads_out"),
        ("self_attn.dense.bias", ("self_attn", "dense", "bias"), "copy"),
        ("mlp.fc1.weight", ("mlp", "fc1", "kernel"), "transpose"),
        ("mlp.fc1.bias", ("mlp", "fc1", "bias"), "copy"),
        ("mlp.fc2.weight", ("mlp", "fc2", "kernel"), "transpose"),
        ("mlp.fc2.bias", ("mlp", "fc2", "bias"), "copy"),
    ]
    if config.qk_layernorm:
        rows += [
            ("self_attn.q_layernorm.weight", ("self_attn", "q_layernorm", "scale"), "copy"),
            ("self_attn.q_layernorm.bias", ("self_attn", "q_layernorm", "bias"), "copy"),
            ("self_attn.k_layernorm.weight", ("self_attn", "k_layernorm", "scale"), "copy"),
            ("self_attn.k_layernorm.bias", ("self_attn", "k_layernorm", "bias"), "copy"),
        ]
    return rows


_TOP_TENSORS = [
    ("model.embed_tokens.weight", ("embed_tokens", "embedding"), "copy"),
    ("model.final_layernorm.weight", ("final_layernorm", "scale"), "copy"),
    ("model.final_layernorm.bias", ("final_layernorm", "bias"), "copy"),
    ("lm_head.weight", ("lm_head", "kernel"), "transpose"),
    ("lm_head.bias", ("lm_head", "bias"), "copy"),
]


def hf_tensor_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The HF name -> shape table that a checkpoint for `config` must contain exactly."""
    d, f, v = config.d_model, config.mlp_dim, config.vocab_size
    n, k, h = config.n_heads, config.num_kv_heads, config.dim_per_head
    per_layer = {
        "input_layernorm.weight": (d,), "input_layernorm.bias": (d,),
        "self_attn.q_proj.weight": (n * h, d), "self_attn.q_proj.bias": (n * h,),
        "self_attn.k_proj.weight": (k * h, d), "self_attn.k_proj.bias": (k * h,),
        "self_attn.v_proj.weight": (k * h, d), "self_attn.v_proj.bias": (k * h,),
        "self_attn.dense.weight": (d, n * h), "self_attn.dense.bias": (d,),
        "mlp.fc1.weight": (f, d), "mlp.fc1.bias": (f,),
        "mlp.fc2.weight": (d, f), "mlp.fc2.bias": (d,),
    }
    if config.qk_layernorm:
        per_layer.update({f"self_attn.{p}_layernorm.{w}": (h,) for p in "qk" for w in ("weight", "bias")})
    shapes = {"model.embed_tokens.weight": (v, d), "model.final_layernorm.weight": (d,),
              "model.final_layernorm.bias": (d,), "lm_head.weight": (v, d), "lm_head.bias": (v,)}
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
        except (json.JSONDecodeError, KeyError, AttributeError) as e:
            raise ValueError(f"{path / INDEX_FILE} is not a valid safetensors index ({e}); "
                             "regenerate it or remove it to load a single model.safetensors") from e
        missing = [f for f in files if not (path / f).exists()]
        if missing:
            raise FileNotFoundError(f"{path / INDEX_FILE} lists shard(s) {missing} that are not in "
                                    f"{path}; copy the missing shard files")
        return [path / f for f in files]
    if (path / SINGLE_FILE).exists():
        return [path / SINGLE_FILE]
    pickles = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
    if pickles:
        raise ValueError(
            f"{path} holds only pickle checkpoint(s) {pickles}; phi_jax never unpickles files. "
            "Convert them to safetensors once, in an environment you trust: "
            "`AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)`")
    raise FileNotFoundError(f"no {SINGLE_FILE} or {INDEX_FILE} in {path}; point to an HF Phi "
                            "checkpoint directory (config.json + safetensors)")


def read_hf_tensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of a (possibly sharded) safetensors checkpoint as numpy arrays, dtype as on disk."""
    tensors: dict[str, np.ndarray] = {}
    for file in _checkpoint_files(Path(path)):
        try:
            with safe_open(str(file), framework="numpy") as f:
                for name in f.keys():
                    if name in tensors:
                        raise ValueError(f"tensor {name!r} appears in more than one shard ({file.name}); "
                                         "the checkpoint is inconsistent: re-export it")
                    tensors[name] = f.get_tensor(name)
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{file} is not a readable safetensors file ({e}); the file is corrupt or "
                             "truncated: copy it again") from e
    return tensors


def read_hf_config(path: str | os.PathLike) -> dict[str, Any]:
    file = Path(path) / "config.json"
    if not file.exists():
        raise FileNotFoundError(f"no config.json in {path}; an HF checkpoint directory needs one")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{file} is not valid JSON ({e}); fix or regenerate it") from e


def hf_to_params(tensors: dict[str, np.ndarray], config: ModelConfig, dtype: Any = None) -> dict:
    """Map HF tensors onto phi_jax's parameter tree ({"params": ...}), checking names and shapes."""
    expected = hf_tensor_shapes(config)
    # rotary inv_freq buffers appear in some old exports; they are derived, not learned.
    present = {k: v for k, v in tensors.items() if not k.endswith("rotary_emb.inv_freq")}
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
        raise ValueError(f"checkpoint does not match the config: missing tensors {missing[:8]}"
                         f"{' …' if len(missing) > 8 else ''}, unexpected tensors {unexpected[:8]}"
                         f"{' …' if len(unexpected) > 8 else ''}.{hint}")
    for name, shape in expected.items():
        if tuple(present[name].shape) != shape:
            raise ValueError(f"tensor {name!r} has shape {tuple(present[name].shape)} but the config "
                             f"implies {shape}; the config.json does not describe these weights")
    np_dtype = _NP_DTYPES[dtype_name(dtype if dtype is not None else config.param_dtype)]

    def convert(name: str, layout: str) -> np.ndarray:
        return np.ascontiguousarray(_to_phi_jax(present[name], layout, config).astype(np_dtype))

    params: dict = {}
    for name, path, layout in _TOP_TENSORS:
        _set(params, path, convert(name, layout))
    for suffix, path, layout in _layer_tensors(config):
        per_layer = [convert(f"model.layers.{i}.{suffix}", layout) for i in range(config.n_layers)]
        if config.scan_layers:
            _set(params, ("layers", "block") + path, np.stack(per_layer))
        else:
            for i, value in enumerate(per_layer):
                _set(params, (f"layers_{i}",) + path, value)
    return {"params": params}


def params_to_hf(variables: dict, config: ModelConfig, dtype: Any = None) -> dict[str, np.ndarray]:
    """phi_jax parameters -> HF tensor dict (numpy, `dtype` or the params' own dtype)."""
    params = variables["params"] if "params" in variables else variables

    def fetch(path, layout, layer=None):
        value = _get(params, path)
        if layer is not None and config.scan_layers:
            value = value[layer]
        value = np.asarray(jax.device_get(value))
        if dtype is not None:
            value = value.astype(_NP_DTYPES[dtype_name(dtype)])
        return np.ascontiguousarray(_to_hf(value, layout))

    out = {name: fetch(path, layout) for name, path, layout in _TOP_TENSORS}
    for i in range(config.n_layers):
        for suffix, path, layout in _layer_tensors(config):
            full = ("layers", "block") + path if config.scan_layers else (f"layers_{i}",) + path
            out[f"model.layers.{i}.{suffix}"] = fetch(full, layout, layer=i)
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


def write_hf_checkpoint(path: str | os.PathLike, config: ModelConfig, tensors: dict[str, np.ndarray],
                        *, max_shard_size: int = 5 * 2**30, torch_dtype: str | None = None,
                        legacy_config: bool = False, extra_files: dict[str, str] | None = None) -> Path:
    """Write config.json and safetensors shards atomically: into a temp dir, then renamed into place.

    A crash mid-write leaves the previous checkpoint (if any) untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    first = next(iter(tensors.values()))
    torch_dtype = torch_dtype or dtype_name(first.dtype)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        shards = _shard(tensors, max_shard_size)
        if len(shards) == 1:
            save_file(shards[0], str(tmp / SINGLE_FILE), metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, shard in enumerate(shards, 1):
                fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(tmp / fname), metadata={"format": "pt"})
                weight_map.update({name: fname for name in shard})
            index = {"metadata": {"total_size": int(sum(v.nbytes for v in tensors.values()))},
                     "weight_map": weight_map}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2))
        hf_config = to_hf_config(config, torch_dtype=torch_dtype, legacy=legacy_config)
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2))
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        _replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _replace_dir(src: Path, dst: Path) -> None:
    """Move `src` to `dst`; an existing `dst` is renamed aside first and removed only afterwards."""
    if not dst.exists():
        os.replace(src, dst)
        return
    old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
    os.replace(dst, old)
    os.replace(src, dst)
    shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------------------------- public API
def load_hf(path: str | os.PathLike, dtype: Any = jnp.float32, **config_overrides):
    """(ModelConfig, variables) from an HF Phi directory; params and compute in `dtype`."""
    name = dtype_name(dtype)
    config = from_hf_config(read_hf_config(path), dtype=name, param_dtype=name, **config_overrides)
    variables = hf_to_params(read_hf_tensors(path), config)
    return config, jax.tree.map(jnp.asarray, variables)


def save_hf(path: str | os.PathLike, config: ModelConfig, variables: dict, *, dtype: Any = None,
            max_shard_size: int = 5 * 2**30, legacy_config: bool = False) -> Path:
    """Write `variables` as an HF Phi checkpoint that transformers loads."""
    tensors = params_to_hf(variables, config, dtype)
    return write_hf_checkpoint(path, config, tensors, max_shard_size=max_shard_size,
                               legacy_config=legacy_config)
