"""The README and the docs site say only what exists: the site builds with `mkdocs build --strict`
(a broken link, anchor, snippet or docstring reference fails), every `phi_jax.X[.Y...]` name they
mention resolves, every `phi-jax SUBCOMMAND --flag` they show is a flag of that subcommand's parser,
and the README's library example runs."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]

_NAME = re.compile(r"(?<![\w./-])phi_jax(?:\.[A-Za-z_][A-Za-z0-9_]*)+")


def _rel(page: Path) -> str:
    return str(page.relative_to(ROOT))


@pytest.mark.slow
def test_mkdocs_build_strict(tmp_path):
    """What CI's docs build runs: a warning (a dead link or anchor, a missing snippet file, a
    `:::` reference that does not resolve, a page outside the nav) fails the build."""
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir",
                             str(tmp_path / "site")], cwd=ROOT, capture_output=True, text=True, env=env,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert (tmp_path / "site" / "index.html").exists()
    assert (tmp_path / "site" / "api" / "index.html").exists()


# ---------------------------------------------------------------------------------- dotted names


def mentioned_names() -> dict[str, list[str]]:
    """Every `phi_jax.X...` name in the README and the docs (prose, code and `:::` lines) -> pages."""
    found: dict[str, list[str]] = {}
    for page in PAGES:
        for name in _NAME.findall(page.read_text()):
            found.setdefault(name.rstrip("."), []).append(_rel(page))
    return found


def resolve(name: str) -> str | None:
    """None when `name` is a module, or an attribute reachable from one; else what is missing."""
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        module = ".".join(parts[:cut])
        try:
            spec = importlib.util.find_spec(module)
        except (ImportError, ValueError):
            spec = None
        if spec is None:
            continue
        if cut == len(parts):
            return None
        obj = importlib.import_module(module)
        for i, attr in enumerate(parts[cut:], start=cut):
            try:
                obj = getattr(obj, attr)
            except AttributeError:
                return f"{'.'.join(parts[:i])} has no attribute {attr!r}"
        return None
    return f"no module {parts[0]!r}"


def test_every_phi_jax_name_in_the_docs_resolves():
    names = mentioned_names()
    assert len(names) > 50, "the name scan found almost nothing: is the regex broken?"
    missing = {name: (why, sorted(set(pages))) for name, pages in names.items()
               if (why := resolve(name))}
    assert not missing, "names in the docs that do not exist:\n" + "\n".join(
        f"  {name}: {why} (in {', '.join(pages)})" for name, (why, pages) in sorted(missing.items()))


def test_the_public_door_is_documented():
    names = mentioned_names()
    for name in ("phi_jax.load", "phi_jax.train", "phi_jax.finetune",
                 "phi_jax.recipe"):
        assert name in names, f"{name} is never mentioned in the README or docs"


def test_the_name_check_fails_on_a_name_that_does_not_exist():
    assert resolve("phi_jax.inference.loader.load") is None
    assert resolve("phi_jax.training.step.make_train_step") is None
    assert resolve("phi_jax.Tokenizer") is None  # a lazy export
    assert resolve("phi_jax.evals.sandbox") is not None  # the stale name issue 28 names
    assert resolve("phi_jax.inference.loader.no_such_function") is not None


# ---------------------------------------------------------------------------------- CLI flags

_STOP = re.compile(r"`|&&|\|\||(?<=\s)[|;&#](?=\s|$)|$")


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _flags(parser: argparse.ArgumentParser) -> set[str]:
    return {s for a in parser._actions for s in a.option_strings}


def _logical_lines(text: str) -> list[str]:
    """Lines with shell continuations (a trailing backslash) joined."""
    return text.replace("\\\n", " ").split("\n")


def shown_commands() -> list[tuple[str, list[str]]]:
    """(page, tokens after `phi-jax`) for every `phi-jax ...` command in the README and the docs."""
    out = []
    for page in PAGES:
        for line in _logical_lines(page.read_text()):
            for m in re.finditer(r"(?<![\w-])phi-jax\s+(?=[a-z-])", line):
                rest = line[m.end():]
                rest = rest[:_STOP.search(rest).start()]
                tokens = rest.split()
                if tokens:
                    out.append((_rel(page), tokens))
    return out


def check_command(parser: argparse.ArgumentParser, tokens: list[str]) -> list[str]:
    """What is wrong with `phi-jax TOKENS` as far as names go: an unknown subcommand or flag."""
    subs = _subparsers(parser)
    if tokens[0].startswith("-"):
        return [f"{t}" for t in tokens if t.startswith("--") and t.split("=")[0] not in _flags(parser)]
    if tokens[0] not in subs:
        return [f"no subcommand {tokens[0]!r}"] if re.fullmatch(r"[a-z][a-z-]*", tokens[0]) else []
    target, rest, path = subs[tokens[0]], tokens[1:], tokens[0]
    nested = _subparsers(target)
    if nested and rest and re.fullmatch(r"[a-z][a-z-]*", rest[0]):
        if rest[0] not in nested:
            return [f"no subcommand {path} {rest[0]!r}"]
        target, path, rest = nested[rest[0]], f"{path} {rest[0]}", rest[1:]
    known = _flags(target) | _flags(parser)
    return [f"{path}: no flag {flag}" for t in rest if t.startswith("--")
            if not (flag := t.split("=")[0]).startswith("--config.") and flag != "--" and flag not in known]


def test_every_phi_jax_command_in_the_docs_has_those_flags():
    from phi_jax.cli import build_parser

    parser = build_parser()
    commands = shown_commands()
    assert len(commands) > 50, "the command scan found almost nothing: is the regex broken?"
    wrong = [(page, " ".join(tokens), problem) for page, tokens in commands
             for problem in check_command(parser, tokens)]
    assert not wrong, "commands in the docs that the CLI does not have:\n" + "\n".join(
        f"  {page}: phi-jax {cmd}: {problem}" for page, cmd, problem in wrong)


def test_the_flag_check_fails_on_a_flag_that_does_not_exist():
    from phi_jax.cli import build_parser

    parser = build_parser()
    assert check_command(parser, ["train", "--config=configs/tiny.py", "--workdir=x", "--config.train.steps=2"]) == []
    assert check_command(parser, ["data", "dedup", "--input=x", "--output=y", "--threshold=0.8"]) == []
    assert check_command(parser, ["train", "--workdirr=x"]) == ["train: no flag --workdirr"]
    assert check_command(parser, ["data", "dedupe"]) == ["no subcommand data 'dedupe'"]
    assert check_command(parser, ["trian"]) == ["no subcommand 'trian'"]


# ---------------------------------------------------------------------------------- README example


def readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    m = re.search(r"<!-- readme-example[^>]*-->\n```python\n(.*?)```", text, re.S)
    assert m, "README.md has no python block marked <!-- readme-example -->"
    return m.group(1)


def test_the_readme_example_is_short_and_uses_the_door():
    code = readme_example()
    assert len(code.strip().splitlines()) <= 12
    assert "phi_jax.load(" in code and ".generate(" in code
    compile(code, "README.md", "exec")


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A random tiny Llama-style model with a byte-level BPE tokenizer, as an HF directory."""
    import jax

    import phi_jax
    from phi_jax.tokenizer import train_bpe

    out = tmp_path_factory.mktemp("tiny-hf")
    texts = [Path(importlib.import_module(m).__file__).read_text() for m in ("textwrap", "argparse")]
    tokenizer = train_bpe(texts, 512)
    config = phi_jax.preset("smollm2-135m", vocab_size=tokenizer.vocab_size, d_model=64,
                            n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, mlp_dim=128, max_len=256)
    variables = phi_jax.init_params(config, jax.random.PRNGKey(0))
    phi_jax.save_pretrained(out, config, variables["params"])
    tokenizer.save(out)
    return out


@pytest.mark.slow
def test_the_readme_example_runs(tiny_model_dir):
    code = readme_example().replace('"smollm2"', repr(str(tiny_model_dir)))
    assert str(tiny_model_dir) in code, "the example no longer loads smollm2: update this test"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.strip(), "the README example printed nothing"
