"""phi_jax: Phi-style language models in JAX/Flax, exact to the published checkpoints.

The public API is small on purpose:

    model, params = phi_jax.from_pretrained(path, dtype=jnp.float32)   # HF dir or .gguf -> (module, variables)
    logits, cache = model.apply(params, tokens)
    phi_jax.save_pretrained(path, model.config, params)                # -> HF dir transformers loads
    new_ids = phi_jax.generate(model, params, prompts, max_new_tokens=32, temperature=0.0, seed=0)

Names are imported lazily: `import phi_jax` stays cheap, which matters for Grain worker
processes that import the package only to unpickle a tokenizing function.
"""

from __future__ import annotations

import os
from typing import Any

from phi_jax import _lazy

# gs:// goes through gcsfs even when tensorflow is importable (phi_jax.fileio says why); set before
# anything imports etils, which reads it once.
os.environ.setdefault("EPATH_USE_TF", "false")

__version__ = "0.1.0"

_LAZY = {
    "ModelConfig": "phi_jax.config",
    "preset": "phi_jax.config",
    "Phi": "phi_jax.model",
    "init_cache": "phi_jax.model",
    "init_params": "phi_jax.model",
    "generate": "phi_jax.inference.decode",
    "Tokenizer": "phi_jax.tokenizer",
}

__getattr__ = _lazy.exports(globals(), _LAZY)


def from_pretrained(path: str | os.PathLike, dtype: Any = "float32", *, adapter=None,
                    **config_overrides):
    """Load a model: returns (Phi module, variables) in `dtype`.

    `path`: an HF checkpoint directory (PhiForCausalLM, LlamaForCausalLM, MistralForCausalLM,
    Qwen2ForCausalLM, Phi3ForCausalLM) or a `.gguf` file (its tokenizer:
    `phi_jax.Tokenizer.from_pretrained(path)`; everything at once: `phi_jax.gguf.load_gguf`).
    `config_overrides` set ModelConfig fields that the checkpoint does not hold, e.g.
    `attention_impl="pallas"` or `scan_layers=False`. `adapter`: a LoRA adapter directory
    (PEFT's adapter_config.json + adapter_model.safetensors) applied on top of the model.
    """
    from phi_jax.model import Phi

    if str(path).endswith(".gguf"):
        from phi_jax import gguf

        overrides = dict(config_overrides)
        config, variables, _, _ = gguf.load_gguf(path, dtype=dtype,
                                                 scan_layers=overrides.pop("scan_layers", True))
        config = config.replace(**overrides) if overrides else config
    else:
        from phi_jax import hf

        config, variables = hf.load_hf(path, dtype=dtype, **config_overrides)
    if adapter is not None:
        from phi_jax import lora

        config, variables = lora.load_adapter(adapter, config, variables)
    return Phi(config), variables


def save_pretrained(path: str | os.PathLike, config, params: dict, *, dtype: Any = None,
                    max_shard_size: int = 5 * 2**30) -> None:
    """Write `params` as an HF checkpoint of `config.model_type`'s class (config.json +
    safetensors) that transformers loads. A LoRA adapter in them is merged into the weights."""
    from phi_jax import hf

    if getattr(config, "lora_rank", 0):
        from phi_jax import lora

        variables = params if "params" in params else {"params": params}
        config, params = lora.merge(config, variables)

    hf.save_hf(path, config, params, dtype=dtype, max_shard_size=max_shard_size)


__all__ = ["ModelConfig", "Phi", "Tokenizer", "from_pretrained", "generate", "init_cache",
           "init_params", "preset", "save_pretrained"]
