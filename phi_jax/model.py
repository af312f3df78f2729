"""One decoder-only transformer in Flax linen (Phi, Llama, Mistral, Qwen2, Phi-3): pure `init` /
`apply`, explicit KV cache.

Letters: B batch, T new tokens, S cache slots (or keys), D model dim, N query heads, K kv heads,
H head dim, F mlp dim, V vocab, R LoRA rank. Layers are spelled out (`layers`), never a letter.

The families differ only in `ModelConfig` switches, not in copies of the block:
  * block "parallel" (Phi): one LayerNorm feeds attention and the MLP side by side, both added to
    the residual; "sequential" (Llama and the rest): attention, then the MLP, each behind its own
    norm and residual.
  * norm LayerNorm or RMSNorm; MLP gelu (tanh) or SwiGLU; biases per projection; tied embeddings.
  * rotary on the first `rotary_dim` dims of every head, optionally scaled (linear, llama3,
    longrope; `phi_jax.kernels.rope`); a sliding window from some layer on.
  * LoRA (`lora_rank` > 0): the linear layers named in `lora_targets` add (alpha / R) x A B,
    PEFT's adapter, beside their kernel (`phi_jax.lora` reads, writes and merges it).

    logits, cache = Phi(config).apply(variables, tokens, positions, segment_ids, cache)
    hidden, cache = Phi(config).apply(variables, tokens, ..., return_hidden=True)  # [B,T,D], no head

The cache is an explicit pytree argument and result ({"k", "v": [layers,B,K,S,H], "lengths": [B]}),
so decode steps jit with donation and no mutable collections. Tokens given with a cache are written
at slots `lengths[b] + t`; right padding (segment id 0) is allowed and does not advance `lengths`.
Parameter names follow HF's module names (Phi's, and Llama's for what Phi lacks) so the checkpoint
mapping in `phi_jax.hf` reads as a table.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from phi_jax import axes
from phi_jax.config import ModelConfig
from phi_jax.errors import ConfigError, InputError
from phi_jax.kernels import quantized
from phi_jax.kernels.attention import (attention, cached_attention, masked_attention,
                                       reference_cached_attention_before_write, self_attention_mask)
from phi_jax.kernels.rope import RopeScaling, longrope_attention_factor
from phi_jax.kernels.rotary import rotary

Cache = dict[str, jax.Array]

_INIT = nn.initializers.normal(stddev=0.02)  # HF initializer_range
_NO_WINDOW = jnp.iinfo(jnp.int32).max


class _Dense(nn.Module):
    """y = einsum(spec, x, kernel) (+ bias), with the kernel stored at its full (unflattened) shape.

    flax's DenseGeneral initialises a flattened kernel and reshapes it, which breaks logical
    partitioning metadata under a mesh; this keeps one shape and one set of axis names.
    """

    features: tuple[int, ...]
    in_features: tuple[int, ...]
    in_names: tuple[str, ...]
    out_names: tuple[str, ...]
    spec: str
    config: ModelConfig
    use_bias: bool = True

    @nn.compact
    def __call__(self, x):
        c = self.config
        if c.quantize:
            y = self._quantized(x)
        else:
            kernel = self.param("kernel", nn.with_logical_partitioning(_INIT, self.in_names + self.out_names),
                                self.in_features + self.features, c.jnp_param_dtype)
            y = jnp.einsum(self.spec, x.astype(c.jnp_dtype), kernel.astype(c.jnp_dtype))
        if self.name in c.lora_modules:
            y = y + self._lora(x)
        if not self.use_bias:
            return y
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, self.out_names),
                          self.features, c.jnp_param_dtype)
        return y + bias.astype(c.jnp_dtype)

    def _quantized(self, x):
        """The same einsum over an int8/int4 kernel, dequantized inside the step (`phi_jax.quant`):
        "kernel_q" [G, g, *out] and "kernel_scale" [G, *out] replace "kernel"."""
        c = self.config
        mode, group = quant_layout(c, self.name)
        groups = quantized.group_count(quantized.in_size(self.in_features), group)
        size = quantized.in_size(self.in_features) // groups
        q = self.param("kernel_q", nn.with_logical_partitioning(nn.initializers.zeros, (None, None) + self.out_names),
                       (groups, size) + self.features, quantized.INT_DTYPES[mode])
        scale = self.param("kernel_scale", nn.with_logical_partitioning(nn.initializers.ones, (None,) + self.out_names),
                           (groups,) + self.features, jnp.float16)
        return quantized.quantized_einsum(self.spec, x, q, scale, self.in_features, c.jnp_dtype)

    def _lora(self, x):
        """(alpha / r) * (x A) B, PEFT's LoRA: A [*in, R] and B [R, *out] beside the kernel, B zero
        at init so a fresh adapter changes nothing. R is the LoRA rank (replicated)."""
        c = self.config
        ins, rest = self.spec.split(",")
        kernel_letters, out = rest.split("->")
        k_in, k_out = kernel_letters[:len(self.in_features)], kernel_letters[len(self.in_features):]
        lead = "".join(ch for ch in ins if ch not in k_in)  # the batch letters, e.g. "BT"
        a_names, b_names = self.in_names + (axes.LORA_RANK,), (axes.LORA_RANK,) + self.out_names
        a = self.param("lora_a", nn.with_logical_partitioning(_lora_a_init, a_names),
                       self.in_features + (c.lora_rank,), c.jnp_param_dtype)
        b = self.param("lora_b", nn.with_logical_partitioning(nn.initializers.zeros, b_names),
                       (c.lora_rank,) + self.features, c.jnp_param_dtype)
        h = jnp.einsum(f"{ins},{k_in}R->{lead}R", x.astype(c.jnp_dtype), a.astype(c.jnp_dtype))
        scale = c.lora_alpha / c.lora_rank
        return jnp.einsum(f"{lead}R,R{k_out}->{out}", h, b.astype(c.jnp_dtype)) * scale


def quant_layout(config: ModelConfig, name: str) -> tuple[str, int | None]:
    """(int dtype, group size) of a quantized linear layer. The LM head is int8 (in the model's
    groups) whatever `quantize` says: it decides every sampled token, and llama.cpp's q4_0 files
    keep their output / embedding tensor at q8_0 or better too (which int8 in groups of 32 holds
    exactly)."""
    if name == "lm_head":
        return "int8", config.quant_group_size
    return config.quantize, config.quant_group_size


def _lora_a_init(key, shape, dtype):
    """PEFT's default for A (kaiming-uniform with a=sqrt(5)): uniform in +-1/sqrt(fan_in)."""
    fan_in = 1
    for n in shape[:-1]:
        fan_in *= n
    bound = 1.0 / fan_in ** 0.5
    return jax.random.uniform(key, shape, dtype, -bound, bound)


def _dense(features, in_features, in_names, out_names, spec, config: ModelConfig, name: str,
           use_bias: bool = True):
    features = features if isinstance(features, tuple) else (features,)
    in_features = in_features if isinstance(in_features, tuple) else (in_features,)
    return _Dense(features, in_features, tuple(in_names), tuple(out_names), spec, config, use_bias,
                  name=name)


class _RMSNorm(nn.Module):
    """x / rms(x) * scale, computed in float32 and cast back before the scale, as HF's RMSNorm
    (so bf16 models round where transformers' do)."""

    config: ModelConfig
    axis_name: str = axes.NORM

    @nn.compact
    def __call__(self, x):
        c = self.config
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, (self.axis_name,)),
                           (x.shape[-1],), c.jnp_param_dtype)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + c.layer_norm_eps)
        return scale.astype(c.jnp_dtype) * normed.astype(c.jnp_dtype)


def _norm(config: ModelConfig, name: str, axis_name: str = axes.NORM):
    if config.norm == "rmsnorm":
        return _RMSNorm(config, axis_name, name=name)
    return nn.LayerNorm(
        epsilon=config.layer_norm_eps, dtype=config.jnp_dtype, param_dtype=config.jnp_param_dtype,
        name=name,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones, (axis_name,)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (axis_name,)))


def rope_scaling(config: ModelConfig) -> RopeScaling | None:
    """The kernels' view of the config's rotary scaling (None for plain rotary); longrope's
    attention factor resolved as transformers does when the config does not fix it."""
    if config.rope_type == "default":
        return None
    original = config.rope_original_max_len or config.max_len
    attention = config.rope_attention_factor
    if attention is None:
        attention = 1.0
        if config.rope_type == "longrope":
            attention = longrope_attention_factor(config.rope_factor, original)
    return RopeScaling(config.rope_type, float(config.rope_factor or 1.0), config.rope_low_freq_factor,
                       config.rope_high_freq_factor, original, config.rope_short_factor,
                       config.rope_long_factor, float(attention))


# ------------------------------------------------------------------------------ sliding window
def _layer_window(config: ModelConfig, layer):
    """This layer's window: None (full attention), an int, or (scanned layers) a traced int."""
    window, start = config.sliding_window, config.sliding_window_start
    if window is None or start == 0:
        return window
    if isinstance(layer, int):
        return window if layer >= start else None
    return jnp.where(layer >= start, window, _NO_WINDOW)


def _window_bites(config: ModelConfig, keys: int, what: str) -> bool:
    """Whether a window can mask anything among `keys` keys; if so, only the XLA path has the mask.

    A window at least as long as the sequence (or the cache) masks nothing, so the fused kernels
    stay usable there; past that they would silently attend too far, hence the error.
    """
    window = config.sliding_window
    if window is None or window >= keys:
        return False
    if config.attention_impl != "xla":
        raise ConfigError(
            f"ModelConfig.sliding_window={window} is shorter than these {keys} {what}, and the "
            f"{config.attention_impl!r} attention kernel has no sliding-window mask; set "
            "attention_impl='xla' for this model, or keep sequences and caches within the window")
    return True


def _self_attention(q, key, value, segment_ids, window, config: ModelConfig):
    """q [B,T,N,H], key/value [B,T,K,H]: causal, within segments, within the window."""
    b, t = q.shape[:2]
    if window is None or not _window_bites(config, t, "tokens"):
        return attention(q, key, value, segment_ids=segment_ids, causal=True, impl=config.attention_impl)
    idx = jnp.arange(t)
    near = (idx[:, None] - idx[None, :]) < window  # [T,T] query minus key index
    return masked_attention(q, key, value, self_attention_mask(segment_ids, b, t, True) & near[None])


def _cached_attention(q, k_cache, v_cache, q_start, window, config: ModelConfig, k_scale=None,
                      v_scale=None):
    """q [B,T,N,H] at slots q_start[b] + t against k/v_cache [B,K,S,H] (int8: scales [B,K,S])."""
    t, s = q.shape[1], k_cache.shape[2]
    if window is None or not _window_bites(config, s, "cache slots"):
        return cached_attention(q, k_cache, v_cache, q_start=q_start, impl=config.attention_impl,
                                k_scale=k_scale, v_scale=v_scale)
    q_slot = q_start[:, None] + jnp.arange(t)[None, :]  # [B,T]
    slot = jnp.arange(s)[None, None, :]  # [1,1,S]
    mask = (slot <= q_slot[:, :, None]) & (slot > q_slot[:, :, None] - window)  # [B,T,S]
    return masked_attention(q, k_cache, v_cache, mask, kv_layout="BKSH", k_scale=k_scale,
                            v_scale=v_scale)


class PhiAttention(nn.Module):
    """Multi-head (or grouped-query) attention with (partial, scaled) rotary, optional q/k norm and
    sliding window."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x, positions, segment_ids, kv_cache=None, layer=None, q_start=None):
        """x [B,T,D]; positions, segment_ids [B,T]; kv_cache {"k","v": [layers,B,K,S,H]} or None.

        With a cache, this layer's new keys and values are written into `kv_cache` at
        [layer, b, q_start[b] + t] and the whole stacked cache is returned, so a scan over layers
        carries one buffer that XLA updates in place (scanning per-layer slices in and out instead
        rebuilds the whole cache every decode step).
        Returns (out [B,T,D], updated kv_cache or None).
        """
        c = self.config
        n, k, h = c.n_heads, c.num_kv_heads, c.dim_per_head
        d = c.d_model
        q = _dense((n, h), d, (axes.EMBED,), (axes.HEADS, axes.HEAD_DIM), "BTD,DNH->BTNH", c,
                   "q_proj", c.qkv_bias)(x)
        key = _dense((k, h), d, (axes.EMBED,), (axes.KV_HEADS, axes.HEAD_DIM), "BTD,DKH->BTKH", c,
                     "k_proj", c.qkv_bias)(x)
        value = _dense((k, h), d, (axes.EMBED,), (axes.KV_HEADS, axes.HEAD_DIM), "BTD,DKH->BTKH", c,
                       "v_proj", c.qkv_bias)(x)
        if c.qk_layernorm:
            q = _norm(c, "q_layernorm")(q)
            key = _norm(c, "k_layernorm")(key)
        rope = dict(rotary_dim=c.rotary_dim, theta=c.rope_theta, scaling=rope_scaling(c),
                    impl=c.rotary_impl)
        q = rotary(q, positions, **rope)
        key = rotary(key, positions, **rope)
        q = nn.with_logical_constraint(q, (axes.BATCH, axes.LENGTH, axes.HEADS, axes.HEAD_DIM))

        window = _layer_window(c, layer)
        if kv_cache is None:
            out = _self_attention(q, key, value, segment_ids, window, c)
            new_cache = None
        else:
            read_first = _reads_before_write(kv_cache, q, c)
            write_at = q_start
            # An int8 cache stores (values, per-(token, kv head) scales); the new tokens attend to
            # themselves as stored, so reading before or after the write gives the same answer.
            new_kv = {"k": key, "v": value}
            if c.kv_cache_dtype == "int8":
                for name in ("k", "v"):
                    new_kv[name], new_kv[f"{name}_scale"] = quantized.quantize_kv(new_kv[name])
            if read_first:
                k_old, k_scale = _cache_layer(kv_cache, "k", layer, q.dtype)
                v_old, v_scale = _cache_layer(kv_cache, "v", layer, q.dtype)
                out = reference_cached_attention_before_write(
                    q, k_old, v_old, *_new_layer(new_kv, q.dtype), q_start=q_start, window=window,
                    k_scale=k_scale, v_scale=v_scale)
                # The write must follow the read, or XLA keeps both apart with copies: slots that
                # depend on the attention's output (and always equal q_start) order them. (An
                # optimization barrier does not: on CPU it copies the cache itself.)
                write_at = jnp.minimum(q_start, q_start + jnp.isnan(out[:, 0, 0, 0]).astype(jnp.int32))
            new_cache = {name: _write_cache(kv_cache[name], new_kv[name], layer, write_at)
                         for name in new_kv}
            if not read_first:
                k_layer, k_scale = _cache_layer(new_cache, "k", layer, q.dtype)
                v_layer, v_scale = _cache_layer(new_cache, "v", layer, q.dtype)
                out = _cached_attention(q, k_layer, v_layer, q_start, window, c, k_scale, v_scale)
        out = _dense(d, (n, h), (axes.HEADS, axes.HEAD_DIM), (axes.EMBED,), "BTNH,NHD->BTD", c,
                     "dense", c.out_bias)(out)
        return out, new_cache


def _cache_layer(cache, name: str, layer, dtype):
    """(this layer's k or v [B,K,S,H], its scales [B,K,S] or None). A float cache is cast to the
    compute dtype; an int8 one stays int8 for the attention to scale (`kernels.quantized`)."""
    values = cache[name][layer]
    if f"{name}_scale" not in cache:
        return values.astype(dtype), None
    return values, cache[f"{name}_scale"][layer]


def _new_layer(new_kv, dtype):
    """The new tokens' (k, v) [B,T,K,H] as the cache holds them (dequantized when int8)."""
    return tuple(quantized.dequantize_kv(new_kv[n], new_kv.get(f"{n}_scale"), dtype) for n in ("k", "v"))


def _reads_before_write(kv_cache, q: jax.Array, config: ModelConfig) -> bool:
    """Whether this attention reads the cache before writing the new token into it: one new token,
    the XLA reference, and a per-layer cache (the CPU inference layout, see `init_cache`).

    XLA:CPU otherwise copies the cache of every layer three times per decode step (see
    `reference_cached_attention_before_write`); the stacked cache of scanned layers (accelerators)
    and the fused kernels keep the write-then-read order they were measured with.
    """
    return q.shape[1] == 1 and config.attention_impl == "xla" and isinstance(kv_cache["k"], tuple)


def _write_cache(buf, new: jax.Array, layer, q_start: jax.Array):
    """Store new [B,T,K,H] at [layer, b, :, q_start[b] + t] of the cache.

    `buf` is the stacked [layers,B,K,S,H] array (scanned layers: `layer` is traced) or a tuple of
    per-layer [B,K,S,H] arrays (unstacked layers: `layer` is a Python int; see `init_cache`).
    Slots past the end are dropped, never clamped onto earlier slots (which a dynamic slice would do).
    An int8 cache's scales [B,T,K] go into their [layers,B,K,S] buffers the same way.
    """
    b, t = new.shape[:2]
    slots = q_start[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]  # [B,T]
    rows = jnp.arange(b, dtype=jnp.int32)[:, None]
    # Advanced indices [B,T] around the slice over K come first in the indexed view: [B,T,K,H].
    if isinstance(buf, tuple):
        updated = buf[layer].at[rows, :, slots].set(new.astype(buf[layer].dtype), mode="drop")
        return buf[:layer] + (updated,) + buf[layer + 1:]
    return buf.at[layer, rows, :, slots].set(new.astype(buf.dtype), mode="drop")


class PhiMLP(nn.Module):
    """gelu: fc1 -> gelu_new (the tanh approximation) -> fc2 (Phi);
    swiglu: down_proj(silu(gate_proj x) * up_proj x) (Llama, Phi-3, ...)."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x):
        c = self.config

        def dense(name, features, in_features, in_names, out_names, spec):
            return _dense(features, in_features, in_names, out_names, spec, c, name, c.mlp_bias)

        up = ((axes.EMBED,), (axes.MLP,), "BTD,DF->BTF")
        down = ((axes.MLP,), (axes.EMBED,), "BTF,FD->BTD")
        if c.mlp == "gelu":
            hidden = dense("fc1", c.mlp_dim, c.d_model, *up)(x)
            hidden = nn.with_logical_constraint(hidden, (axes.BATCH, axes.LENGTH, axes.MLP))
            hidden = jax.nn.gelu(hidden, approximate=True)
            return dense("fc2", c.d_model, c.mlp_dim, *down)(hidden)
        gate = dense("gate_proj", c.mlp_dim, c.d_model, *up)(x)
        hidden = jax.nn.silu(gate) * dense("up_proj", c.mlp_dim, c.d_model, *up)(x)
        hidden = nn.with_logical_constraint(hidden, (axes.BATCH, axes.LENGTH, axes.MLP))
        return dense("down_proj", c.d_model, c.mlp_dim, *down)(hidden)


class PhiBlock(nn.Module):
    """parallel: x + attn(n(x)) + mlp(n(x)); sequential: h = x + attn(n1(x)); h + mlp(n2(h))."""

    config: ModelConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, x, positions, segment_ids, kv_cache=None, layer=None, q_start=None):
        c = self.config
        normed = _norm(c, "input_layernorm")(x)
        attn_out, new_cache = PhiAttention(c, name="self_attn")(
            normed, positions, segment_ids, kv_cache, layer, q_start)
        drop = nn.Dropout(rate=c.resid_pdrop, deterministic=self.deterministic)
        if c.block == "parallel":
            x = x + drop(attn_out) + drop(PhiMLP(c, name="mlp")(normed))
        else:
            x = x + drop(attn_out)
            x = x + drop(PhiMLP(c, name="mlp")(_norm(c, "post_attention_layernorm")(x)))
        x = nn.with_logical_constraint(x, (axes.BATCH, axes.LENGTH, axes.EMBED))
        return x, new_cache


class _ScannedBlock(nn.Module):
    """PhiBlock in the (carry, xs) -> (carry, ys) form that nn.scan wants.

    carry = (x, stacked kv cache or None); xs = the layer index; no ys.
    """

    config: ModelConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, carry, layer, positions, segment_ids, q_start):
        x, kv_cache = carry
        x, kv_cache = PhiBlock(self.config, self.deterministic, name="block")(
            x, positions, segment_ids, kv_cache, layer, q_start)
        return (x, kv_cache), None


_REMAT_POLICIES = {
    "full": None,
    "dots_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _maybe_remat(module_cls, config: ModelConfig, decoding: bool = False):
    """The block, rematerialised per `config.remat_policy`. Remat only trades activation memory for
    recompute in a backward pass; a forward with a KV cache (`decoding`) is inference and has none,
    and an unrolled block's Python layer index must stay static there."""
    if config.remat_policy == "none" or decoding:
        return module_cls
    return nn.remat(module_cls, policy=_REMAT_POLICIES[config.remat_policy], prevent_cse=not config.scan_layers,
                    static_argnums=())


class Phi(nn.Module):
    """The causal language model (every family). See the module docstring for the calling convention."""

    config: ModelConfig

    @nn.compact
    def __call__(self, tokens, positions=None, segment_ids=None, cache: Cache | None = None,
                 deterministic: bool = True, return_hidden: bool = False):
        """Args:
          tokens: [B,T] int token ids.
          positions: [B,T] int rotary positions; default: 0..T-1, or continuing from the cache.
          segment_ids: [B,T] int document ids (packed rows; 0 = padding); default: all ones.
          cache: KV cache from `init_cache` (or a previous call), or None.
          deterministic: False enables dropout (needs a "dropout" rng).
          return_hidden: return the final-normed hidden states instead of logits, without
            computing the LM head (embeddings for classifiers, which mean-pool them).
        Returns:
          (logits [B,T,V] float32, or hidden [B,T,D] in the compute dtype; updated cache or None).
        """
        c = self.config
        tokens = jnp.asarray(tokens)
        if tokens.ndim != 2:
            raise InputError(f"tokens must be [batch, length], got shape {tokens.shape}; add a batch "
                             "axis (tokens[None]) for a single sequence")
        b, t = tokens.shape
        if segment_ids is None:
            segment_ids = jnp.ones((b, t), jnp.int32)
        q_start = None
        if cache is not None:
            _check_cache(cache, c, b)
            q_start = cache["lengths"]
            if positions is None:
                positions = q_start[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
        elif positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        if c.rope_type == "longrope":
            # longrope picks its factors from the longest sequence of the call: padding (which
            # may sit at positions past every real token) must not count.
            positions = jnp.where(segment_ids != 0, positions, 0)

        embed = nn.Embed(c.vocab_size, c.d_model, dtype=c.jnp_dtype, param_dtype=c.jnp_param_dtype,
                         embedding_init=nn.with_logical_partitioning(_INIT, (axes.VOCAB, axes.EMBED)),
                         name="embed_tokens")
        x = embed(tokens)  # [B,T,D]
        x = nn.Dropout(rate=c.embd_pdrop, deterministic=deterministic)(x)
        x = nn.with_logical_constraint(x, (axes.BATCH, axes.LENGTH, axes.EMBED))

        kv_cache = None if cache is None else {name: cache[name] for name in cache_arrays(cache)}
        if c.scan_layers:
            scanned = nn.scan(
                _maybe_remat(_ScannedBlock, c, decoding=cache is not None),
                variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast), length=c.n_layers,
                metadata_params={nn.PARTITION_NAME: axes.LAYERS})
            (x, kv_cache), _ = scanned(c, deterministic, name="layers")(
                (x, kv_cache), jnp.arange(c.n_layers, dtype=jnp.int32), positions, segment_ids,
                q_start)
        else:
            block_cls = _maybe_remat(PhiBlock, c, decoding=cache is not None)
            for i in range(c.n_layers):
                x, kv_cache = block_cls(c, deterministic, name=f"layers_{i}")(
                    x, positions, segment_ids, kv_cache, i, q_start)

        x = _norm(c, "final_layernorm")(x)
        new_cache = None
        if cache is not None:
            new_cache = dict(kv_cache)
            new_cache["lengths"] = cache["lengths"] + jnp.sum(segment_ids != 0, axis=1).astype(jnp.int32)
        if return_hidden:
            return nn.with_logical_constraint(x, (axes.BATCH, axes.LENGTH, axes.EMBED)), new_cache
        if c.tie_embeddings and not c.quantize:
            logits = embed.attend(x)  # 'BTD,VD->BTV' in the compute dtype
        elif c.tie_embeddings:  # an int8 copy of the embedding, transposed (phi_jax.quant)
            logits = _dense(c.vocab_size, c.d_model, (axes.EMBED,), (axes.VOCAB,), "BTD,DV->BTV", c,
                            "lm_head", False)(x)
        else:
            logits = _dense(c.vocab_size, c.d_model, (axes.EMBED,), (axes.VOCAB,), "BTD,DV->BTV", c,
                            "lm_head", c.lm_head_bias)(x)
        logits = nn.with_logical_constraint(logits.astype(jnp.float32),
                                            (axes.BATCH, axes.LENGTH, axes.VOCAB))
        return logits, new_cache


def _check_cache(cache: Cache, config: ModelConfig, batch: int) -> None:
    expected = (config.n_layers, batch, config.num_kv_heads, None, config.dim_per_head)  # [layers,B,K,S,H]
    for name in ("k", "v"):
        kv = cache[name]
        if isinstance(kv, tuple):  # per-layer arrays: check them as if stacked
            shapes = {x.shape for x in kv}
            shape = (len(kv), *next(iter(shapes))) if len(shapes) == 1 and kv else (len(kv), "mixed")
        else:
            shape = kv.shape
        if len(shape) != 5 or any(e is not None and e != s for e, s in zip(expected, shape)):
            raise InputError(f"cache[{name!r}] has shape {shape}, expected [layers={config.n_layers}, "
                             f"batch={batch}, kv_heads={config.num_kv_heads}, slots, "
                             f"head_dim={config.dim_per_head}]; build it with init_cache(config, {batch}, ...)")


CACHE_ARRAYS = ("k", "v", "k_scale", "v_scale")


def cache_arrays(cache: Cache) -> tuple[str, ...]:
    """The per-slot arrays of a cache: k and v, and an int8 cache's k_scale and v_scale."""
    return tuple(name for name in CACHE_ARRAYS if name in cache)


def init_cache(config: ModelConfig, batch: int, max_len: int, dtype: Any = None) -> Cache:
    """An empty KV cache with `max_len` slots per sequence (dtype defaults to the compute dtype).

    With `config.kv_cache_dtype="int8"` (and no `dtype`) k and v are int8 with float32 scales per
    (sequence, kv head, slot), "k_scale"/"v_scale" [layers,B,K,S]: half the bytes a decode step's
    attention reads in bf16, a quarter in float32 (see `phi_jax.kernels.quantized`).

    Layout [layers,B,K,S,H]: a kv head's slots are contiguous, which is what a decode step's attention
    dots (and the Pallas decode kernel's blocks) read without a transpose. With scanned layers it is
    one stacked array (the scan carries it); with unstacked layers (`scan_layers=False`, the CPU
    inference layout) it is a tuple of per-layer [B,K,S,H] arrays, because XLA:CPU copies a layer's
    slice out of a stacked cache before the attention dots read it — 2 x [B,K,S,H] per layer per
    step, 27 % of a batch-16 decode step of the tiny model (measured in an xprof trace).
    """
    int8 = dtype is None and config.kv_cache_dtype == "int8" or dtype is not None and jnp.dtype(dtype) == jnp.int8
    dtype = (jnp.int8 if int8 else config.jnp_dtype) if dtype is None else dtype
    layer_shape = (batch, config.num_kv_heads, max_len, config.dim_per_head)

    def make(shape=layer_shape, dtype=dtype):
        if config.scan_layers:
            return jnp.zeros((config.n_layers, *shape), dtype)
        return tuple(jnp.zeros(shape, dtype) for _ in range(config.n_layers))

    cache = {"k": make(), "v": make(), "lengths": jnp.zeros((batch,), jnp.int32)}
    if int8:
        cache["k_scale"], cache["v_scale"] = make(layer_shape[:3], jnp.float32), make(layer_shape[:3], jnp.float32)
    return cache


def cache_rows(kv, rows: int, slots: int | None = None):
    """The first `rows` sequences (and first `slots` positions) of a cache's k or v, stacked array or
    per-layer tuple. A copy on XLA:CPU: decoding a chunk on it reads only what is in use."""
    if isinstance(kv, tuple):
        return tuple(x[:rows, :, :slots] for x in kv)
    return kv[:, :rows, :, :slots]


def put_cache_rows(kv, sub):
    """`kv` with its first rows replaced by `sub` (from `cache_rows`), in place when donated."""
    if isinstance(kv, tuple):
        return tuple(jax.lax.dynamic_update_slice(x, y, (0,) * x.ndim) for x, y in zip(kv, sub))
    return jax.lax.dynamic_update_slice(kv, sub, (0,) * kv.ndim)


def gather_cache_rows(kv, slots: jax.Array, span: int):
    """The sequences `slots` [N] of a cache's k or v, their first `span` positions (a copy).
    Out-of-range slots (padding rows) read the last row."""
    if isinstance(kv, tuple):
        return tuple(jnp.take(x[:, :, :span], slots, axis=0, mode="clip") for x in kv)
    return jnp.take(kv[:, :, :, :span], slots, axis=1, mode="clip")


def scatter_cache_rows(kv, slots: jax.Array, rows_kv):
    """`kv` with the sequences `rows_kv` (N rows of P slots) written into rows `slots` [N];
    out-of-range slots (padding rows) are dropped."""
    if isinstance(kv, tuple):
        return tuple(x.at[slots, :, :y.shape[2]].set(y.astype(x.dtype), mode="drop")
                     for x, y in zip(kv, rows_kv))
    return kv.at[:, slots, :, :rows_kv.shape[3]].set(rows_kv.astype(kv.dtype), mode="drop")


def init_params(config: ModelConfig, rng: jax.Array) -> dict:
    """Random parameters (boxed logical-axis metadata removed): {"params": ...}.

    The same weights whatever the layer layout: unrolled layers (`scan_layers=False`) are
    initialised stacked and then split (`unstack_layers`), so a seed gives one model and
    `scan_layers` changes only the program that runs it.
    """
    if not config.scan_layers:
        stacked = config.replace(scan_layers=True)
        return unstack_layers(Phi(stacked), init_params(stacked, rng))[1]
    variables = Phi(config).init(rng, jnp.zeros((1, 1), jnp.int32))
    return nn.unbox(variables)


def abstract_params(config: ModelConfig) -> dict:
    """Shapes and dtypes of the parameters, allocating nothing (jax.eval_shape)."""
    return jax.eval_shape(lambda: init_params(config, jax.random.key(0)))


def param_logical_axes(config: ModelConfig) -> dict:
    """The logical axis names of every parameter, as a pytree of PartitionSpecs."""
    boxed = jax.eval_shape(lambda: Phi(config).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))
    return nn.get_partition_spec(boxed)


def unstack_layers(model: Phi, variables: dict) -> tuple[Phi, dict]:
    """(model, variables) with scanned layers ("layers"/"block", leading axis `layers`) split into
    `layers_0` ... `layers_{n_layers-1}`, and a config with scan_layers=False. Same function, same
    logits.

    Why: inside a scan XLA:CPU slices each layer's weights out of the stack with a copy on every
    call. Training amortises that over thousands of tokens; a decode step reads every weight once
    per token, so the copy doubles its memory traffic (phi-100m, batch 1: 33 -> 19 ms per token on
    this repo's 2-core machine). GPU and TPU fuse the slice into the matmul, so
    `inference_layout` only applies this on CPU. Already-unstacked input is returned as is.
    """
    config = model.config
    params = variables["params"]
    if not config.scan_layers or "layers" not in params:
        return model, variables
    stacked = params["layers"]["block"]
    new_params = {name: value for name, value in params.items() if name != "layers"}
    for i in range(config.n_layers):
        new_params[f"layers_{i}"] = jax.tree.map(lambda a, i=i: a[i], stacked)
    return Phi(config.replace(scan_layers=False)), {**variables, "params": new_params}


def stack_layers(model: Phi, variables: dict) -> tuple[Phi, dict]:
    """The inverse of `unstack_layers` (scan_layers=True, one "layers"/"block" stack)."""
    config = model.config
    params = variables["params"]
    if config.scan_layers:
        return model, variables
    per_layer = [params[f"layers_{i}"] for i in range(config.n_layers)]
    new_params = {name: value for name, value in params.items() if not name.startswith("layers_")}
    new_params["layers"] = {"block": jax.tree.map(lambda *a: jnp.stack(a), *per_layer)}
    return Phi(config.replace(scan_layers=True)), {**variables, "params": new_params}


def decode_prefers_unstacked() -> bool:
    """Whether inference on the default backend should use unstacked layers (see `unstack_layers`).

    Loaders pass `scan_layers=not decode_prefers_unstacked()` to `from_pretrained`, which then
    builds the unstacked form directly instead of copying a stacked one.
    """
    return jax.default_backend() == "cpu"


def inference_layout(model: Phi, variables: dict) -> tuple[Phi, dict]:
    """The parameter layout that decodes fastest on the default backend: unstacked layers on CPU
    (see `unstack_layers`), unchanged elsewhere."""
    if decode_prefers_unstacked():
        return unstack_layers(model, variables)
    return model, variables


def lm_head_logits(config: ModelConfig, params: dict, hidden: jax.Array) -> jax.Array:
    """The LM head of `Phi` applied to final-normed hidden states [..., D] -> float32 logits [..., V].

    The same arithmetic as the head inside `Phi.__call__` (tied: the embedding transposed; else
    the lm_head kernel and optional bias, in the compute dtype), for callers that hold hidden states
    already: the chunked training loss runs the head one chunk at a time with it.
    """
    dtype = config.jnp_dtype
    x = hidden.astype(dtype)
    if config.tie_embeddings:
        logits = jnp.dot(x, params["embed_tokens"]["embedding"].astype(dtype).T)
    else:
        head = params["lm_head"]
        logits = jnp.einsum("...D,DV->...V", x, head["kernel"].astype(dtype))
        if config.lm_head_bias:
            logits = logits + head["bias"].astype(dtype)
    return logits.astype(jnp.float32)
