"""Shared pieces of the tests: the runlocal config with a cached tokenizer, a tiny HF checkpoint."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def load_config(arg: str = "runlocal", name: str = "tiny"):
    from phi_jax.training.config_file import load_config as load

    return load(f"{ROOT / 'configs' / name}.py:{arg}")


def runlocal_config(tokenizer_dir: Path, **train_overrides):
    config = load_config()
    config.tokenizer.path = str(tokenizer_dir)
    config.train.async_checkpoint = True
    for key, value in train_overrides.items():
        setattr(config.train, key, value)
    return config


def params_equal(a, b) -> bool:
    return all(np.array_equal(np.asarray(x), np.asarray(y))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def save_tiny_hf(path: Path, texts, *, max_len: int = 256, seed: int = 0) -> Path:
    """A random tiny model saved as an HF checkpoint, with a byte-level BPE tokenizer of `texts`."""
    import phi_jax
    from phi_jax.config import preset
    from phi_jax.model import init_params
    from phi_jax.tokenizer import train_bpe

    tok = train_bpe(list(texts) * 4, vocab_size=300)
    config = preset("test", vocab_size=300, max_len=max_len, eos_token_id=tok.eos_id, bos_token_id=tok.bos_id)
    phi_jax.save_pretrained(path, config, jax.jit(init_params, static_argnums=0)(config, jax.random.key(seed)))
    tok.save(path)
    return path
