"""Independent reference: random HF `PhiForCausalLM` models built with transformers + torch.

Every parameter (LayerNorm and biases included) is randomised, so a mapping bug in any tensor
shows up in the logits.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import transformers

from phi_jax.config import ModelConfig, to_hf_config


def hf_config(config: ModelConfig) -> transformers.PhiConfig:
    d = to_hf_config(config)
    d.pop("architectures"), d.pop("model_type"), d.pop("torch_dtype")
    d.pop("partial_rotary_factor"), d.pop("rope_theta")
    return transformers.PhiConfig(**d, attn_implementation="eager")


def random_hf_model(config: ModelConfig, seed: int = 0) -> transformers.PhiForCausalLM:
    torch.manual_seed(seed)
    model = transformers.PhiForCausalLM(hf_config(config)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layernorm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.05 * torch.randn_like(p))
    return model


def save_like_the_hub(model: transformers.PhiForCausalLM, path: Path, *, dtype=torch.float16,
                      max_shard_size: str | int = "40KB") -> Path:
    """fp16, several shards + index, and the *legacy* config.json (top-level rotary keys)."""
    model.to(dtype).save_pretrained(path, max_shard_size=max_shard_size, safe_serialization=True)
    model.to(torch.float32)
    cfg = json.loads((path / "config.json").read_text())
    rope = cfg.pop("rope_parameters", None) or {}
    cfg["partial_rotary_factor"] = rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor"))
    cfg["rope_theta"] = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
    cfg.pop("rope_scaling", None)
    cfg["torch_dtype"] = "float16"
    (path / "config.json").write_text(json.dumps(cfg))
    return path


def hf_logits(model: transformers.PhiForCausalLM, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(tokens), dtype=torch.long)).logits.float().numpy()
