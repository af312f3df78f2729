"""The import contract of shared/DESIGN.md ("Which way imports run"), checked on the source.

Every `import` in phi_jax — module level or inside a function, since a lazy import is still a
dependency — is read with `ast`, mapped to the unit it belongs to (a top-level module or package of
phi_jax), and checked against the table below. Also refused: two modules that import each other,
and the library importing transformers, torch or peft (test/benchmark extras only).
"""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# unit -> the units it may import (besides itself). Units not listed as keys may import nothing.
_BASE = {"errors", "fileio", "_faults", "allocator", "_lazy"}
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "_faults": set(),
    "allocator": set(),
    "_lazy": set(),
    "fileio": {"errors"},
    "axes": set(),
    "kernels": set(),
    "config": _BASE,
    "model": _BASE | {"config", "kernels", "axes"},
    "sharding": _BASE | {"config", "axes"},
    "chat": _BASE,
    "gguf_file": _BASE,
    "tokenizer": _BASE | {"chat", "gguf_file"},
    "hf_config": _BASE | {"config"},
    "hf": _BASE | {"config", "hf_config", "tokenizer"},
    "gguf": _BASE | {"config", "hf_config", "gguf_file", "tokenizer", "hf", "chat"},
    "checkpoint": _BASE | {"config", "model"},
    "lora": _BASE | {"config", "model", "hf"},
    "gguf_vocab": _BASE | {"tokenizer"},
    "gguf_export": _BASE | {"config", "model", "kernels", "hf", "hf_config", "gguf_file", "gguf_vocab",
                            "tokenizer", "lora"},
    "quant": _BASE | {"config", "model", "kernels"},
    "distributed": _BASE,
    "data": _BASE | {"tokenizer", "chat"},
    "sandbox": _BASE,
    "inference": _BASE | {"model", "hf", "gguf", "gguf_export", "tokenizer", "checkpoint", "config", "chat",
                          "lora", "quant"},
    "training": _BASE | {"model", "data", "sharding", "checkpoint", "config", "axes", "tokenizer", "hf",
                      "distributed", "lora"},
    "serve": _BASE | {"inference", "chat", "tokenizer", "compile_cache"},
    "evals": _BASE | {"inference", "data", "sandbox", "tokenizer", "chat"},
    "curation": _BASE | {"data", "tokenizer", "inference", "sandbox", "chat", "config"},
    # the jobs a user runs (main job, finetune, recipe): wire the units below, never the CLI
    "jobs": _BASE | {"training", "curation", "evals", "inference", "data", "checkpoint", "config", "lora",
                     "tokenizer", "distributed"},
    "__init__": {"config", "model", "inference", "tokenizer", "hf", "gguf", "_lazy", "lora", "jobs"},
}
# The CLI parses, calls the jobs (or another library function) and prints; nothing imports it.
CLI = "cli"
FORBIDDEN_EXTERNAL = ("transformers", "torch", "peft")


def _unit(module: str) -> str:
    """phi_jax.inference.decode -> "inference"; phi_jax -> "__init__"."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _module_name(package_root: Path, file: Path) -> str:
    rel = file.relative_to(package_root.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(file: Path, module: str, modules: set[str]) -> list[tuple[str, int]]:
    """(imported module, line) for every import in the file; relative imports resolved, and
    `from package import submodule` counted as importing the submodule (not the package)."""
    tree = ast.parse(file.read_text(), filename=str(file))
    package = module if file.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            submodules = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in modules]
            if submodules and len(submodules) == len(node.names):
                found += [(m, node.lineno) for m in submodules]
            else:
                found.append((base, node.lineno))
                found += [(m, node.lineno) for m in submodules]
    return found


def violations(package_root: Path) -> list[str]:
    """Every import that breaks the contract, as 'file:line: what'."""
    problems, edges = [], {}
    files = sorted(package_root.rglob("*.py"))
    modules = {_module_name(package_root, f) for f in files}
    for file in files:
        module = _module_name(package_root, file)
        here = _unit(module)
        for target, line in _imports(file, module, modules):
            where = f"{file.relative_to(package_root.parent)}:{line}"
            top = target.split(".")[0]
            if top in FORBIDDEN_EXTERNAL:
                problems.append(f"{where}: the library imports {target} (test/benchmark extra only)")
            if top != "phi_jax" or target == "phi_jax":
                continue
            edges.setdefault(module, set()).add(target)
            there = _unit(target)
            if there == here:
                continue
            if there == CLI:
                problems.append(f"{where}: {module} imports {target}; nothing may import the CLI")
            elif here != CLI and there not in ALLOWED.get(here, set()):
                problems.append(f"{where}: {here} may not import {there} ({module} -> {target})")
    for a, targets in sorted(edges.items()):
        for b in sorted(targets):
            if a < b and a in edges.get(b, ()):
                problems.append(f"{a} and {b} import each other")
    return problems


def test_phi_jax_follows_the_import_contract():
    assert violations(ROOT / "phi_jax") == []


# Inside curation (one unit above), its rooms: room -> the rooms it may import (besides itself).
# `core` is the floor every room stands on and imports no other room, so a newcomer reads it
# first and alone; the rooms form layers (core < teacher < quality; core < dedup <
# decontaminate; synthesis and instruct on top), so no two rooms import each other.
CURATION_ROOMS: dict[str, set[str]] = {
    "core": set(),
    "teacher": {"core"},
    "quality": {"core", "teacher"},
    "dedup": {"core"},
    "decontaminate": {"core", "dedup"},
    "synthesis": {"core", "teacher", "quality", "dedup", "decontaminate"},
    "instruct": {"core", "teacher", "quality"},
}


def curation_room_violations(package_root: Path) -> list[str]:
    """Every import between curation's rooms that CURATION_ROOMS does not allow."""
    problems = []
    files = sorted(package_root.rglob("*.py"))
    modules = {_module_name(package_root, f) for f in files}
    for file in sorted((package_root / "curation").rglob("*.py")):
        module = _module_name(package_root, file)
        parts = module.split(".")
        if len(parts) < 4:
            continue            # the package's own __init__ (a docstring)
        here = parts[2]
        for target, line in _imports(file, module, modules):
            if not target.startswith("phi_jax.curation."):
                continue
            there = target.split(".")[2]
            if there != here and there not in CURATION_ROOMS.get(here, set()):
                problems.append(f"{file.relative_to(package_root.parent)}:{line}: curation room {here} "
                                f"may not import {there} ({module} -> {target})")
    return problems


def test_curation_rooms_import_downward_only():
    assert set(CURATION_ROOMS) == {p.name for p in (ROOT / "phi_jax" / "curation").iterdir()
                                   if (p / "__init__.py").exists()}, "a new room needs a row"
    assert curation_room_violations(ROOT / "phi_jax") == []


@pytest.mark.parametrize("file, line, expected", [
    ("curation/core/stage.py", "from phi_jax.curation.teacher import client", "core may not import teacher"),
    ("curation/dedup/remove.py", "from phi_jax.curation.synthesis.plan import make_plan",
     "dedup may not import synthesis"),
    ("curation/teacher/client.py", "from phi_jax.curation.quality import annotate", "teacher may not import quality"),
])
def test_the_room_check_fails_on_an_upward_import(tmp_path, file, line, expected):
    copy = tmp_path / "phi_jax"
    shutil.copytree(ROOT / "phi_jax", copy, ignore=shutil.ignore_patterns("__pycache__"))
    target = copy / file
    target.write_text(target.read_text() + f"\n{line}\n")
    found = curation_room_violations(copy)
    assert any(expected in v for v in found), found


@pytest.mark.parametrize("file, line, expected", [
    ("model.py", "from phi_jax.training import loop", "model may not import training"),
    ("serve/app.py", "from phi_jax import model", "serve may not import model"),
    ("curation/__init__.py", "import phi_jax.serve", "curation may not import serve"),
    ("data/packing.py", "from phi_jax.cli import main", "nothing may import the CLI"),
    ("hf.py", "import torch", "the library imports torch"),
    ("kernels/attention.py", "from .. import config", "kernels may not import config"),
])
def test_the_contract_check_fails_on_a_forbidden_import(tmp_path, file, line, expected):
    copy = tmp_path / "phi_jax"
    shutil.copytree(ROOT / "phi_jax", copy, ignore=shutil.ignore_patterns("__pycache__"))
    target = copy / file
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text((target.read_text() if target.exists() else "") + f"\n{line}\n")
    found = violations(copy)
    assert any(expected in v for v in found), found


def test_the_contract_check_finds_a_cycle(tmp_path):
    copy = tmp_path / "phi_jax"
    shutil.copytree(ROOT / "phi_jax", copy, ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "data" / "sources.py").write_text((copy / "data" / "sources.py").read_text()
                                              + "\nfrom phi_jax.data import pipeline\n")
    assert any("import each other" in v for v in violations(copy))
