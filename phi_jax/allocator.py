"""Run under a memory allocator that keeps what it frees, when one is installed.

Why: XLA:CPU allocates each execution's temporary arena (hundreds of MiB for a train step) with
malloc. Under glibc an allocation that large is an mmap, freed by munmap, so every step maps the
arena anew and pays a page fault per 4 KiB touched (~62,500 faults per tiny train step here, ~1
million per phi-100m step); glibc's tunables cannot keep it (its mmap threshold is capped at 32
MiB). tcmalloc with `TCMALLOC_RELEASE_RATE=0`, or jemalloc with decay disabled, keep the pages
mapped and reuse them. The allocator must be chosen before the process starts (LD_PRELOAD), so the
`phi-jax` CLI re-executes itself once with it; library users do the same by hand:

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 TCMALLOC_RELEASE_RATE=0 python ...

`PHI_JAX_ALLOCATOR=system` opts out; `=tcmalloc` / `=jemalloc` picks one;
`PHI_JAX_ALLOCATOR_PATH=DIR[:DIR]` finds a library installed without root (e.g. a .deb unpacked
with `dpkg-deb -x`). A `TCMALLOC_*` / `MALLOC_CONF` the user set wins over ours.

The cost is resident memory, and the setting was chosen by measuring it (benchmarks/memory.py,
docs/memory.md): on the SmolLM2-135M 8x256 train step, one process per case, tcmalloc keeping
every freed page (`TCMALLOC_RELEASE_RATE=0`) peaked at 7.72 GB, the same as glibc (7.72 GB), with
the steps ~1.6x faster; giving pages back gradually (`TCMALLOC_RELEASE_RATE=1`) peaked at 13.3 GB
and rate 10 passed 13.6 GB: gperftools never merges a returned span with a kept neighbour, so
releasing fragments the heap and it grows. So the bound is not a release rate: it is one job per
process (the CLI's commands, and every benchmark case since `benchmarks.run` runs each in its own
process; the 14-18 GB seen before were several models' arenas in one process).
"""

from __future__ import annotations

import glob
import os
import sys

ENV = "PHI_JAX_ALLOCATOR"
_DONE = "PHI_JAX_ALLOCATOR_SET"
# (name, library glob, environment that makes it retain freed memory)
ALLOCATORS = (
    ("tcmalloc", "libtcmalloc_minimal.so.4",
     {"TCMALLOC_RELEASE_RATE": "0", "TCMALLOC_AGGRESSIVE_DECOMMIT": "false"}),
    ("jemalloc", "libjemalloc.so.2",
     {"MALLOC_CONF": "background_thread:true,dirty_decay_ms:-1,muzzy_decay_ms:-1"}),
)
_SEARCH = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib",
           "/usr/local/lib")
PATH_ENV = "PHI_JAX_ALLOCATOR_PATH"  # extra directories searched first (an unprivileged install)


def find(name: str) -> str | None:
    """The path of an allocator's shared library, or None when it is not installed."""
    library = dict((n, lib) for n, lib, _ in ALLOCATORS)[name]
    extra = [d for d in os.environ.get(PATH_ENV, "").split(os.pathsep) if d]
    for directory in (*extra, *_SEARCH):
        hits = sorted(glob.glob(os.path.join(directory, library)))
        if hits:
            return hits[0]
    return None


def current() -> str:
    """The allocator this process runs under ("tcmalloc", "jemalloc" or "glibc"), for run metadata."""
    preload = os.environ.get("LD_PRELOAD", "")
    for name, library, _ in ALLOCATORS:
        if library.split(".so")[0] in preload:
            return name
    return "glibc"


def settings(name: str) -> dict[str, str]:
    """The environment that makes allocator `name` retain (and bound) what it frees."""
    return dict(dict((n, env) for n, _, env in ALLOCATORS)[name])


def choose() -> tuple[str, str, dict[str, str]] | None:
    """(name, library path, environment) of the allocator to run under, or None for glibc."""
    wanted = os.environ.get(ENV, "auto").lower()
    if wanted in ("system", "glibc", "none", "0", "off"):
        return None
    names = [n for n, _, _ in ALLOCATORS] if wanted == "auto" else [wanted]
    for name, _, env in ALLOCATORS:
        if name in names:
            path = find(name)
            if path:
                return name, path, env
    return None


def reexec_with_retaining_allocator(argv: list[str], module: str = "phi_jax.cli") -> None:
    """Replace this process with one running `python -m <module> argv` under the allocator.

    `module` lets other programs (the benchmark runner) do what the CLI does.

    Returns (does nothing) when opted out, when none is installed, when this process already runs
    under one, or when it already re-executed once (never loops).
    """
    if os.environ.get(_DONE) or current() != "glibc":
        return
    chosen = choose()
    if chosen is None:
        return
    _, path, env = chosen
    new_env = dict(env, **os.environ)  # a user's own TCMALLOC_* / MALLOC_CONF wins
    new_env[_DONE] = "1"
    new_env["LD_PRELOAD"] = ":".join(p for p in (path, os.environ.get("LD_PRELOAD", "")) if p)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", module, *argv], new_env)
