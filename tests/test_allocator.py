"""The CLI re-executes itself under a retaining allocator when one is installed (phi_jax/allocator.py)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from phi_jax import allocator

ROOT = Path(__file__).resolve().parents[1]


def _version(**env):
    result = subprocess.run([sys.executable, "-m", "phi_jax.cli", "--version"], cwd=ROOT, text=True,
                            capture_output=True, timeout=60,
                            env={k: v for k, v in dict(os.environ, **env).items() if k != "LD_PRELOAD"})
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


@pytest.mark.parametrize("name", ["tcmalloc", "jemalloc"])
def test_runs_under_the_chosen_allocator(name):
    if allocator.find(name) is None:
        pytest.skip(f"{name} is not installed here")
    assert _version(PHI_JAX_ALLOCATOR=name).endswith(f"allocator {name})")


def test_auto_prefers_tcmalloc_and_system_opts_out():
    assert _version(PHI_JAX_ALLOCATOR="system").endswith("allocator glibc)")
    expected = "tcmalloc" if allocator.find("tcmalloc") else "jemalloc" if allocator.find("jemalloc") \
        else "glibc"
    assert _version().endswith(f"allocator {expected})")


def test_no_allocator_installed_means_no_reexec(monkeypatch):
    monkeypatch.setattr(allocator, "find", lambda name: None)
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.delenv("PHI_JAX_ALLOCATOR_SET", raising=False)
    monkeypatch.setattr(os, "execve", lambda *a: pytest.fail("re-executed without an allocator"))
    allocator.reexec_with_retaining_allocator(["--version"])  # returns: nothing to switch to
