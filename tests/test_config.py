"""ModelConfig: presets have the published sizes; HF config.json in both forms; clear errors."""

import dataclasses
import json
import re

import jax
import pytest
import torch
import transformers

import phi_jax
from phi_jax.config import PRESETS, ModelConfig, preset
from phi_jax.errors import ConfigError
from phi_jax.hf_config import from_hf_config, to_hf_config
from phi_jax.model import abstract_params, rope_scaling

from hf_reference import hf_config

# Parameter counts of the checkpoints on the hub, as their model cards / safetensors metadata give
# them. Phi-1/1.5/2's names round 1.42B down to "1.3B" and 2.78B to "2.7B".
PUBLISHED = {"phi-1": 1_418_270_720, "phi-1.5": 1_418_270_720, "phi-2": 2_779_683_840,
             "phi-3-mini-4k": 3_821_079_552, "phi-3.5-mini": 3_821_079_552,
             "phi-4-mini": 3_836_021_760, "smollm2-135m": 134_515_008,
             "smollm2-360m": 361_821_120, "smollm2-1.7b": 1_711_376_384,
             "llama-3.2-1b": 1_235_814_400}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_parameter_count_matches_model_and_transformers(name):
    config = preset(name)
    shapes = abstract_params(config)  # eval_shape: allocates nothing, even for phi-4-mini
    count = sum(x.size for x in jax.tree.leaves(shapes))
    assert count == config.param_count()
    with torch.device("meta"):
        reference = transformers.AutoModelForCausalLM.from_config(hf_config(config))
    assert count == sum(p.numel() for p in reference.parameters())
    if name in PUBLISHED:
        assert count == PUBLISHED[name]


def test_published_shapes():
    assert preset("phi-2").dim_per_head == 80 and preset("phi-2").rotary_dim == 32
    assert preset("phi-1.5").dim_per_head == 64 and preset("phi-1.5").rotary_dim == 32


LEGACY_PHI2 = {  # the hub's phi-2 config.json, abridged
    "architectures": ["PhiForCausalLM"], "model_type": "phi", "attention_dropout": 0.0,
    "bos_token_id": 50256, "embd_pdrop": 0.0, "eos_token_id": 50256, "hidden_act": "gelu_new",
    "hidden_size": 2560, "initializer_range": 0.02, "intermediate_size": 10240,
    "layer_norm_eps": 1e-05, "max_position_embeddings": 2048, "num_attention_heads": 32,
    "num_hidden_layers": 32, "num_key_value_heads": 32, "partial_rotary_factor": 0.4,
    "qk_layernorm": False, "resid_pdrop": 0.1, "rope_scaling": None, "rope_theta": 10000.0,
    "tie_word_embeddings": False, "torch_dtype": "float16", "use_cache": True, "vocab_size": 51200,
}


def test_from_hf_config_legacy_and_rope_parameters_forms():
    legacy = from_hf_config(LEGACY_PHI2)
    assert legacy.partial_rotary_factor == 0.4 and legacy.rope_theta == 10000.0
    assert legacy.eos_token_id == 50256 and legacy.n_kv_heads is None
    shape_fields = ("vocab_size", "d_model", "n_layers", "n_heads", "mlp_dim", "partial_rotary_factor")
    assert all(getattr(legacy, f) == getattr(preset("phi-2"), f) for f in shape_fields)
    new = dict(LEGACY_PHI2)
    del new["partial_rotary_factor"], new["rope_theta"], new["rope_scaling"]
    new["rope_parameters"] = {"rope_type": "default", "rope_theta": 5000.0, "partial_rotary_factor": 0.5}
    modern = from_hf_config(new)
    assert modern.partial_rotary_factor == 0.5 and modern.rope_theta == 5000.0


@pytest.mark.parametrize("name", ["phi-2", "test-gqa", "test-qk-norm", "test-llama", "test-phi3",
                                  "test-phi4", "test-mistral", "test-qwen2", "llama-3.2-1b"])
def test_to_hf_config_round_trips_and_transformers_reads_it(name):
    config = preset(name)
    for legacy in (False, True):
        d = to_hf_config(config, legacy=legacy)
        assert ("rope_parameters" in d) != legacy
        assert from_hf_config(d) == config
        hf = transformers.AutoConfig.for_model(**d)  # transformers' own parser of the same dict
        assert hf.rope_parameters["rope_type"] == config.rope_type
        assert hf.rope_parameters["rope_theta"] == config.rope_theta
        assert hf.rope_parameters.get("partial_rotary_factor", 1.0) == config.partial_rotary_factor
        assert hf.num_key_value_heads == config.num_kv_heads
        assert hf.tie_word_embeddings == config.tie_embeddings


LLAMA_32_HUB = {  # meta-llama/Llama-3.2-1B's config.json (transformers 4.45 form), abridged
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 128000, "eos_token_id": 128001, "head_dim": 64, "hidden_act": "silu",
    "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 8192,
    "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "llama",
    "num_attention_heads": 32, "num_hidden_layers": 16, "num_key_value_heads": 8,
    "pretraining_tp": 1, "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
    "use_cache": True, "vocab_size": 128256,
}


def test_hub_configs_of_the_new_families():
    llama = from_hf_config(LLAMA_32_HUB)
    assert llama == preset("llama-3.2-1b")
    v5 = {k: v for k, v in LLAMA_32_HUB.items() if k not in ("rope_scaling", "rope_theta")}
    v5["rope_parameters"] = {**LLAMA_32_HUB["rope_scaling"], "rope_theta": 500000.0}
    assert from_hf_config(v5) == llama
    phi3 = {"model_type": "phi3", "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
            "num_attention_heads": 4, "vocab_size": 128, "max_position_embeddings": 64,
            "original_max_position_embeddings": 16, "rope_theta": 10000.0, "sliding_window": 63,
            "rope_scaling": {"type": "su", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8}}
    config = from_hf_config(phi3)  # "su" is Phi-3's early name for longrope
    assert config.rope_type == "longrope" and config.rope_original_max_len == 16
    assert config.rope_factor == 4.0 and config.sliding_window == 63
    # The attention factor is fixed at load: a shorter generation budget does not change it.
    assert rope_scaling(config.replace(max_len=32)) == rope_scaling(config)
    assert rope_scaling(config).attention_factor == pytest.approx((1 + 1.3862944 / 2.7725887) ** 0.5)


@pytest.mark.parametrize("overrides, field", [
    (dict(d_model=100, n_heads=3), "n_heads"),
    (dict(d_model="64"), "d_model"),
    (dict(rope_type="yarn"), "rope_type"),
    (dict(rope_type="linear"), "rope_factor"),
    (dict(rope_type="longrope", rope_short_factor=(1.0,) * 3, rope_long_factor=(1.0,) * 4),
     "rope_short_factor"),
    (dict(block="serial"), "block"),
    (dict(sliding_window=0), "sliding_window"),
    (dict(n_kv_heads=3), "n_kv_heads"),
    (dict(partial_rotary_factor=0.19), "partial_rotary_factor"),  # int(16 * 0.19) = 3: odd
    (dict(partial_rotary_factor=1.5), "partial_rotary_factor"),
    (dict(attention_impl="flash"), "attention_impl"),
    (dict(remat_policy="some"), "remat_policy"),
    (dict(dtype="int8"), "dtype"),
    (dict(vocab_size=0), "vocab_size"),
])
def test_invalid_configs_name_the_field(overrides, field):
    with pytest.raises(ValueError, match=field if field != "dtype" else "unsupported dtype"):
        preset("test", **overrides)


def test_from_dict_rejects_unknown_fields():
    d = preset("test").to_dict()
    assert ModelConfig.from_dict(d) == preset("test")
    with pytest.raises(ValueError, match="n_layer"):
        ModelConfig.from_dict({**d, "n_layer": 3})


# ModelConfig.to_dict() as checkpoints stored it before the architecture fields existed.
_OLD_FIELDS = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "mlp_dim",
               "partial_rotary_factor", "rope_theta", "layer_norm_eps", "qk_layernorm", "max_len",
               "resid_pdrop", "embd_pdrop", "dtype", "param_dtype", "attention_impl", "rotary_impl",
               "remat_policy", "scan_layers", "bos_token_id", "eos_token_id")


def test_old_saved_configs_load_as_the_same_phi_model():
    saved = json.loads(json.dumps({k: v for k, v in preset("phi-2").to_dict().items()
                                   if k in _OLD_FIELDS}))  # as read back from a checkpoint
    config = ModelConfig.from_dict(saved)
    assert config == preset("phi-2")
    assert (config.block, config.norm, config.mlp, config.tie_embeddings) == (
        "parallel", "layernorm", "gelu", False)
    assert config.param_count() == PUBLISHED["phi-2"]
    # and a new config survives the same JSON round trip (tuples come back as lists)
    phi3 = preset("test-phi3")
    assert ModelConfig.from_dict(json.loads(json.dumps(phi3.to_dict()))) == phi3


def test_unsupported_hf_configs_are_refused():
    with pytest.raises(ConfigError, match="model_type 'gpt2' is not supported"):
        from_hf_config({**LEGACY_PHI2, "model_type": "gpt2"})
    with pytest.raises(ConfigError, match=r"'rope_scaling.rope_type' must be one of"):
        from_hf_config({**LEGACY_PHI2, "rope_scaling": {"type": "dynamic", "factor": 2.0}})
    with pytest.raises(ConfigError, match="tie_word_embeddings"):
        from_hf_config({**LEGACY_PHI2, "tie_word_embeddings": True})
    with pytest.raises(ConfigError, match="hidden_act"):
        from_hf_config({**LLAMA_32_HUB, "hidden_act": "gelu"})
    with pytest.raises(ConfigError, match="layer_types"):
        from_hf_config({"model_type": "qwen2", **{k: LLAMA_32_HUB[k] for k in (
            "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "vocab_size")}, "use_sliding_window": True, "sliding_window": 8,
            "layer_types": ["sliding_attention", "full_attention"] * 8})


@pytest.mark.parametrize("key, value, want", [
    ("hidden_size", "2048", "'hidden_size' must be an integer >= 1, got '2048' (str)"),
    ("num_hidden_layers", 0, "'num_hidden_layers' must be an integer >= 1, got 0"),
    ("rms_norm_eps", -1.0, "'rms_norm_eps' must be a positive number"),
    ("tie_word_embeddings", "yes", "'tie_word_embeddings' must be true or false"),
    ("rope_scaling", {"rope_type": "llama3"}, "'rope_scaling.factor' must be present"),
    ("eos_token_id", "</s>", "'eos_token_id' must be a token id"),
])
def test_config_json_values_are_checked_naming_file_and_key(tmp_path, key, value, want):
    (tmp_path / "config.json").write_text(json.dumps({**LLAMA_32_HUB, key: value}))
    with pytest.raises(ConfigError, match=re.escape(want)) as info:
        phi_jax.from_pretrained(tmp_path)
    message = str(info.value)
    assert str(tmp_path / "config.json") in message and "\n" not in message


def test_unexportable_switches_are_named():
    with pytest.raises(ConfigError, match="ModelConfig.block='parallel' cannot be saved as an HF "
                                          "LlamaForCausalLM"):
        to_hf_config(dataclasses.replace(preset("test-llama"), block="parallel"))
