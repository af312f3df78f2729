"""Model configuration: one frozen dataclass, presets as data, and HF config.json <-> ModelConfig.

Model sizes are data, not code: every published Phi shape is a row in `PRESETS`, and the tiny
rows are what tests and the laptop main job use. `from_hf_config` reads both config.json forms
found in the wild (legacy top-level `partial_rotary_factor`/`rope_theta`, and the newer
`rope_parameters` dict), so a checkpoint from any transformers version loads.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax.numpy as jnp

ATTENTION_IMPLS = ("xla", "pallas", "cudnn")
ROTARY_IMPLS = ("xla", "pallas")
REMAT_POLICIES = ("none", "full", "dots_saveable")
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def dtype_name(dtype: Any) -> str:
    """Canonical string for a dtype given as a string, numpy dtype or jnp scalar type."""
    name = jnp.dtype(dtype).name
    if name not in _DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; use one of {sorted(_DTYPES)}")
    return name


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a Phi transformer.

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
    layer_norm_eps: float = 1e-5
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

    def __post_init__(self):
        object.__setattr__(self, "dtype", dtype_name(self.dtype))
        object.__setattr__(self, "param_dtype", dtype_name(self.param_dtype))
        self.validate()

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
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(
                f"unknown ModelConfig field(s) {unknown}; valid fields are {sorted(names)}")
        return cls(**dict(d))

    # ---------------------------------------------------------------------------------- validate
    def validate(self) -> None:
        def fail(field: str, problem: str, fix: str):
            raise ValueError(f"ModelConfig.{field}: {problem}; {fix}")

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
                 "phi-1/phi-1.5 use 0.5, phi-2 uses 0.4")
        if self.rotary_dim % 2 or self.rotary_dim == 0:
            fail("partial_rotary_factor",
                 f"head_dim {self.dim_per_head} x {self.partial_rotary_factor} gives rotary_dim "
                 f"{self.rotary_dim}, which must be even and positive",
                 "pick a factor for which int(head_dim * factor) is a positive even number")
        if self.rope_theta <= 0:
            fail("rope_theta", f"must be positive, got {self.rope_theta}", "the published value is 10000.0")
        if self.attention_impl not in ATTENTION_IMPLS:
            fail("attention_impl", f"unknown {self.attention_impl!r}", f"use one of {ATTENTION_IMPLS}")
        if self.rotary_impl not in ROTARY_IMPLS:
            fail("rotary_impl", f"unknown {self.rotary_impl!r}", f"use one of {ROTARY_IMPLS}")
        if self.remat_policy not in REMAT_POLICIES:
            fail("remat_policy", f"unknown {self.remat_policy!r}", f"use one of {REMAT_POLICIES}")
        for field in ("resid_pdrop", "embd_pdrop"):
            if not 0.0 <= getattr(self, field) < 1.0:
                fail(field, f"must be in [0, 1), got {getattr(self, field)}", "use 0.0 to disable dropout")

    # -------------------------------------------------------------------------------- size / flops
    def param_count(self) -> int:
        """Exact number of parameters (the tests hold this equal to eval_shape of the model)."""
        d, f, v = self.d_model, self.mlp_dim, self.vocab_size
        n, k, h = self.n_heads, self.num_kv_heads, self.dim_per_head
        attn = d * n * h + n * h + 2 * (d * k * h + k * h) + n * h * d + d
        qk_norm = 4 * h if self.qk_layernorm else 0
        mlp = d * f + f + f * d + d
        layer = attn + qk_norm + mlp + 2 * d
        return v * d + self.n_layers * layer + 2 * d + d * v + v

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward = 3x forward), matmuls and causal attention.

        Attention scores and values count T*S/2 pairs per query on average (causal), honestly.
        """
        d, f, v = self.d_model, self.mlp_dim, self.vocab_size
        n, k, h = self.n_heads, self.num_kv_heads, self.dim_per_head
        matmul_params = self.n_layers * (d * n * h + 2 * d * k * h + n * h * d + 2 * d * f) + d * v
        attention = self.n_layers * 2 * n * h * seq_len / 2  # QK^T and PV, causal half
        return 3 * (2 * matmul_params + 2 * attention)


# ------------------------------------------------------------------------------------ presets
# Published shapes: microsoft/phi-1, microsoft/phi-1_5, microsoft/phi-2 config.json files.
PRESETS: dict[str, ModelConfig] = {
    "phi-1": ModelConfig(vocab_size=51200, d_model=2048, n_layers=24, n_heads=32, mlp_dim=8192,
                         partial_rotary_factor=0.5, max_len=2048),
    "phi-1.5": ModelConfig(vocab_size=51200, d_model=2048, n_layers=24, n_heads=32, mlp_dim=8192,
                           partial_rotary_factor=0.5, max_len=2048),
    "phi-2": ModelConfig(vocab_size=51200, d_model=2560, n_layers=32, n_heads=32, mlp_dim=10240,
                         partial_rotary_factor=0.4, max_len=2048, resid_pdrop=0.1),
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
}


def preset(name: str, **overrides) -> ModelConfig:
    """A preset by name, with field overrides (`preset("phi-2", dtype="bfloat16")`)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; available: {sorted(PRESETS)}")
    return PRESETS[name].replace(**overrides) if overrides else PRESETS[name]


# --------------------------------------------------------------------------- HF config.json
_UNSUPPORTED_HF_KEYS = {"rope_scaling": "only the default rotary embedding is supported"}


def from_hf_config(hf: Mapping[str, Any], **overrides) -> ModelConfig:
    """ModelConfig from an HF Phi config.json dict (legacy or `rope_parameters` form)."""
    model_type = hf.get("model_type", "phi")
    if model_type != "phi":
        raise ValueError(f"config.json has model_type={model_type!r}, expected 'phi'; "
                         "phi_jax loads PhiForCausalLM checkpoints (phi-1, phi-1.5, phi-2)")
    if hf.get("hidden_act", "gelu_new") != "gelu_new":
        raise ValueError(f"config.json hidden_act={hf['hidden_act']!r} is not supported; "
                         "Phi uses 'gelu_new'")
    if float(hf.get("attention_dropout") or 0.0) != 0.0:
        raise ValueError("config.json attention_dropout is non-zero; phi_jax's fused attention has "
                         "no dropout: set it to 0.0 (all published Phi models use 0.0)")
    rope = dict(hf.get("rope_parameters") or {})
    scaling = hf.get("rope_scaling")
    if scaling and scaling.get("rope_type", scaling.get("type", "default")) != "default":
        raise ValueError(f"config.json rope_scaling={scaling!r}: {_UNSUPPORTED_HF_KEYS['rope_scaling']}")
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"config.json rope_parameters.rope_type={rope['rope_type']!r}: "
                         f"{_UNSUPPORTED_HF_KEYS['rope_scaling']}")
    partial = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 0.5))
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    n_heads = hf.get("num_attention_heads", 32)
    d_model = hf.get("hidden_size", 2048)
    head_dim = hf.get("head_dim")
    eos = hf.get("eos_token_id", 2)
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    dtype = hf.get("dtype", hf.get("torch_dtype"))
    kwargs = dict(
        vocab_size=hf.get("vocab_size", 51200),
        d_model=d_model,
        n_layers=hf.get("num_hidden_layers", 24),
        n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads"),
        head_dim=None if head_dim in (None, d_model // n_heads) else head_dim,
        mlp_dim=hf.get("intermediate_size", 8192),
        partial_rotary_factor=float(partial),
        rope_theta=float(theta),
        layer_norm_eps=float(hf.get("layer_norm_eps", 1e-5)),
        qk_layernorm=bool(hf.get("qk_layernorm", False)),
        max_len=hf.get("max_position_embeddings", 2048),
        resid_pdrop=float(hf.get("resid_pdrop") or 0.0),
        embd_pdrop=float(hf.get("embd_pdrop") or 0.0),
        bos_token_id=hf.get("bos_token_id", 1),
        eos_token_id=eos,
    )
    if kwargs["n_kv_heads"] == n_heads:
        kwargs["n_kv_heads"] = None
    if hf.get("tie_word_embeddings", False):
        raise ValueError("config.json tie_word_embeddings=true: Phi has an untied LM head with a "
                         "bias; this checkpoint is not a Phi model")
    del dtype  # the on-disk dtype is a property of the weights, not of the model we build
    kwargs.update(overrides)
    return ModelConfig(**kwargs)


def to_hf_config(config: ModelConfig, *, torch_dtype: str = "float32",
                 legacy: bool = False) -> dict[str, Any]:
    """HF config.json dict. `legacy=True` writes the top-level rotary keys that older
    transformers releases read; the default writes both forms so any release loads it."""
    rope = {"rope_type": "default", "rope_theta": config.rope_theta,
            "partial_rotary_factor": config.partial_rotary_factor}
    hf = {
        "architectures": ["PhiForCausalLM"],
        "model_type": "phi",
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "intermediate_size": config.mlp_dim,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.num_kv_heads,
        "hidden_act": "gelu_new",
        "max_position_embeddings": config.max_len,
        "layer_norm_eps": config.layer_norm_eps,
        "qk_layernorm": config.qk_layernorm,
        "resid_pdrop": config.resid_pdrop,
        "embd_pdrop": config.embd_pdrop,
        "attention_dropout": 0.0,
        "tie_word_embeddings": False,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "partial_rotary_factor": config.partial_rotary_factor,
        "rope_theta": config.rope_theta,
        "torch_dtype": torch_dtype,
        "initializer_range": 0.02,
        "use_cache": True,
    }
    if config.head_dim is not None:
        hf["head_dim"] = config.head_dim
    if not legacy:
        hf["rope_parameters"] = rope
    return hf
