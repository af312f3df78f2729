"""The `phi-jax` command line: convert both ways, sample from a run and from an HF directory."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import phi_jax
from phi_jax.config import preset
from phi_jax.model import init_params
from phi_jax.tokenizer import train_bpe

from train_helpers import ROOT, params_equal


def _cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "phi_jax.cli", *map(str, args)], cwd=ROOT,
                          env=dict(os.environ), capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A random tiny model saved the HF way, with a tokenizer beside it."""
    path = tmp_path_factory.mktemp("hf") / "model"
    tokenizer = train_bpe(["def add(a, b):\n    return a + b\n" * 20, "class A:\n    pass\n" * 20],
                          vocab_size=300)
    config = preset("test", vocab_size=300, eos_token_id=tokenizer.eos_id)
    phi_jax.save_pretrained(path, config, init_params(config, jax.random.key(0)))
    tokenizer.save(path)
    return path


@pytest.mark.slow
def test_convert_round_trip_and_sample(hf_dir, tmp_path):
    workdir, back = tmp_path / "run", tmp_path / "back"
    result = _cli("convert", hf_dir, workdir)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (workdir / "tokenizer" / "tokenizer.json").exists()
    result = _cli("convert", workdir, back, "--dtype", "float32")
    assert result.returncode == 0, result.stderr[-2000:]
    _, original = phi_jax.from_pretrained(hf_dir)
    _, converted = phi_jax.from_pretrained(back)
    assert params_equal(original, converted)
    assert (back / "tokenizer.json").exists()

    greedy = dict(prompt="def add(", temperature=0.0)
    args = [f"--{k.replace('_', '-')}={v}" for k, v in greedy.items()] + ["--max-new-tokens=12"]
    from_run = _cli("sample", f"--workdir={workdir}", *args)
    from_hf = _cli("sample", f"--hf={hf_dir}", *args)
    assert from_run.returncode == 0, from_run.stderr[-2000:]
    assert from_run.stdout == from_hf.stdout and from_run.stdout.startswith("def add(")
    # the streamed text is exactly the decoded greedy continuation
    model, variables = phi_jax.from_pretrained(hf_dir)
    tokenizer = phi_jax.Tokenizer.from_pretrained(hf_dir)
    ids = phi_jax.generate(model, variables, [tokenizer.encode("def add(")], max_new_tokens=12,
                           stop_tokens=[tokenizer.eos_id])[0]
    assert from_hf.stdout == "def add(" + tokenizer.decode(ids) + "\n"


def test_convert_refuses_unknown_source(tmp_path):
    result = _cli("convert", tmp_path, tmp_path / "out")
    assert result.returncode == 2 and "is neither an HF checkpoint" in result.stderr
    assert "Traceback" not in result.stderr


def test_sample_needs_a_model(tmp_path):
    result = _cli("sample", "--prompt=x")
    assert result.returncode == 2 and "--model" in result.stderr


def test_recipe_help_shows_the_librarys_one_table_of_stages():
    """The table of stages is written once (phi1_recipe's docstring); `phi-jax recipe --help` shows it,
    and it names every stage the recipe runs."""
    from phi_jax.jobs import phi1_recipe

    table = phi1_recipe.stage_table()
    assert table.startswith("Stages, in order") and "humaneval      pass@1" in table
    assert all(stage in table for stage in phi1_recipe.STAGES)
    result = _cli("recipe", "--help", timeout=60)
    assert result.returncode == 0, result.stderr
    assert table in result.stdout and "{stages}" not in result.stdout
    assert result.stdout.count("Stages, in order") == 1
