"""Independent reference: random HF models of every family phi_jax loads, built with transformers.

Every parameter (norms and biases included) is randomised, so a mapping bug in any tensor shows
up in the logits. The transformers config comes from phi_jax's `to_hf_config` dict, read by
transformers' own config class for the family (so both rope forms go through its parser).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import transformers

from phi_jax.config import ModelConfig
from phi_jax.hf_config import to_hf_config


def hf_config(config: ModelConfig, *, legacy: bool = False) -> transformers.PretrainedConfig:
    d = to_hf_config(config, legacy=legacy)
    model_type = d.pop("model_type")
    d.pop("architectures"), d.pop("torch_dtype")
    if model_type == "phi":  # PhiConfig takes these from rope_parameters; keep one source
        d.pop("partial_rotary_factor"), d.pop("rope_theta")
    return transformers.AutoConfig.for_model(model_type, **d, attn_implementation="eager")


def random_hf_model(config: ModelConfig, seed: int = 0) -> transformers.PreTrainedModel:
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_config(config)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.05 * torch.randn_like(p))
    return model


def save_like_the_hub(model: transformers.PreTrainedModel, path: Path, *, dtype=torch.float16,
                      max_shard_size: str | int = "40KB") -> Path:
    """fp16, several shards + index, and the *legacy* config.json (4.x: top-level rope_theta,
    rope_scaling, no rope_parameters)."""
    model.to(dtype).save_pretrained(path, max_shard_size=max_shard_size, safe_serialization=True)
    model.to(torch.float32)
    cfg = json.loads((path / "config.json").read_text())
    rope = cfg.pop("rope_parameters", None) or {}
    if cfg["model_type"] == "phi":
        cfg["partial_rotary_factor"] = rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor"))
    elif "partial_rotary_factor" in rope:
        cfg["partial_rotary_factor"] = rope["partial_rotary_factor"]
    cfg["rope_theta"] = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
    scaling = {k: v for k, v in rope.items() if k not in ("rope_theta", "partial_rotary_factor")}
    cfg["rope_scaling"] = None if scaling.get("rope_type", "default") == "default" else {
        **scaling, "type": scaling["rope_type"]}
    if cfg["model_type"] == "phi":
        cfg.pop("rope_scaling")
    cfg["torch_dtype"] = "float16"
    (path / "config.json").write_text(json.dumps(cfg))
    return path


def hf_logits(model: transformers.PreTrainedModel, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(tokens), dtype=torch.long)).logits.float().numpy()
