"""Issue 31, part 1: every path derived from a user's --workdir / --output goes through
`phi_jax.fileio`, so a gs:// run writes only to its bucket.

Two guards: an AST lint over phi_jax/ that fails on a `pathlib.Path(...)` (or `os.path.join`) built
from a run-path parameter (`Path("gs://b/run")` is `gs:/b/run`, a local directory), and an end-to-end
check: the main job, finetune and a curation stage run on a fake-GCS workdir from an empty working
directory, which stays empty; then a second empty directory resumes the run and samples from it.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Parameter / attribute names that hold a path a user gave for a run's outputs.
RUN_PATH_NAMES = {"workdir", "output", "out_dir", "output_dir", "run_dir", "report_copy", "merge", "root"}
# (file, function) -> why a pathlib join over a run-path name is right there.
ALLOWED = {
    ("phi_jax/gguf.py", "convert_to_hf"): "out_dir is a local staging directory (callers publish it whole)",
    ("phi_jax/hf.py", "write_hf_files"): "directory is a local staging directory (callers publish it)",
    ("phi_jax/sandbox/execute.py", "_populate"): "workdir is the sandbox's own temporary directory",
    ("phi_jax/curation/dedup/remove.py", "_work"): "root is OUTPUT/.work, already a local scratch directory "
                                            "for a remote output (stage.work_dir)",
}


def _name(node) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return None


def _guarded(function: ast.AST) -> bool:
    """A function that branches on `fileio.is_remote(...)` uses pathlib only for the local case."""
    return any(isinstance(n, ast.Call) and _name(n.func) == "is_remote" for n in ast.walk(function))


def run_path_joins(package: Path) -> list[str]:
    """'file:line: call' for every pathlib.Path / os.path.join over a run-path name, outside ALLOWED."""
    found = []
    for file in sorted(package.rglob("*.py")):
        rel = file.relative_to(package.parent).as_posix()
        tree = ast.parse(file.read_text(), filename=rel)
        functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
        owner = {}
        for function in functions:  # innermost function wins (walk is breadth-first)
            for node in ast.walk(function):
                owner[id(node)] = function
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call) or not node.args:
                continue
            callee = _name(node.func)
            is_join = callee in ("Path", "PurePath", "PosixPath") or (
                callee == "join" and isinstance(node.func, ast.Attribute) and _name(node.func.value) == "path")
            args = node.args if callee == "join" else node.args[:1]
            if not is_join or not any(_name(a) in RUN_PATH_NAMES for a in args):
                continue
            function = owner.get(id(node))
            fname = function.name if function else "<module>"
            if (rel, fname) in ALLOWED or (function is not None and _guarded(function)):
                continue
            found.append((rel, node.lineno, f"{rel}:{node.lineno}: {ast.unparse(node)} in {fname}"))
    return [text for *_, text in sorted(found)]


def test_no_pathlib_join_over_a_run_path_in_the_library():
    assert run_path_joins(ROOT / "phi_jax") == []


def test_the_lint_finds_a_pathlib_join_over_a_workdir(tmp_path):
    pkg = tmp_path / "phi_jax"
    (pkg / "jobs").mkdir(parents=True)
    (pkg / "jobs" / "bad.py").write_text(
        "from pathlib import Path\nimport os\n\n"
        "def save(args, workdir):\n    return Path(args.workdir) / 'x', Path(workdir)\n\n"
        "def log(output):\n    return os.path.join(output, 'log')\n\n"
        "def fine(output):\n    from phi_jax import fileio\n"
        "    return fileio.scratch_dir(output) if fileio.is_remote(output) else Path(output)\n")
    found = run_path_joins(pkg)
    assert [f.split(": ", 1)[0] for f in found] == ["phi_jax/jobs/bad.py:5", "phi_jax/jobs/bad.py:5",
                                                    "phi_jax/jobs/bad.py:8"], found


# ------------------------------------------------------------------ gs:// from an empty directory
def _run(cwd: Path, *argv: str, code: str | None = None) -> subprocess.CompletedProcess:
    """`phi-jax ARGV` (or `python -c CODE ARGV`) with `cwd` as the working directory."""
    command = [sys.executable, *(["-c", code] if code else ["-m", "phi_jax.cli"]), *argv]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _empty(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*"))


@pytest.mark.slow
def test_gcs_jobs_write_nothing_to_the_working_directory_and_resume_elsewhere(gcs, tmp_path):
    from phi_jax import fileio
    from phi_jax.data import corpus, records

    tok_local = tmp_path / "tok"
    corpus.get_or_train_tokenizer(tok_local, vocab_size=512)
    tok = gcs.url("tokenizer")
    fileio.upload_tree(tok_local / "tokenizer", tok)
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    run = gcs.url("run")
    train = ["train", f"--config={ROOT / 'configs/tiny.py'}:runlocal", f"--workdir={run}",
             f"--config.tokenizer.path={tok}", "--config.data.heldout_fraction=0.0"]

    # the main job (curate, then train) on a bucket, from an empty directory
    out = _run(first, *train, "--config.train.steps=2")
    rows = {r["stage"]: r for r in json.loads(out.stdout.strip().splitlines()[-1])["stages"]}
    assert [rows[s]["status"] for s in ("annotate", "filter", "dedup", "decontaminate")] == ["ran"] * 4
    for stage in ("annotate", "filter", "dedup", "decontaminate"):
        assert records.read_manifest(f"{run}/curated/{stage}")["status"] == "complete"
        assert rows[stage]["output"] == f"{run}/curated/{stage}"
    assert fileio.as_path(f"{run}/tokenizer/tokenizer.json").is_file()
    # a curation stage on its own (`phi-jax data`), bucket to bucket
    _run(first, "data", "filter", f"--input={run}/curated/annotate", f"--output={run}/hq", "--min-quality=3",
         "--field=annotation.score",
         "--no-progress")
    assert records.read_manifest(f"{run}/hq")["counts"]["records_out"] == rows["filter"]["documents_out"]
    # finetune (LoRA) from the library, a bucket base and in-memory conversations -> a bucket adapter
    chats = [{"messages": [{"role": "user", "content": f"What is {i} + {i}?"},
                           {"role": "assistant", "content": f"{i} + {i} = {2 * i}."}]} for i in range(16)]
    ft = gcs.url("ft")
    args = dict(config=str(ROOT / "configs/finetune_smollm2_lora.py") + ":runlocal", model=run, data=chats,
                workdir=ft, overrides={"train.steps": 2, "train.seq_len": 32})
    code = ("import json, sys, phi_jax.jobs as jobs\n"
            "from phi_jax.inference.decode import generate\n"
            "a = json.loads(sys.argv[1]); r = jobs.finetune(a.pop('config'), **a)\n"
            "m = r.loaded  # the base from the bucket with the bucket adapter applied\n"
            "ids = generate(m.model, m.variables, [m.tokenizer.encode('What is 1 + 1?')], 4)[0]\n"
            "print(json.dumps({'adapter': r.adapter, 'end': r.end_step, 'lora': m.model.config.lora_rank,\n"
            "                  'new': len(ids)}))\n")
    got = json.loads(_run(first, json.dumps(args), code=code).stdout.strip().splitlines()[-1])
    assert got["adapter"] == f"{ft}/adapter" and got["end"] == 2 and got["lora"] == 8 and 1 <= got["new"] <= 4
    assert fileio.as_path(f"{ft}/adapter/adapter_model.safetensors").is_file()
    assert fileio.as_path(f"{ft}/data/part-00000.jsonl").is_file()
    assert _empty(first) == []

    # a second machine (another empty directory) resumes the run and samples from the bucket
    out = _run(second, *train, "--config.train.steps=3")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    rows = {r["stage"]: r for r in result["stages"]}
    assert result["start_step"] == 2 and result["end_step"] == 3
    assert [rows[s]["status"] for s in ("annotate", "filter", "dedup", "decontaminate")] == ["skipped"] * 4
    sample = _run(second, "sample", f"--model={run}", "--prompt=def f(", "--max-new-tokens=4")
    assert sample.stdout.startswith("def f(")
    assert _empty(second) == []
