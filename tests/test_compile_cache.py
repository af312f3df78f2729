"""The warm start: every CLI command keeps its compiled programs in JAX's persistent cache, finds
them at the next start, and works (with one warning line) when the cache cannot be used."""

import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

import phi_jax
from phi_jax import compile_cache
from phi_jax.config import preset
from phi_jax.model import init_params
from phi_jax.tokenizer import train_bpe

from conftest import COMPILE_CACHE_ENABLE

ROOT = Path(__file__).resolve().parent.parent


def test_default_location_and_switches():
    home = {"HOME": "/home/u"}
    assert compile_cache.default_dir(home) == Path("/home/u/.cache/phi_jax/jax-compile")
    assert compile_cache.default_dir(home | {"XDG_CACHE_HOME": "/x"}) == Path("/x/phi_jax/jax-compile")
    moved = home | {"XDG_CACHE_HOME": "/x", "PHI_JAX_COMPILE_CACHE": "/elsewhere/cc"}
    assert compile_cache.default_dir(moved) == Path("/elsewhere/cc")
    assert compile_cache.default_dir(home | {"PHI_JAX_COMPILE_CACHE": "~/cc"}) == Path("~/cc").expanduser()
    for off in ("0", "off", "OFF", "false", "no", ""):
        assert compile_cache.default_dir(home | {"PHI_JAX_COMPILE_CACHE": off}) is None
    assert COMPILE_CACHE_ENABLE(env=home | {"PHI_JAX_COMPILE_CACHE": "0"}) is None  # (unpatched)


def test_the_test_suite_never_writes_the_users_cache():
    assert Path(os.environ["PHI_JAX_COMPILE_CACHE"]).resolve() != \
        compile_cache.default_dir({"HOME": str(Path.home())}).resolve()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-hf")
    tokenizer = train_bpe(["def add(a, b):\n    return a + b\n" * 20], vocab_size=280)
    config = preset("test", vocab_size=tokenizer.vocab_size, eos_token_id=tokenizer.eos_id)
    phi_jax.save_pretrained(path, config, init_params(config, jax.random.key(0)))
    tokenizer.save(path)
    return path


def _sample(model, cache_setting):
    env = dict(os.environ, PHI_JAX_COMPILE_CACHE=str(cache_setting))
    run = subprocess.run([sys.executable, "-m", "phi_jax.cli", "sample", f"--model={model}",
                          "--prompt=def add(", "--temperature=0", "--max-new-tokens=5"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    warnings = [line for line in run.stderr.splitlines()
                if "compile cache" in line or "Warning" in line or "warnings.warn" in line]
    return run.stdout, warnings


def _entries(directory):
    return {p.name: p.stat().st_mtime_ns for p in Path(directory).iterdir() if p.name.endswith("-cache")}


@pytest.mark.slow
def test_second_start_reads_the_cache_and_a_bad_cache_is_one_warning(tiny_model, tmp_path):
    cache = tmp_path / "cc"
    text, warnings = _sample(tiny_model, cache)
    written = _entries(cache)
    assert len(written) >= 2 and warnings == []  # the prefill and the decode programs at least
    again, warnings = _sample(tiny_model, cache)
    assert again == text and warnings == []
    assert _entries(cache) == written  # every program was found: nothing compiled, nothing rewritten

    for name in written:  # corrupt every entry: one warning line, the same answer, entries rewritten
        (cache / name).write_bytes(b"not a compiled program")
    corrupt, warnings = _sample(tiny_model, cache)
    assert corrupt == text and len(warnings) == 1 and "rm -rf" in warnings[0], warnings

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    unwritable, warnings = _sample(tiny_model, blocker / "cc")  # a directory that cannot exist
    assert unwritable == text and len(warnings) == 1 and "not usable" in warnings[0], warnings
