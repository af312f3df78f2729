"""ModelConfig: presets have the published sizes; HF config.json in both forms; clear errors."""

import jax
import pytest
import torch
import transformers

from phi_jax.config import PRESETS, ModelConfig, from_hf_config, preset, to_hf_config
from phi_jax.model import abstract_params

from hf_reference import hf_config

# Exact parameter counts of the checkpoints on the hub (microsoft/phi-1, phi-1_5, phi-2). Their
# names round these (1.3B / 1.3B / 2.7B); the exact counts are 1.42B, 1.42B and 2.78B.
PUBLISHED = {"phi-1": 1_418_270_720, "phi-1.5": 1_418_270_720, "phi-2": 2_779_683_840}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_parameter_count_matches_model_and_transformers(name):
    config = preset(name)
    shapes = abstract_params(config)  # eval_shape: allocates nothing, even for phi-2
    count = sum(x.size for x in jax.tree.leaves(shapes))
    assert count == config.param_count()
    with torch.device("meta"):
        reference = transformers.PhiForCausalLM(hf_config(config))
    assert count == sum(p.numel() for p in reference.parameters())
    if name in PUBLISHED:
        assert abs(count - PUBLISHED[name]) <= 0.02 * PUBLISHED[name]


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


def test_to_hf_config_round_trips_and_transformers_reads_it():
    for name in ("phi-2", "test-gqa", "test-qk-norm"):
        config = preset(name)
        for legacy in (False, True):
            d = to_hf_config(config, legacy=legacy)
            assert from_hf_config(d) == config.replace(param_dtype="float32")
            hf = transformers.PhiConfig(**{k: v for k, v in d.items() if k != "model_type"})
            assert hf.rope_parameters["partial_rotary_factor"] == config.partial_rotary_factor
            assert hf.num_key_value_heads == config.num_kv_heads


@pytest.mark.parametrize("overrides, field", [
    (dict(d_model=100, n_heads=3), "n_heads"),
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


def test_unsupported_hf_configs_are_refused():
    with pytest.raises(ValueError, match="model_type"):
        from_hf_config({**LEGACY_PHI2, "model_type": "llama"})
    with pytest.raises(ValueError, match="rope_scaling"):
        from_hf_config({**LEGACY_PHI2, "rope_scaling": {"type": "linear", "factor": 2.0}})
    with pytest.raises(ValueError, match="tie_word_embeddings"):
        from_hf_config({**LEGACY_PHI2, "tie_word_embeddings": True})
