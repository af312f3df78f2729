"""A job's config from what a caller has: a config file spec or a ConfigDict, plus overrides.

One way in for the CLI (`--config=FILE[:arg] --config.a.b=value ...`) and for Python
(`config="configs/tiny.py:runlocal", overrides={"train.steps": 2}`), so both get the same errors:
an unknown key is named by its dotted path with a "did you mean", a bad value by `--config.<key>`.
"""

from __future__ import annotations

import copy
import os
from typing import Any, Iterable, Mapping, Union

import ml_collections

from phi_jax.errors import ConfigError

ConfigLike = Union[str, os.PathLike, ml_collections.ConfigDict]


def override_strings(overrides: Mapping[str, Any] | None) -> list[str]:
    """{"train.steps": 2} -> ["--config.train.steps=2"]: a dict goes through the parser the command
    line uses, so a typo fails the same way and a value is converted by the key's type."""
    items = []
    for key, value in (overrides or {}).items():
        if not isinstance(key, str) or not key:
            raise ConfigError(f"override key {key!r} must be a dotted config key such as 'train.steps'")
        if isinstance(value, (list, tuple)):
            value = "(" + ", ".join(repr(v) for v in value) + ("," if len(value) == 1 else "") + ")"
        items.append(f"--config.{key.removeprefix('--config.')}={value}")
    return items


def resolve(config: ConfigLike, overrides: Mapping[str, Any] | None = None,
            argv: Iterable[str] = ()) -> ml_collections.ConfigDict:
    """The job's ConfigDict: loaded from a file spec (or a copy of the one given, so the caller's
    object is never changed by a job), with `argv` (`--config.k=v` strings) then `overrides` applied."""
    from phi_jax.training import config_file

    if isinstance(config, ml_collections.ConfigDict):
        config = copy.deepcopy(config)
        config.lock()
    elif isinstance(config, (str, os.PathLike)):
        config = config_file.load_config(config)
    else:
        raise ConfigError(f"config must be a config file path (configs/tiny.py[:arg]) or an "
                          f"ml_collections.ConfigDict, not {type(config).__name__}")
    config_file.apply_overrides(config, [*argv, *override_strings(overrides)])
    return config
