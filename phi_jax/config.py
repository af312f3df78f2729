"""Model configuration: one frozen dataclass, presets as data, and HF config.json <-> ModelConfig.

One transformer covers the families phi_jax loads; the fields say where they differ:

| family (model_type)       | block      | norm      | mlp    | biases           | rope                     |
|---------------------------|------------|-----------|--------|------------------|--------------------------|
| phi (phi-1, 1.5, 2)       | parallel   | layernorm | gelu   | all              | partial, default         |
| llama (Llama, SmolLM2)    | sequential | rmsnorm   | swiglu | none (optional)  | default, linear, llama3  |
| mistral                   | sequential | rmsnorm   | swiglu | none             | default; sliding window  |
| qwen2                     | sequential | rmsnorm   | swiglu | q/k/v            | default; sliding window  |
| phi3 (Phi-3, 3.5, 4-mini) | sequential | rmsnorm   | swiglu | none             | longrope, partial        |

`model_type` itself only selects the checkpoint layout and config.json keys (phi3 fuses qkv and
gate/up in its files); the forward pass reads the other fields. Every new field's default is
Phi's, so a ModelConfig saved before these fields existed loads as the same Phi model.

Model sizes are data: every published shape is a row in `PRESETS`. `from_hf_config` reads both
config.json forms in use (transformers 4.x: `rope_scaling` + top-level `rope_theta`; 5.x:
`rope_parameters`) and checks the type and range of every key it reads, naming file and key.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax.numpy as jnp

from phi_jax.errors import ConfigError

ATTENTION_IMPLS = ("xla", "pallas", "cudnn")
ROTARY_IMPLS = ("xla", "pallas")
REMAT_POLICIES = ("none", "full", "dots_saveable")
MODEL_TYPES = ("phi", "llama", "mistral", "qwen2", "phi3")
BLOCKS = ("parallel", "sequential")
NORMS = ("layernorm", "rmsnorm")
MLPS = ("gelu", "swiglu")
ROPE_TYPES = ("default", "linear", "llama3", "longrope")  # phi_jax.kernels.rope implements these
QUANTIZE_MODES = ("int8", "int4")  # phi_jax.quant
KV_CACHE_DTYPES = ("int8",)
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def dtype_name(dtype: Any) -> str:
    """Canonical string for a dtype given as a string, numpy dtype or jnp scalar type."""
    try:
        name = jnp.dtype(dtype).name
    except TypeError:
        name = str(dtype)
    if name not in _DTYPES:
        raise ConfigError(f"unsupported dtype {dtype!r}; use one of {sorted(_DTYPES)}")
    return name


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape, architecture switches and numerics of a decoder-only transformer.

    Dtypes are stored as strings ("float32", "bfloat16") so that the config is hashable (it is a
    static argument of jitted functions) and serialises to JSON unchanged.
    """

    vocab_size: int = 51200
    d_model: int = 2048
    n_layers: int = 24
    n_heads: int = 32
    n_kv_heads: int | None = None  # None: same as n_heads (no GQA)
    head_dim: int | None = None  # None: d_model // n_heads
    mlp_dim: int = 8192
    partial_rotary_factor: float = 0.5
    rope_theta: float = 10000.0
    layer_norm_eps: float = 1e-5  # LayerNorm or RMSNorm epsilon
    qk_layernorm: bool = False
    max_len: int = 2048
    resid_pdrop: float = 0.0
    embd_pdrop: float = 0.0
    dtype: str = "float32"  # activations / matmul inputs
    param_dtype: str = "float32"  # parameters as stored in memory
    attention_impl: str = "xla"
    rotary_impl: str = "xla"
    remat_policy: str = "none"
    scan_layers: bool = True
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    # Architecture switches; the defaults are Phi's (see the module docstring).
    model_type: str = "phi"
    block: str = "parallel"  # parallel: x + attn(n(x)) + mlp(n(x)); sequential: Llama's
    norm: str = "layernorm"
    mlp: str = "gelu"  # gelu: fc2(gelu_tanh(fc1 x)); swiglu: down(silu(gate x) * up x)
    qkv_bias: bool = True
    out_bias: bool = True  # the attention output projection
    mlp_bias: bool = True
    lm_head_bias: bool = True
    tie_embeddings: bool = False  # logits = x @ embedding.T, no lm_head
    # Rotary scaling (phi_jax.kernels.rope): linear / llama3 stretch by rope_factor; llama3 and
    # longrope need the pretraining context (None = max_len at construction); longrope its
    # per-frequency factors, its context scale rope_factor (None = max_len / original at
    # construction) and attention factor (None = sqrt(1 + ln(rope_factor) / ln(original))).
    rope_type: str = "default"
    rope_factor: float | None = None
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_len: int | None = None
    rope_short_factor: tuple[float, ...] = ()
    rope_long_factor: tuple[float, ...] = ()
    rope_attention_factor: float | None = None
    sliding_window: int | None = None  # keys within this many slots of the query (None: all)
    sliding_window_start: int = 0  # first layer that uses the window (Qwen2's max_window_layers)
    # LoRA (phi_jax.lora): rank 0 = none. The targets are HF module names of the family's linear
    # layers (PEFT's `target_modules`: q_proj, k_proj, v_proj, o_proj/dense, gate_proj, up_proj,
    # down_proj, fc1, fc2); each gets y += (alpha / rank) * x A B beside its frozen kernel.
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = ()
    # Inference-only quantization (phi_jax.quant): the linear layers' kernels stored as int8 or
    # int4 with float scales per group of `quant_group_size` input rows (None: per output channel,
    # int8 only), dequantized inside the jitted step; the KV cache stored as int8 with a scale per
    # (token, kv head). None keeps everything in the model dtype.
    quantize: str | None = None
    quant_group_size: int | None = None
    kv_cache_dtype: str | None = None

    def __post_init__(self):
        object.__setattr__(self, "dtype", dtype_name(self.dtype))
        object.__setattr__(self, "param_dtype", dtype_name(self.param_dtype))
        for field in ("rope_short_factor", "rope_long_factor", "lora_targets"):  # JSON gives lists
            value = getattr(self, field)
            if isinstance(value, (list, tuple)):
                object.__setattr__(self, field, tuple(value))
        self.validate()
        # Resolved once, so that a later `replace(max_len=...)` (a shorter generation budget, say)
        # never changes the rotation the checkpoint was trained with.
        if self.rope_type in ("llama3", "longrope") and self.rope_original_max_len is None:
            object.__setattr__(self, "rope_original_max_len", self.max_len)
        if self.rope_type == "longrope" and self.rope_factor is None:
            object.__setattr__(self, "rope_factor", self.max_len / self.rope_original_max_len)

    # ----------------------------------------------------------------------------------- derived
    @property
    def num_kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def dim_per_head(self) -> int:
        return self.d_model // self.n_heads if self.head_dim is None else self.head_dim

    @property
    def rotary_dim(self) -> int:
        """Number of leading head dims that get rotary; HF computes it the same way (int of product)."""
        return int(self.dim_per_head * self.partial_rotary_factor)

    @property
    def jnp_dtype(self):
        return _DTYPES[self.dtype]

    @property
    def jnp_param_dtype(self):
        return _DTYPES[self.param_dtype]

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ModelConfig":
        """From `to_dict()` output, today's or an older one (missing fields take Phi's defaults)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(
                f"unknown ModelConfig field(s) {unknown}; valid fields are {sorted(names)}")
        return cls(**dict(d))

    # ---------------------------------------------------------------------------------- validate
    def validate(self) -> None:
        def fail(field: str, problem: str, fix: str):
            raise ConfigError(f"ModelConfig.{field}: {problem}; {fix}")

        for field in dataclasses.fields(self):
            _check_type(self, field.name, fail)
        for field in ("vocab_size", "d_model", "n_layers", "n_heads", "mlp_dim", "max_len"):
            if getattr(self, field) <= 0:
                fail(field, f"must be positive, got {getattr(self, field)}", "set a positive size")
        if self.head_dim is None and self.d_model % self.n_heads:
            fail("n_heads", f"{self.n_heads} heads do not divide d_model={self.d_model}",
                 f"choose n_heads among the divisors of {self.d_model} or set head_dim explicitly")
        if self.head_dim is not None and self.head_dim <= 0:
            fail("head_dim", f"must be positive, got {self.head_dim}", "set a positive head_dim")
        kv = self.num_kv_heads
        if kv <= 0 or self.n_heads % kv:
            fail("n_kv_heads", f"{kv} kv heads do not divide n_heads={self.n_heads}",
                 "use a divisor of n_heads (n_heads itself for plain multi-head attention)")
        if not 0.0 < self.partial_rotary_factor <= 1.0:
            fail("partial_rotary_factor", f"must be in (0, 1], got {self.partial_rotary_factor}",
                 "phi-1/phi-1.5 use 0.5, phi-2 uses 0.4, Llama-style models 1.0")
        if self.rotary_dim % 2 or self.rotary_dim == 0:
            fail("partial_rotary_factor",
                 f"head_dim {self.dim_per_head} x {self.partial_rotary_factor} gives rotary_dim "
                 f"{self.rotary_dim}, which must be even and positive",
                 "pick a factor for which int(head_dim * factor) is a positive even number")
        if self.rope_theta <= 0:
            fail("rope_theta", f"must be positive, got {self.rope_theta}", "the published value is 10000.0")
        for field, allowed in (("attention_impl", ATTENTION_IMPLS), ("rotary_impl", ROTARY_IMPLS),
                               ("remat_policy", REMAT_POLICIES), ("model_type", MODEL_TYPES),
                               ("block", BLOCKS), ("norm", NORMS), ("mlp", MLPS),
                               ("rope_type", ROPE_TYPES)):
            if getattr(self, field) not in allowed:
                fail(field, f"unknown {getattr(self, field)!r}", f"use one of {allowed}")
        for field in ("resid_pdrop", "embd_pdrop"):
            if not 0.0 <= getattr(self, field) < 1.0:
                fail(field, f"must be in [0, 1), got {getattr(self, field)}", "use 0.0 to disable dropout")
        if self.layer_norm_eps <= 0:
            fail("layer_norm_eps", f"must be positive, got {self.layer_norm_eps}", "1e-5 is usual")
        self._validate_rope(fail)
        if self.sliding_window is not None and self.sliding_window <= 0:
            fail("sliding_window", f"must be positive or None, got {self.sliding_window}",
                 "use None for full attention")
        if not 0 <= self.sliding_window_start <= self.n_layers:
            fail("sliding_window_start", f"must be in [0, n_layers={self.n_layers}], got "
                 f"{self.sliding_window_start}", "0 applies the window to every layer")
        self._validate_lora(fail)
        self._validate_quantization(fail)

    def _validate_quantization(self, fail) -> None:
        if self.quantize not in (None,) + QUANTIZE_MODES:
            fail("quantize", f"unknown {self.quantize!r}", f"use one of {list(QUANTIZE_MODES)} or None")
        if self.kv_cache_dtype not in (None,) + KV_CACHE_DTYPES:
            fail("kv_cache_dtype", f"unknown {self.kv_cache_dtype!r}",
                 f"use one of {list(KV_CACHE_DTYPES)} or None (the model dtype)")
        if self.kv_cache_dtype is not None and self.attention_impl != "xla":
            fail("kv_cache_dtype", f"an {self.kv_cache_dtype} cache is read by the XLA attention only, "
                 f"not attention_impl={self.attention_impl!r}", "set attention_impl='xla' to decode with it")
        group = self.quant_group_size
        if group is None:
            if self.quantize == "int4":
                fail("quant_group_size", "int4 needs a group size", "use 32 (q4_0's) or 128")
            return
        if group <= 0:
            fail("quant_group_size", f"must be positive, got {group}", "use 32 or 128")
        for name, size in self.matmul_input_sizes().items():
            if size % group:
                fail("quant_group_size", f"{group} does not divide the {name} input size {size}",
                     f"use a group size that divides {size} (32 divides every preset's)")

    def matmul_input_sizes(self) -> dict[str, int]:
        """The input sizes of the linear layers (what a quantization group must divide)."""
        return {"d_model": self.d_model, "attention output": self.n_heads * self.dim_per_head,
                "mlp": self.mlp_dim}

    def _validate_rope(self, fail) -> None:
        kind = self.rope_type
        if kind in ("linear", "llama3") and (self.rope_factor is None or self.rope_factor <= 0):
            fail("rope_factor", f"rope_type {kind!r} needs a positive factor, got {self.rope_factor}",
                 "set rope_factor (e.g. 8.0 for Llama 3.1, 32.0 for Llama 3.2)")
        if self.rope_original_max_len is not None and self.rope_original_max_len <= 0:
            fail("rope_original_max_len", f"must be positive or None, got {self.rope_original_max_len}",
                 "use the pretraining context length, or None for max_len")
        if kind == "llama3" and self.rope_high_freq_factor <= self.rope_low_freq_factor:
            fail("rope_high_freq_factor", f"{self.rope_high_freq_factor} must exceed "
                 f"rope_low_freq_factor {self.rope_low_freq_factor}", "Llama 3 uses 4.0 and 1.0")
        half = self.rotary_dim // 2
        if kind == "longrope":
            for field in ("rope_short_factor", "rope_long_factor"):
                factors = getattr(self, field)
                if len(factors) != half or any(not isinstance(f, (int, float)) or f <= 0 for f in factors):
                    fail(field, f"longrope needs {half} positive numbers (rotary_dim {self.rotary_dim} "
                         f"/ 2), got {len(factors)}", "copy short_factor / long_factor from the "
                         "checkpoint's config.json")
        elif self.rope_short_factor or self.rope_long_factor:
            fail("rope_short_factor", f"short/long factors are only used by longrope, not {kind!r}",
                 "clear them or set rope_type='longrope'")
        if self.rope_attention_factor is not None and self.rope_attention_factor <= 0:
            fail("rope_attention_factor", f"must be positive or None, got {self.rope_attention_factor}",
                 "None derives it from max_len / rope_original_max_len")

    @property
    def lora_modules(self) -> frozenset[str]:
        """phi_jax module names that carry LoRA (HF's o_proj is phi_jax's `dense`)."""
        if not self.lora_rank:
            return frozenset()
        return frozenset("dense" if t == "o_proj" else t for t in self.lora_targets)

    def lora_target_choices(self) -> tuple[str, ...]:
        """The HF module names LoRA can target in this family (fused Phi-3 tensors excluded)."""
        if self.model_type == "phi":
            return ("q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2")
        if self.model_type == "phi3":  # qkv_proj and gate_up_proj are fused in its checkpoints
            return ("o_proj", "down_proj")
        return ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

    def _validate_lora(self, fail) -> None:
        if self.lora_rank < 0:
            fail("lora_rank", f"must be >= 0, got {self.lora_rank}",
                 "use 0 for full fine-tuning or a small rank such as 8")
        if not self.lora_rank:
            return
        if self.lora_alpha <= 0:
            fail("lora_alpha", f"must be positive, got {self.lora_alpha}", "16.0 is usual")
        choices = self.lora_target_choices()
        if not self.lora_targets:
            fail("lora_targets", "is empty but lora_rank > 0", f"name some of {list(choices)}")
        unknown = [t for t in self.lora_targets if t not in choices]
        if unknown:
            fail("lora_targets", f"unknown module(s) {unknown} for a {self.model_type} model",
                 f"use some of {list(choices)}")

    # -------------------------------------------------------------------------------- size / flops
    @property
    def _norm_params(self) -> int:
        return 2 * self.d_model if self.norm == "layernorm" else self.d_model

    def param_count(self) -> int:
        """Exact number of parameters (the tests hold this equal to eval_shape of the model)."""
        d, f, v = self.d_model, self.mlp_dim, self.vocab_size
        n, k, h = self.n_heads, self.num_kv_heads, self.dim_per_head
        attn = d * n * h + 2 * d * k * h + n * h * d
        attn += (n * h + 2 * k * h) * self.qkv_bias + d * self.out_bias
        if self.qk_layernorm:
            attn += 2 * (2 * h if self.norm == "layernorm" else h)
        matrices = 3 if self.mlp == "swiglu" else 2
        mlp = matrices * d * f + ((matrices - 1) * f + d) * self.mlp_bias
        norms = (1 if self.block == "parallel" else 2) * self._norm_params
        head = 0 if self.tie_embeddings else d * v + v * self.lm_head_bias
        return v * d + self.n_layers * (attn + mlp + norms) + self._norm_params + head

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward = 3x forward), matmuls and causal attention.

        Attention scores and values count T*S/2 pairs per query on average (causal), honestly.
        """
        d, f, v = self.d_model, self.mlp_dim, self.vocab_size
        n, k, h = self.n_heads, self.num_kv_heads, self.dim_per_head
        matrices = 3 if self.mlp == "swiglu" else 2
        matmul_params = self.n_layers * (d * n * h + 2 * d * k * h + n * h * d + matrices * d * f) + d * v
        attention = self.n_layers * 2 * n * h * seq_len / 2  # QK^T and PV, causal half
        return 3 * (2 * matmul_params + 2 * attention)


_FIELD_TYPES = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,)}


def _check_type(config: ModelConfig, name: str, fail) -> None:
    """Types by annotation, so a string where a size belongs fails here and not deep in jit."""
    annotation = ModelConfig.__dataclass_fields__[name].type
    value = getattr(config, name)
    if value is None and "None" in annotation:
        return
    base = annotation.split("|")[0].strip()
    if base.startswith("tuple"):
        if not isinstance(value, tuple):
            fail(name, f"must be a list of numbers, got {value!r}", "give a list of floats")
        return
    allowed = _FIELD_TYPES[base]
    if not isinstance(value, allowed) or (base != "bool" and isinstance(value, bool)):
        fail(name, f"must be {base}, got {value!r} ({type(value).__name__})", f"give a {base} value")


# ------------------------------------------------------------------------------------ presets
_LLAMA = dict(model_type="llama", block="sequential", norm="rmsnorm", mlp="swiglu", qkv_bias=False,
              out_bias=False, mlp_bias=False, lm_head_bias=False, partial_rotary_factor=1.0)
_PHI3 = dict(_LLAMA, model_type="phi3")
_MISTRAL = dict(_LLAMA, model_type="mistral")
_QWEN2 = dict(_LLAMA, model_type="qwen2", qkv_bias=True)
_SMOLLM2 = dict(_LLAMA, vocab_size=49152, rope_theta=100000.0, max_len=8192, tie_embeddings=True,
                bos_token_id=0, eos_token_id=0)

# Published shapes: the config.json files of microsoft/phi-1, phi-1_5, phi-2, Phi-3-mini-4k-instruct,
# Phi-3.5-mini-instruct, Phi-4-mini-instruct, HuggingFaceTB/SmolLM2-{135M,360M,1.7B} and
# meta-llama/Llama-3.2-1B. phi-3.5-mini and phi-4-mini are their shapes at the 4k pretraining
# context: their 128k checkpoints carry 48/64 learned longrope factors each, which
# `from_pretrained` reads from config.json (no preset invents them).
PRESETS: dict[str, ModelConfig] = {
    "phi-1": ModelConfig(vocab_size=51200, d_model=2048, n_layers=24, n_heads=32, mlp_dim=8192,
                         partial_rotary_factor=0.5, max_len=2048),
    "phi-1.5": ModelConfig(vocab_size=51200, d_model=2048, n_layers=24, n_heads=32, mlp_dim=8192,
                           partial_rotary_factor=0.5, max_len=2048),
    "phi-2": ModelConfig(vocab_size=51200, d_model=2560, n_layers=32, n_heads=32, mlp_dim=10240,
                         partial_rotary_factor=0.4, max_len=2048, resid_pdrop=0.1),
    "phi-3-mini-4k": ModelConfig(**_PHI3, vocab_size=32064, d_model=3072, n_layers=32, n_heads=32,
                                 mlp_dim=8192, max_len=4096, sliding_window=2047, bos_token_id=1,
                                 eos_token_id=32000),
    "phi-3.5-mini": ModelConfig(**_PHI3, vocab_size=32064, d_model=3072, n_layers=32, n_heads=32,
                                mlp_dim=8192, max_len=4096, bos_token_id=1, eos_token_id=32000),
    "phi-4-mini": ModelConfig(**dict(_PHI3, partial_rotary_factor=0.75), vocab_size=200064,
                              d_model=3072, n_layers=32, n_heads=24, n_kv_heads=8, mlp_dim=8192,
                              max_len=4096, tie_embeddings=True, bos_token_id=199999,
                              eos_token_id=199999),
    "smollm2-135m": ModelConfig(**_SMOLLM2, d_model=576, n_layers=30, n_heads=9, n_kv_heads=3,
                                mlp_dim=1536),
    "smollm2-360m": ModelConfig(**_SMOLLM2, d_model=960, n_layers=32, n_heads=15, n_kv_heads=5,
                                mlp_dim=2560),
    "smollm2-1.7b": ModelConfig(**dict(_SMOLLM2, rope_theta=130000.0), d_model=2048, n_layers=24,
                                n_heads=32, n_kv_heads=32, mlp_dim=8192),
    "llama-3.2-1b": ModelConfig(**_LLAMA, vocab_size=128256, d_model=2048, n_layers=16, n_heads=32,
                                n_kv_heads=8, mlp_dim=8192, rope_theta=500000.0, max_len=131072,
                                rope_type="llama3", rope_factor=32.0, rope_original_max_len=8192,
                                tie_embeddings=True, bos_token_id=128000, eos_token_id=128001),
    # ~100M parameters: big enough to measure a real train step, small enough for a CPU.
    "phi-100m": ModelConfig(vocab_size=51200, d_model=576, n_layers=12, n_heads=9, mlp_dim=2304,
                            partial_rotary_factor=0.5, max_len=2048),
    # The laptop main job: trains visibly in minutes on 2 CPU cores.
    "tiny": ModelConfig(vocab_size=8192, d_model=256, n_layers=4, n_heads=4, mlp_dim=1024,
                        partial_rotary_factor=0.5, max_len=512),
    # Test sizes. phi-2-tiny keeps phi-2's head dim 80 and rotary factor 0.4.
    "test": ModelConfig(vocab_size=128, d_model=64, n_layers=2, n_heads=4, mlp_dim=128,
                        partial_rotary_factor=0.5, max_len=128),
    "test-phi-2": ModelConfig(vocab_size=128, d_model=160, n_layers=2, n_heads=2, mlp_dim=256,
                              partial_rotary_factor=0.4, max_len=128),
    "test-gqa": ModelConfig(vocab_size=128, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                            mlp_dim=128, partial_rotary_factor=0.5, max_len=128),
    "test-qk-norm": ModelConfig(vocab_size=128, d_model=64, n_layers=2, n_heads=4, mlp_dim=128,
                                partial_rotary_factor=0.5, max_len=128, qk_layernorm=True),
    "test-llama": ModelConfig(**_LLAMA, vocab_size=128, d_model=64, n_layers=2, n_heads=4,
                              n_kv_heads=2, mlp_dim=96, max_len=256, rope_type="llama3",
                              rope_factor=8.0, rope_original_max_len=32, tie_embeddings=True),
    "test-phi3": ModelConfig(**_PHI3, vocab_size=128, d_model=64, n_layers=2, n_heads=4, mlp_dim=96,
                             max_len=64, rope_type="longrope", rope_original_max_len=16,
                             rope_short_factor=tuple(1.0 + 0.1 * i for i in range(8)),
                             rope_long_factor=tuple(1.5 + 0.5 * i for i in range(8))),
    "test-phi4": ModelConfig(**dict(_PHI3, partial_rotary_factor=0.75), vocab_size=128, d_model=64,
                             n_layers=2, n_heads=4, n_kv_heads=2, mlp_dim=96, max_len=128,
                             tie_embeddings=True),
    "test-mistral": ModelConfig(**_MISTRAL, vocab_size=128, d_model=64, n_layers=2, n_heads=4,
                                n_kv_heads=2, head_dim=24, mlp_dim=96, max_len=128, sliding_window=7),
    "test-qwen2": ModelConfig(**_QWEN2, vocab_size=128, d_model=64, n_layers=3, n_heads=4, n_kv_heads=2,
                              mlp_dim=96, max_len=128, rope_theta=1e6, tie_embeddings=True,
                              sliding_window=5, sliding_window_start=1),
}


def preset(name: str, **overrides) -> ModelConfig:
    """A preset by name, with field overrides (`preset("phi-2", dtype="bfloat16")`)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; available: {sorted(PRESETS)}")
    return PRESETS[name].replace(**overrides) if overrides else PRESETS[name]
