"""Shared pieces of the training tests: the runlocal config with a cached tokenizer."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def load_config(arg: str = "runlocal", name: str = "tiny"):
    from phi_jax.train.config_file import load_config as load

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
