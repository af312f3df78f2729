"""HF config.json <-> ModelConfig for every family phi_jax loads (phi, llama, mistral, qwen2, phi3).

Both forms of config.json in use are read: transformers 4.x (`rope_scaling` plus top-level
`rope_theta` / `partial_rotary_factor`) and 5.x (`rope_parameters`); when a file has both,
`rope_scaling` wins, as in transformers. Writing produces both, so any release loads the result
(`legacy=True`: the 4.x form only). Every key read is checked for type and range, and an error
names the file and the key: `config.json: key 'hidden_size' must be a positive integer, got
'2048' (str); fix it in config.json`.
"""

from __future__ import annotations

from typing import Any, Mapping

from phi_jax.config import ROPE_TYPES, ModelConfig
from phi_jax.errors import ConfigError

CLASSES = {"phi": "PhiForCausalLM", "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
           "qwen2": "Qwen2ForCausalLM", "phi3": "Phi3ForCausalLM"}
_SEQUENTIAL = dict(block="sequential", norm="rmsnorm", mlp="swiglu", qkv_bias=False, out_bias=False,
                   mlp_bias=False, lm_head_bias=False)
# The architecture switches each family's checkpoints imply (llama's biases come from its keys).
FAMILY_SWITCHES = {
    "phi": dict(block="parallel", norm="layernorm", mlp="gelu", qkv_bias=True, out_bias=True,
                mlp_bias=True, lm_head_bias=True),
    "llama": _SEQUENTIAL, "mistral": _SEQUENTIAL, "phi3": _SEQUENTIAL,
    "qwen2": dict(_SEQUENTIAL, qkv_bias=True),
}
# transformers' own defaults for keys a config.json may leave out.
_DEFAULTS = {
    "phi": dict(hidden_act="gelu_new", max_position_embeddings=2048, partial_rotary_factor=0.5,
                vocab_size=51200, hidden_size=2048, intermediate_size=8192, num_hidden_layers=24,
                num_attention_heads=32, bos_token_id=1, eos_token_id=2),
    "llama": dict(hidden_act="silu", max_position_embeddings=2048, rms_norm_eps=1e-6),
    "mistral": dict(hidden_act="silu", max_position_embeddings=4096 * 32, rms_norm_eps=1e-6),
    "qwen2": dict(hidden_act="silu", max_position_embeddings=32768, rms_norm_eps=1e-6),
    "phi3": dict(hidden_act="silu", max_position_embeddings=4096, rms_norm_eps=1e-5),
}


class _Keys:
    """Typed reads of a config dict; a wrong type or range is a ConfigError naming file and key."""

    def __init__(self, d: Mapping[str, Any], source: str, prefix: str = ""):
        self.d, self.source, self.prefix = d, source, prefix

    def fail(self, key: str, want: str, value: Any = None, *, got: bool = True):
        got_text = f", got {value!r} ({type(value).__name__})" if got else ""
        raise ConfigError(f"{self.source}: key {self.prefix + key!r} must be {want}{got_text}; "
                          f"fix it in {self.source}")

    def has(self, key: str) -> bool:
        return self.d.get(key) is not None

    def int(self, key: str, default: Any = None, *, minimum: int = 1, required: bool = False):
        value = self.d.get(key, default)
        if value is None:
            if required:
                self.fail(key, "present (an integer)", got=False)
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            self.fail(key, f"an integer >= {minimum}", value)
        return value

    def float(self, key: str, default: Any = None, *, positive: bool = True, below: float | None = None):
        value = self.d.get(key, default)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (positive and value <= 0) \
                or (not positive and value < 0) or (below is not None and value >= below):
            bounds = "a positive number" if positive else "a number >= 0"
            self.fail(key, bounds + (f" below {below}" if below is not None else ""), value)
        return float(value)

    def bool(self, key: str, default: bool) -> bool:
        value = self.d.get(key, default)
        if value is None:
            return default
        if not isinstance(value, bool):
            self.fail(key, "true or false", value)
        return value

    def str(self, key: str, default: str | None) -> str | None:
        value = self.d.get(key, default)
        if value is not None and not isinstance(value, str):
            self.fail(key, "a string", value)
        return value

    def floats(self, key: str) -> tuple[float, ...]:
        value = self.d.get(key)
        if not isinstance(value, (list, tuple)) or not value or any(
                isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0 for v in value):
            self.fail(key, "a non-empty list of positive numbers", value)
        return tuple(float(v) for v in value)

    def token_id(self, key: str, default: Any):
        value = self.d.get(key, default)
        if isinstance(value, list):  # several stop ids: the first is the EOS
            value = value[0] if value else None
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            self.fail(key, "a token id (an integer >= 0), a list of them, or null", value)
        return value


# --------------------------------------------------------------------------------------- read
def from_hf_config(hf: Mapping[str, Any], *, source: str = "config.json", **overrides) -> ModelConfig:
    """ModelConfig from an HF config.json dict of any supported family, in either rope form.

    `source` names the file in errors; `overrides` set ModelConfig fields (dtype, impls, ...).
    """
    if not isinstance(hf, Mapping):
        raise ConfigError(f"{source} must hold a JSON object, got {type(hf).__name__}; regenerate it")
    keys = _Keys(hf, source)
    model_type = keys.str("model_type", "phi")
    if model_type not in CLASSES:
        raise ConfigError(f"{source}: model_type {model_type!r} is not supported; phi_jax loads "
                          f"{', '.join(f'{t} ({c})' for t, c in CLASSES.items())}")
    defaults = _DEFAULTS[model_type]
    required = model_type != "phi"
    act = keys.str("hidden_act", defaults["hidden_act"])
    if act != defaults["hidden_act"]:
        keys.fail("hidden_act", f"{defaults['hidden_act']!r} for model_type {model_type!r}", act)
    if keys.float("attention_dropout", 0.0, positive=False):
        keys.fail("attention_dropout", "0.0 (phi_jax's fused attention has no dropout; every "
                  "published model uses 0.0)", hf["attention_dropout"])
    n_heads = keys.int("num_attention_heads", defaults.get("num_attention_heads"), required=required)
    d_model = keys.int("hidden_size", defaults.get("hidden_size"), required=required)
    head_dim = keys.int("head_dim")
    n_kv = keys.int("num_key_value_heads")
    max_len = keys.int("max_position_embeddings", defaults["max_position_embeddings"])
    kwargs = dict(
        model_type=model_type, **FAMILY_SWITCHES[model_type],
        vocab_size=keys.int("vocab_size", defaults.get("vocab_size"), required=required),
        d_model=d_model,
        n_layers=keys.int("num_hidden_layers", defaults.get("num_hidden_layers"), required=required),
        n_heads=n_heads,
        n_kv_heads=None if n_kv == n_heads else n_kv,
        head_dim=None if head_dim in (None, d_model // n_heads) else head_dim,
        mlp_dim=keys.int("intermediate_size", defaults.get("intermediate_size"), required=required),
        max_len=max_len,
        bos_token_id=keys.token_id("bos_token_id", defaults.get("bos_token_id")),
        eos_token_id=keys.token_id("eos_token_id", defaults.get("eos_token_id")),
        tie_embeddings=keys.bool("tie_word_embeddings", False),
    )
    if model_type in ("phi", "phi3"):
        kwargs.update(resid_pdrop=keys.float("resid_pdrop", 0.0, positive=False, below=1.0) or 0.0,
                      embd_pdrop=keys.float("embd_pdrop", 0.0, positive=False, below=1.0) or 0.0)
    if model_type == "phi":
        kwargs.update(layer_norm_eps=keys.float("layer_norm_eps", 1e-5),
                      qk_layernorm=keys.bool("qk_layernorm", False))
        if kwargs["tie_embeddings"]:
            keys.fail("tie_word_embeddings", "false for model_type 'phi' (Phi has an untied LM "
                      "head with a bias; this checkpoint is not a Phi model)", True)
    else:
        kwargs["layer_norm_eps"] = keys.float("rms_norm_eps", defaults["rms_norm_eps"])
    if model_type == "llama":
        bias = keys.bool("attention_bias", False)
        kwargs.update(qkv_bias=bias, out_bias=bias, mlp_bias=keys.bool("mlp_bias", False))
    kwargs.update(_read_sliding_window(keys, hf, model_type, kwargs["n_layers"]))
    kwargs.update(_read_rope(keys, hf, model_type, max_len))
    kwargs.update(overrides)
    return ModelConfig(**kwargs)


def _read_rope(keys: _Keys, hf: Mapping[str, Any], model_type: str, max_len: int) -> dict[str, Any]:
    scaling, params = hf.get("rope_scaling"), hf.get("rope_parameters")
    for name, value in (("rope_scaling", scaling), ("rope_parameters", params)):
        if value is not None and not isinstance(value, Mapping):
            keys.fail(name, "an object or null", value)
    rope = dict(scaling or params or {})
    name = "rope_scaling." if scaling else "rope_parameters."
    sub = _Keys(rope, keys.source, name)
    fallback = _Keys(params or {}, keys.source, "rope_parameters.")

    def pick(key: str, default: Any) -> Any:  # the rope dict, then the other form, then top level
        for reader in (sub, fallback, keys):
            if reader.has(key):
                return reader.float(key)
        return default

    out = {"rope_theta": pick("rope_theta", 10000.0),
           "partial_rotary_factor": pick("partial_rotary_factor",
                                         _DEFAULTS[model_type].get("partial_rotary_factor", 1.0))}
    kind = sub.str("rope_type", None) or sub.str("type", None) or "default"
    if model_type == "phi3" and kind in ("su", "yarn"):  # Phi-3's early names for longrope
        kind = "longrope"
    if kind not in ROPE_TYPES:
        sub.fail("rope_type", f"one of {list(ROPE_TYPES)} (phi_jax implements these scalings)", kind)
    out["rope_type"] = kind
    if kind in ("linear", "llama3"):
        out["rope_factor"] = sub.float("factor")
        if out["rope_factor"] is None:
            sub.fail("factor", f"present for rope_type {kind!r}", got=False)
    if kind == "llama3":
        out.update(rope_low_freq_factor=sub.float("low_freq_factor", 1.0),
                   rope_high_freq_factor=sub.float("high_freq_factor", 4.0),
                   rope_original_max_len=sub.int("original_max_position_embeddings", max_len))
    if kind == "longrope":
        # Phi-3 keeps the pretraining context at the top level, and transformers prefers it there.
        original = keys.int("original_max_position_embeddings") or sub.int(
            "original_max_position_embeddings", max_len)
        out.update(rope_original_max_len=original, rope_short_factor=sub.floats("short_factor"),
                   rope_long_factor=sub.floats("long_factor"),
                   rope_factor=sub.float("factor", max_len / original),
                   rope_attention_factor=sub.float("attention_factor"))
    return out


def _read_sliding_window(keys: _Keys, hf: Mapping[str, Any], model_type: str,
                         n_layers: int) -> dict[str, Any]:
    if model_type in ("mistral", "phi3"):
        return {"sliding_window": keys.int("sliding_window")}
    if model_type != "qwen2" or not keys.bool("use_sliding_window", False):
        return {}
    window = keys.int("sliding_window")
    start = keys.int("max_window_layers", 28, minimum=0)
    layer_types = hf.get("layer_types")
    if layer_types is not None:  # explicit: must be full layers, then windowed ones
        windowed = [t == "sliding_attention" for t in layer_types] if isinstance(layer_types, list) else []
        start = windowed.index(True) if True in windowed else n_layers
        if len(windowed) != n_layers or any(not w for w in windowed[start:]):
            keys.fail("layer_types", f"{n_layers} entries, 'full_attention' layers followed by "
                      "'sliding_attention' ones (the only pattern phi_jax implements)", layer_types)
    return {"sliding_window": window, "sliding_window_start": min(start, n_layers)}


# -------------------------------------------------------------------------------------- write
def check_exportable(config: ModelConfig) -> None:
    """Refuse configs that no HF class of `config.model_type` can represent, naming the field."""
    expected = dict(FAMILY_SWITCHES[config.model_type])
    if config.model_type == "llama":  # biases are free there, as long as q/k/v/o agree
        expected.update(qkv_bias=config.qkv_bias, out_bias=config.qkv_bias, mlp_bias=config.mlp_bias)
    if config.model_type != "phi":
        expected["qk_layernorm"] = False
    if config.model_type not in ("phi", "phi3"):
        expected["partial_rotary_factor"] = 1.0
    if config.model_type not in ("mistral", "qwen2", "phi3"):
        expected["sliding_window"] = None
    if config.model_type != "qwen2":
        expected["sliding_window_start"] = 0
    if config.model_type == "phi":
        expected["tie_embeddings"] = False
    for field, want in expected.items():
        if getattr(config, field) != want:
            raise ConfigError(
                f"ModelConfig.{field}={getattr(config, field)!r} cannot be saved as an HF "
                f"{CLASSES[config.model_type]} checkpoint, whose {field} is {want!r}; set "
                f"model_type to a family that has it, or change {field}")


def to_hf_config(config: ModelConfig, *, torch_dtype: str = "float32",
                 legacy: bool = False) -> dict[str, Any]:
    """HF config.json dict. The default writes both rope forms, so any transformers release loads
    it; `legacy=True` writes only the 4.x keys (top-level rope_theta, rope_scaling)."""
    check_exportable(config)
    t = config.model_type
    hf = {
        "architectures": [CLASSES[t]], "model_type": t, "vocab_size": config.vocab_size,
        "hidden_size": config.d_model, "intermediate_size": config.mlp_dim,
        "num_hidden_layers": config.n_layers, "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.num_kv_heads, "hidden_act": _DEFAULTS[t]["hidden_act"],
        "max_position_embeddings": config.max_len, "attention_dropout": 0.0,
        "tie_word_embeddings": config.tie_embeddings, "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id, "rope_theta": config.rope_theta,
        "torch_dtype": torch_dtype, "initializer_range": 0.02, "use_cache": True,
    }
    if t == "phi":
        hf.update(layer_norm_eps=config.layer_norm_eps, qk_layernorm=config.qk_layernorm)
    else:
        hf["rms_norm_eps"] = config.layer_norm_eps
    if t in ("phi", "phi3"):
        hf.update(resid_pdrop=config.resid_pdrop, embd_pdrop=config.embd_pdrop,
                  partial_rotary_factor=config.partial_rotary_factor)
    if t == "phi3":  # Phi3Config's default pad id (32000) may lie outside a smaller vocabulary
        hf["pad_token_id"] = config.eos_token_id
    if t == "llama":
        hf.update(attention_bias=config.qkv_bias, mlp_bias=config.mlp_bias)
    if t in ("mistral", "phi3"):
        hf["sliding_window"] = config.sliding_window
    if t == "qwen2":
        hf.update(use_sliding_window=config.sliding_window is not None,
                  sliding_window=config.sliding_window,
                  max_window_layers=config.sliding_window_start if config.sliding_window else config.n_layers)
    if config.head_dim is not None:
        hf["head_dim"] = config.head_dim
    scaling = _rope_scaling(config)
    if scaling is not None or t != "phi":
        hf["rope_scaling"] = scaling
    if config.rope_type == "longrope":
        hf["original_max_position_embeddings"] = config.rope_original_max_len
    if not legacy:
        params = {"rope_type": config.rope_type, "rope_theta": config.rope_theta}
        if t in ("phi", "phi3"):
            params["partial_rotary_factor"] = config.partial_rotary_factor
        params.update({k: v for k, v in (scaling or {}).items() if k != "type"})
        hf["rope_parameters"] = params
    return hf


def _rope_scaling(config: ModelConfig) -> dict[str, Any] | None:
    """The 4.x `rope_scaling` dict (None for plain rotary), with only the keys each type uses."""
    kind = config.rope_type
    if kind == "default":
        return None
    out: dict[str, Any] = {"rope_type": kind, "type": kind}
    if kind in ("linear", "llama3"):
        out["factor"] = config.rope_factor
    if kind == "llama3":
        out.update(low_freq_factor=config.rope_low_freq_factor,
                   high_freq_factor=config.rope_high_freq_factor,
                   original_max_position_embeddings=config.rope_original_max_len)
    if kind == "longrope":
        out.update(short_factor=list(config.rope_short_factor), long_factor=list(config.rope_long_factor))
        if config.rope_factor != config.max_len / config.rope_original_max_len:
            out["factor"] = config.rope_factor
        if config.rope_attention_factor is not None:
            out["attention_factor"] = config.rope_attention_factor
    return out
