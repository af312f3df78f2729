"""A warm start: JAX's persistent compilation cache, on by default for every `phi-jax` command.

Why: XLA compiles every jitted program of a process anew, which for SmolLM2 served on a CPU is
minutes of work before the first answer (the decode step and each prefill bucket), and the same
minutes again at the next start. With the cache on, a program compiled once is read back from disk.

Where: `$PHI_JAX_COMPILE_CACHE` if set (`0`, `off`, `false`, `no` or empty turn it off), else
`$XDG_CACHE_HOME/phi_jax/jax-compile`, else `~/.cache/phi_jax/jax-compile`. Delete the directory to
clear it; JAX keys entries by program, devices, flags and versions, so a stale entry is never used.

A cache that cannot be used never stops a command: a directory that cannot be created or written
gives one warning line and the command runs without the cache; unreadable (corrupt) entries give
one warning line per process (JAX itself warns once per entry) and are recompiled.
"""

from __future__ import annotations

import logging
import os
import uuid
import warnings
from pathlib import Path
from typing import Mapping

_log = logging.getLogger(__name__)

ENV = "PHI_JAX_COMPILE_CACHE"
_OFF = {"", "0", "off", "false", "no", "none"}
_JAX_WARNINGS = ("Error reading persistent compilation cache entry",
                 "Error writing persistent compilation cache entry")
_state = {"dir": None, "hooked": False, "warned": False}


def default_dir(env: Mapping[str, str] | None = None) -> Path | None:
    """The cache directory `enable` uses for this environment, or None when it is turned off."""
    env = os.environ if env is None else env
    if ENV in env:
        value = env[ENV].strip()
        return None if value.lower() in _OFF else Path(value).expanduser()
    base = env.get("XDG_CACHE_HOME") or str(Path(env.get("HOME") or Path.home()) / ".cache")
    return Path(base).expanduser() / "phi_jax" / "jax-compile"


def enable(directory: str | os.PathLike | None = None, *, env: Mapping[str, str] | None = None
           ) -> Path | None:
    """Turn JAX's persistent compilation cache on (before the first compile of the process).

    Args:
      directory: where to keep it; default `default_dir(env)`.
    Returns the directory in use, or None when the cache is off or unusable (one warning then).
    Every program is cached however quickly it compiled: a server's start is many small
    compiles, and a tiny model's programs take well under JAX's default threshold of 1 s.
    """
    import jax

    path = default_dir(env) if directory is None else Path(directory)
    if path is None:
        return None
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".probe-{uuid.uuid4().hex}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        _log.warning("the compile cache directory %s is not usable (%s); compiling without it. Set "
                     "%s=DIR to move it or %s=0 to turn it off", path, e.strerror or e, ENV, ENV)
        return None
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    _state["dir"] = path
    _one_warning_for_bad_entries()
    return path


def mapped_regions() -> int | None:
    """Memory maps this process holds (Linux), or None where /proc does not say."""
    try:
        with open("/proc/self/maps", "rb") as f:
            return sum(1 for _ in f)
    except OSError:
        return None


def map_limit() -> int:
    """The kernel's limit on one process's memory maps (vm.max_map_count; 65,530 by default)."""
    try:
        with open("/proc/sys/vm/max_map_count") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 65530


def release_programs_near_map_limit(fraction: float = 0.75) -> bool:
    """Drop JAX's in-memory compiled programs when this process holds more than `fraction` of the
    memory maps the kernel allows it; True when it did.

    Why: every compiled XLA:CPU kernel keeps its machine code, constants and data in pages of their
    own (three maps a kernel; ~1,400 maps for one prefill plus one decode program of an unrolled
    SmolLM2), and nothing frees them while the program is cached. A long-lived process that meets
    many shapes (a server: prefill buckets x batch rows x attention spans x masked or not) reaches
    vm.max_map_count after some tens of programs, and the next compile then segfaults inside XLA
    (seen in the test suite's workers). Dropping the programs frees their maps; the ones still
    needed are compiled again, or read back from the persistent cache (`enable`) in seconds.
    Call it where no JAX computation of this process is being traced or compiled concurrently.
    """
    held, limit = mapped_regions(), map_limit()
    if held is None or held <= fraction * limit:
        return False
    import gc

    import jax

    _log.warning("this process holds %d memory maps, near the kernel's limit of %d "
                 "(vm.max_map_count), mostly compiled programs' code; dropping JAX's compiled "
                 "programs (the ones still needed compile again%s)", held, limit,
                 ", from the compile cache" if _state["dir"] else "")
    jax.clear_caches()
    gc.collect()
    return True


def current() -> Path | None:
    """The directory `enable` turned on in this process, or None."""
    return _state["dir"]


def _one_warning_for_bad_entries() -> None:
    """JAX warns (two lines each) for every cache entry it cannot read or write; a corrupt cache
    would print dozens. Say it once, on one line, with the fix; every other warning is unchanged."""
    if _state["hooked"]:
        return
    _state["hooked"] = True
    show = warnings.showwarning

    def showwarning(message, category, filename, lineno, file=None, line=None):
        text = str(message)
        if not text.startswith(_JAX_WARNINGS):
            return show(message, category, filename, lineno, file, line)
        if not _state["warned"]:
            _state["warned"] = True
            _log.warning("the compile cache at %s has entries that cannot be used (%s); compiling "
                         "those programs again. `rm -rf %s` clears it", _state["dir"],
                         text.split(": ", 1)[-1][:200], _state["dir"])

    warnings.showwarning = showwarning
