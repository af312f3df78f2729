"""phi_jax: Phi-style language models in JAX/Flax, exact to the published checkpoints.

The public API is small on purpose:

    m = phi_jax.load("smollm2")              # HF dir, workdir, .gguf, "smollm2", gs://... -> Loaded
    m.generate("def fibonacci(n):")          # text in, text out; also chat, logprobs, score, embed
    m.save("out/")                           # an HF directory transformers loads (or "x.gguf")
    logits, cache = m.model.apply(m.variables, tokens)       # the pure (module, variables) underneath

    phi_jax.train("configs/tiny.py", workdir="runs/tiny")     # every job is a function
    phi_jax.finetune("configs/finetune_smollm2_lora.py", model="smollm2", data=conversations,
                     workdir="runs/ft")

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
    "load": "phi_jax.inference.loader",
    "Loaded": "phi_jax.inference.loader",
    "train": "phi_jax.jobs",
    "finetune": "phi_jax.jobs",
    "recipe": "phi_jax.jobs",
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
    """(Phi module, variables) from any source `phi_jax.load` takes; kept for code written against
    it (transformers' name). `phi_jax.load` returns the same pair with the tokenizer and the text
    methods beside it.

    `config_overrides` set ModelConfig fields that the checkpoint does not hold, e.g.
    `attention_impl="pallas"`. Layers come scanned (one stacked "layers" tree, as the trainer
    builds them: the compatible default) unless `scan_layers=False`; `phi_jax.load` picks the
    layout that decodes fastest instead. `adapter`: a LoRA adapter directory (PEFT's
    adapter_config.json + adapter_model.safetensors) applied on top.
    """
    from phi_jax.inference.loader import load
    from phi_jax.model import Phi, unstack_layers

    overrides = dict(config_overrides)
    scan = overrides.pop("scan_layers", True)
    loaded = load(path, dtype=dtype, adapter=adapter, layout="training" if scan else "inference")
    model, variables = loaded.model, loaded.variables
    if not scan and model.config.scan_layers:
        model, variables = unstack_layers(model, variables)
    if overrides:
        model = Phi(model.config.replace(**overrides))
    return model, variables


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


__all__ = ["Loaded", "ModelConfig", "Phi", "Tokenizer", "finetune", "from_pretrained", "generate",
           "init_cache", "init_params", "load", "preset", "recipe", "save_pretrained", "train"]
