"""Lazy attribute exports for packages whose public names pull in jax (import time matters for the
CLI's `--help` and for Grain worker processes that import the package only to unpickle a function)."""

from __future__ import annotations

import importlib
from typing import Any, Callable


def exports(namespace: dict[str, Any], table: dict[str, str]) -> Callable[[str], Any]:
    """A module `__getattr__` that imports `table[name]` on first access and caches the value."""
    def __getattr__(name: str) -> Any:
        if name in table:
            value = getattr(importlib.import_module(table[name]), name)
            namespace[name] = value
            return value
        raise AttributeError(f"module {namespace['__name__']!r} has no attribute {name!r}")

    return __getattr__
