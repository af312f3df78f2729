"""The one error path to users: errors a person can act on, and how the CLI reports them.

Library code raises these (never `SystemExit`, never a bare assert) for problems caused by what a
user gave it — a file, a config key, a flag, a request field, a teacher's answer — with a message
that names the problem, where it is, and the fix, on one line. The CLI catches `PhiJaxError` at the
top and prints just that line (`--debug` or `PHI_JAX_DEBUG=1` adds the traceback); anything else is
a bug and keeps its traceback.

Exit codes: 2 for bad input (`InputError`), 1 for a failure while running (`PhiJaxError`).
Each class also derives from the builtin a caller would naturally catch (ValueError,
FileNotFoundError, RuntimeError, ImportError), so library users need not know these names.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType


class PhiJaxError(Exception):
    """A failure the user can act on (exit code 1): the message says what, where and the fix."""

    exit_code = 1


class InputError(PhiJaxError, ValueError):
    """Bad input: a file, config value, flag or record that cannot be used as given (exit code 2)."""

    exit_code = 2


class ConfigError(InputError):
    """A config key that does not exist, or a value of the wrong type or out of range."""


class MissingFileError(InputError, FileNotFoundError):
    """A path the user gave does not exist or lacks a file that must be there."""


class RunError(PhiJaxError, RuntimeError):
    """A run that cannot go on (no checkpoint restores, too many non-finite steps, a dead engine)."""


class DependencyError(PhiJaxError, ImportError):
    """An optional dependency is not installed; the message names the extra that installs it."""

    exit_code = 2


def require(module: str, *, extra: str, purpose: str) -> ModuleType:
    """Import an optional dependency, or raise DependencyError naming the pip extra for it.

    Only a missing `module` itself is translated: an ImportError raised *inside* an installed
    package is a real bug and propagates unchanged.
    """
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name is None or module.split(".")[0] != e.name.split(".")[0]:
            raise
        raise DependencyError(f"{purpose} needs the `{e.name}` package, which is not installed; "
                              f"install it with: pip install 'phi_jax[{extra}]'") from None


def debug_enabled() -> bool:
    """Whether errors should show their traceback (`--debug` sets PHI_JAX_DEBUG=1)."""
    return os.environ.get("PHI_JAX_DEBUG", "").lower() not in ("", "0", "false", "no")


def one_line(error: BaseException) -> str:
    """The message of an error as a single line (whitespace runs collapsed)."""
    text = str(error) or type(error).__name__
    return " ".join(text.split())
