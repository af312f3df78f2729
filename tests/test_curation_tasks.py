"""`phi-jax data tasks`: deterministic tasks from the embedded corpus whose references are right.

References: the stdlib sources themselves (read with `ast` here), each return_value function run
in this process on its call (not in the sandbox the generator used), and a second generation in
another process (another hash seed) for determinism.
"""

import ast
import json
import os
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from phi_jax.curation.instruct.corpus_tasks import BLANK, TASK_TYPES, generate_tasks
from phi_jax.data import records
from phi_jax.data.tasks import LETTERS, read_tasks, split_of

ROOT = Path(__file__).resolve().parents[1]
COUNT = 48


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    """The same tasks from the CLI (a subprocess) and from the library (this process)."""
    out = tmp_path_factory.mktemp("tasks") / "out"
    done = subprocess.run([sys.executable, "-m", "phi_jax.cli", "data", "tasks", f"--output={out}",
                           f"--count={COUNT}", "--seed=0"], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return out, generate_tasks(COUNT, seed=0)


def _module_ast(module: str) -> ast.Module:
    base = Path(sysconfig.get_paths()["stdlib"]) / module.replace(".", "/")
    path = base.with_suffix(".py") if base.with_suffix(".py").is_file() else base / "__init__.py"
    return ast.parse(path.read_text())


def _function(module: str, name: str) -> ast.FunctionDef:
    (node,) = [n for n in _module_ast(module).body if isinstance(n, ast.FunctionDef) and n.name == name][:1]
    return node


def test_the_same_seed_gives_the_same_tasks_in_any_process(generated):
    out, tasks = generated
    lines = (out / "tasks.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [t.to_json() for t in tasks]
    assert [t.to_json() for t in read_tasks(str(out))] == [t.to_json() for t in tasks]  # --tasks=DIR reads it
    manifest = records.read_manifest(out)
    assert manifest["stage"] == "tasks" and manifest["status"] == "complete"
    assert manifest["outputs"][0]["sha256"] == records.file_sha256(out / "tasks.jsonl")
    by_type = {t: manifest["counts"]["stage"][f"type_{t}"] for t in TASK_TYPES}
    assert by_type == {t: COUNT // 4 for t in TASK_TYPES}
    assert len({t.id for t in tasks}) == COUNT


def test_each_source_is_used_once_and_splits_follow_the_id(generated):
    _, tasks = generated
    sources = [t.id.split(":", 1)[1] for t in tasks]
    assert len(set(sources)) == len(sources)  # no held-out question shares a function with training
    for t in tasks:
        assert t.split == (split_of(t.id) if t.answer is not None else "train")
    other = {t.id: t.split for t in generate_tasks(12, seed=1, types=("docstring_to_name", "return_value"))}
    assert all(other[t.id] == t.split for t in tasks if t.id in other)


def test_references_are_right(generated):
    _, tasks = generated
    for t in tasks:
        if t.type == "topic_summary":
            assert t.answer is None and t.split == "train" and "Summarise in one sentence" in t.prompt
            continue
        module, name = t.meta["module"], t.id.split(":", 1)[1][len(t.meta["module"]) + 1:]
        node = _function(module, name)
        if t.type in ("docstring_to_name", "multiple_choice"):
            doc = re.split(r"\n\s*\n", ast.get_docstring(node).strip())[0].strip()[:500]
            assert re.sub(rf"\b{re.escape(name)}\b", BLANK, doc) in t.prompt and f"`{module}`" in t.prompt
            if t.type == "docstring_to_name":
                assert t.answer == name
            else:
                assert len(t.choices) == 4 and t.choices[LETTERS.index(t.answer)] == name
                assert all(f"{LETTERS[i]}. {c}" in t.prompt for i, c in enumerate(t.choices))
        else:  # return_value: run the function here on the call the prompt shows
            namespace: dict = {}
            exec(compile(ast.Module([node], []), module, "exec"), namespace)
            call = ast.parse(t.meta["call"], mode="eval").body
            assert f"`{t.meta['call']}`" in t.prompt and f"def {name}(" in t.prompt
            value = namespace[name](*[ast.literal_eval(a) for a in call.args])
            assert repr(value) == t.answer
