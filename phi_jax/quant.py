"""Weight-only int8 / int4 inference: a parameter transform onto the one model, and its accounting.

    config_q = quant.quantized_config(model.config, "int8")          # or "int4", "int4:128"
    variables_q = quant.quantize_params(config_q, variables)          # float -> int8 + scales
    logits, cache = Phi(config_q).apply(variables_q, tokens)          # the same forward pass
    # phi_jax.load(path, quantize="int8", kv_cache_dtype="int8") does both steps.

Quantization is a `ModelConfig` switch (`quantize`, `quant_group_size`, `kv_cache_dtype`): the
one `Phi` module reads it, and each linear layer's einsum runs over "kernel_q" (int8 or int4,
[G, g, *out]) and "kernel_scale" (float32, [G, *out]) instead of "kernel"
(`phi_jax.kernels.quantized` has the layout, the reference and the fast path). Embeddings and
norms stay in the model dtype. The LM head is quantized to int8 even for int4 and even when tied:
it is the largest single matmul of a small model (SmolLM2-135M: 28 M of 135 M parameters, read
every decode step), so a float head would keep a fifth of the bytes; a tied model keeps its float
embedding for the lookup and gets an int8 transposed copy for the logits.

Rounding: int8 is absmax (scale = max|w| / 127), int4 is llama.cpp's q4_0 rule (scale = the
group's largest-magnitude value / -8, values clipped to [-8, 7]). Both are their own fixed points:
re-quantizing the dequantized values of a q8_0 / q4_0 block with the same group of 32 gives back
the block's exact integers and scale, so a GGUF q8_0 / q4_0 file loaded with `quantize=` keeps its
weights bit for bit (`phi_jax.inference.loader.load`; tests/test_quant.py checks it against the
`gguf` package's reader).

Why not qwix: qwix 0.1.8 (pure Python, installs cleanly here) intercepts the model's einsums and
swaps parameters for its `WithAux(QArray)` boxes, but `_Dense` casts its kernel to the compute
dtype before the einsum and `WithAux.astype` fails on a quantized array ("Unsupported type:
QArray"), so it needs model changes; it would also quantize the embedding's `attend` unless
excluded by regex, has no path for GGUF's blocks, and its weight-only dot dequantizes the kernel
before the dot, which is what this module does in ~150 lines without a dependency.
"""

from __future__ import annotations

import math
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

from phi_jax.config import KV_CACHE_DTYPES, QUANTIZE_MODES, ModelConfig
from phi_jax.errors import ConfigError, InputError
from phi_jax.kernels import quantized

DEFAULT_INT4_GROUP = 32  # llama.cpp's q4_0 block


def parse_quantize(value: str | None) -> tuple[str | None, int | None]:
    """"int8" -> ("int8", None: per channel); "int4" -> ("int4", 32); "int8:32", "int4:128" name a
    group size. A one-line InputError for anything else."""
    if value is None or value == "" or value == "none":
        return None, None
    mode, _, group = str(value).partition(":")
    if mode not in QUANTIZE_MODES or (group and not group.isdigit()):
        raise InputError(f"quantize={value!r}: use one of {list(QUANTIZE_MODES)}, optionally with a "
                         "group size along the input dim as int4:128 or int8:32")
    if group:
        return mode, int(group)
    return mode, DEFAULT_INT4_GROUP if mode == "int4" else None


def check_kv_cache_dtype(value: str | None) -> str | None:
    """None or "int8"; a one-line InputError for anything else."""
    if value in (None, "", "none", "auto"):
        return None
    if value not in KV_CACHE_DTYPES:
        raise InputError(f"kv_cache_dtype={value!r}: use one of {list(KV_CACHE_DTYPES)} (or leave it "
                         "unset for the model dtype)")
    return value


def quantized_config(config: ModelConfig, quantize: str | None, kv_cache_dtype: str | None = None) -> ModelConfig:
    """`config` with the quantization switches set; a group size that does not divide a layer's
    input is one line of InputError naming the layer size and the fix."""
    mode, group = parse_quantize(quantize)
    kv = check_kv_cache_dtype(kv_cache_dtype)
    try:
        return config.replace(quantize=mode, quant_group_size=group if mode else None, kv_cache_dtype=kv)
    except ConfigError as e:
        raise InputError(f"cannot quantize this model as {quantize!r}: {e}") from None


# ------------------------------------------------------------------------------- the rounding
def quantize_kernel(w, mode: str, group: int | None, n_lead: int, n_in: int):
    """A float kernel [lead..., in..., out...] -> (q [lead..., G, g, out...], scale [lead..., G, out...]).

    n_lead: leading stacked axes (scanned layers: 1); n_in: the kernel's input axes.
    """
    w = jnp.asarray(w, jnp.float32)
    lead, ins, outs = w.shape[:n_lead], w.shape[n_lead:n_lead + n_in], w.shape[n_lead + n_in:]
    size = math.prod(ins)
    g = size if group is None else group
    if size % g:
        raise InputError(f"quantization group {g} does not divide a kernel's input size {size}; use a "
                         "group size that divides it")
    wg = w.reshape(*lead, size // g, g, *outs)
    axis = n_lead + 1
    if mode == "int8":
        scale = jnp.max(jnp.abs(wg), axis=axis) / 127.0
        low, high = -127, 127
    else:  # q4_0: the largest magnitude maps to -8
        index = jnp.argmax(jnp.abs(wg), axis=axis, keepdims=True)
        scale = jnp.squeeze(jnp.take_along_axis(wg, index, axis=axis), axis) / -8.0
        low, high = -8, 7
    scale = scale.astype(jnp.float16)  # as GGUF stores it: half the scales' bytes, blocks kept exact
    safe = jnp.where(scale == 0, 1.0, scale.astype(jnp.float32))
    q = jnp.clip(jnp.round(wg / jnp.expand_dims(safe, axis)), low, high)
    return q.astype(quantized.INT_DTYPES[mode]), scale


_quantize_kernel = jax.jit(quantize_kernel, static_argnums=(1, 2, 3, 4))


# --------------------------------------------------------------------------- the param transform
def _abstract_quantized(config: ModelConfig) -> dict:
    from phi_jax.model import Phi

    boxed = jax.eval_shape(lambda: Phi(config).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))
    return flax.traverse_util.flatten_dict(flax.linen.unbox(boxed)["params"])


def quantize_params(config: ModelConfig, variables: dict) -> dict:
    """Float variables {"params": ...} -> the variables of `Phi(config)` for a quantized `config`
    (see `quantized_config`): every linear kernel becomes kernel_q + kernel_scale, the tied LM head
    an int8 copy of the embedding; everything else (embeddings, norms, biases, LoRA) is kept as is.
    """
    from phi_jax.model import quant_layout

    if not config.quantize:
        return variables
    source = flax.traverse_util.flatten_dict(variables["params"])
    target = _abstract_quantized(config)
    out = {}
    for path, spec in target.items():
        if path[-1] == "kernel_scale":
            continue
        if path[-1] != "kernel_q":
            if path not in source:
                raise InputError(f"the parameters lack {'/'.join(path)}, which a {config.model_type} "
                                 "model needs; load them with phi_jax.load first")
            out[path] = source[path]
            continue
        module = path[:-1]
        kernel = source.get(module + ("kernel",))
        if kernel is None and module == ("lm_head",) and config.tie_embeddings:
            kernel = jnp.asarray(source[("embed_tokens", "embedding")]).T  # [V,D] -> [D,V]
        if kernel is None:
            raise InputError(f"the parameters lack {'/'.join(module + ('kernel',))} to quantize")
        n_lead = 1 if path[0] == "layers" else 0
        n_out = len(spec.shape) - n_lead - 2
        n_in = kernel.ndim - n_lead - n_out
        mode, group = quant_layout(config, module[-1])
        q, scale = _quantize_kernel(kernel, mode, group, n_lead, n_in)
        out[path], out[module + ("kernel_scale",)] = q, scale
    return {**variables, "params": flax.traverse_util.unflatten_dict(out)}


def dequantize_params(config: ModelConfig, variables: dict) -> dict:
    """Float kernels back from quantized variables (checks, export): each kernel_q/kernel_scale
    pair -> "kernel" [lead..., in..., out...] of the float model (a tied head's copy is dropped)."""
    from phi_jax.model import Phi

    float_config = config.replace(quantize=None, quant_group_size=None)
    boxed = jax.eval_shape(lambda: Phi(float_config).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))
    shapes = flax.traverse_util.flatten_dict(flax.linen.unbox(boxed)["params"])
    params = flax.traverse_util.flatten_dict(variables["params"])
    out = {}
    for path, value in params.items():
        module = path[:-1]
        if path[-1] not in ("kernel_q", "kernel_scale"):
            out[path] = value
        elif path[-1] == "kernel_q" and module + ("kernel",) in shapes:
            n_lead = 1 if module[0] == "layers" else 0
            scale = jnp.expand_dims(params[module + ("kernel_scale",)], n_lead + 1)
            out[module + ("kernel",)] = (value.astype(jnp.float32) * scale).reshape(shapes[module + ("kernel",)].shape)
    return {**variables, "params": flax.traverse_util.unflatten_dict(out)}


# ----------------------------------------------------------------------------------- accounting
def array_bytes(x) -> int:
    """Resident bytes of an array (int4 packs two values per byte)."""
    bits = 4 if x.dtype == jnp.int4 else np.dtype(x.dtype).itemsize * 8
    return math.ceil(int(np.prod(x.shape)) * bits / 8)


def weight_bytes(variables: dict) -> dict[str, int]:
    """Resident bytes of the parameters: {"matmul": the linear layers' kernels (and their scales,
    and a tied model's head copy), "other": embeddings, norms, biases, "total"}."""
    flat = flax.traverse_util.flatten_dict(variables["params"])
    matmul = other = 0
    for path, value in flat.items():
        size = array_bytes(value)
        if path[-1] in ("kernel", "kernel_q", "kernel_scale") and "lora" not in path[-1]:
            matmul += size
        else:
            other += size
    return {"matmul": matmul, "other": other, "total": matmul + other}


def float_matmul_bytes(config: ModelConfig) -> int:
    """Bytes of the matmul weights in float32 (a tied head counted: the float model reads the
    embedding as its head every step): what `weight_bytes(...)["matmul"]` is compared with."""
    from phi_jax.model import Phi

    float_config = config.replace(quantize=None, quant_group_size=None)
    boxed = jax.eval_shape(lambda: Phi(float_config).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))
    flat = flax.traverse_util.flatten_dict(flax.linen.unbox(boxed)["params"])
    kernels = sum(math.prod(x.shape) for p, x in flat.items() if p[-1] == "kernel")
    return 4 * (kernels + (config.vocab_size * config.d_model if config.tie_embeddings else 0))


def summary(variables: dict, config: ModelConfig) -> dict[str, Any]:
    """Bytes and the ratio to float32 of the matmul weights, for logs and benchmarks."""
    sizes = weight_bytes(variables)
    reference = float_matmul_bytes(config)
    return {**sizes, "float32_matmul": reference,
            "matmul_ratio": sizes["matmul"] / reference if reference else None,
            "quantize": config.quantize, "group_size": config.quant_group_size,
            "kv_cache_dtype": config.kv_cache_dtype}
