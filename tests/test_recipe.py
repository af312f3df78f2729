"""The main job curates: `phi-jax train --config=configs/tiny.py:runlocal` as a subprocess.

annotate -> filter -> dedup -> decontaminate -> pack -> train -> held-out, one line each: counts
never grow from a stage's input to its output and equal an independent count of the shards;
each stage's manifest names the sha256 of the manifest before it; a rerun skips every finished
stage (and redoes, identically, one that was deleted); a stage switched off is passed over.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from phi_jax.data import records

ROOT = Path(__file__).resolve().parents[1]
CURATION = ["annotate", "filter", "dedup", "decontaminate"]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from phi_jax.data import corpus

    workdir = tmp_path_factory.mktemp("tok")
    corpus.get_or_train_tokenizer(workdir, vocab_size=512)
    return workdir / "tokenizer"


def _train(workdir, tokenizer_dir, *overrides):
    cmd = [sys.executable, "-m", "phi_jax.cli", "train", f"--config={ROOT / 'configs/tiny.py'}:runlocal",
           f"--workdir={workdir}", f"--config.tokenizer.path={tokenizer_dir}", *overrides]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return {row["stage"]: row for row in json.loads(result.stdout.strip().splitlines()[-1])["stages"]}, result.stdout


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _shards(directory: Path) -> dict[str, str]:
    return {p.name: _sha(p) for p in sorted(directory.glob("part-*"))}


@pytest.fixture(scope="module")
def main_job(tmp_path_factory, tokenizer_dir):
    workdir = tmp_path_factory.mktemp("main") / "run"
    rows, stdout = _train(workdir, tokenizer_dir)
    return workdir, rows, stdout


def test_every_stage_reports_counts_that_add_up(main_job, tokenizer_dir):
    from phi_jax.tokenizer import Tokenizer

    workdir, rows, stdout = main_job
    assert list(rows) == CURATION + ["pack", "train", "heldout"]
    tokenizer = Tokenizer.from_pretrained(tokenizer_dir)
    previous = None
    for name in CURATION:
        row = rows[name]
        assert row["status"] == "ran" and row["seconds"] >= 0
        assert row["documents_out"] <= row["documents_in"] and row["tokens_out"] <= row["tokens_in"]
        kept = list(records.iter_output(workdir / "curated" / name))
        assert row["documents_out"] == len(kept)  # the line says what the shards hold
        assert row["tokens_out"] == sum(len(ids) for ids in tokenizer.encode_batch([r["text"] for r in kept]))
        manifest = records.read_manifest(workdir / "curated" / name)
        assert row["documents_in"] - row["documents_out"] == sum(manifest["counts"]["dropped"].values())
        if previous is None:
            assert row["documents_in"] == 64  # data.max_documents of runlocal
        else:
            assert (row["documents_in"], row["tokens_in"]) == (previous["documents_out"], previous["tokens_out"])
        assert f"  {name}" in stdout
        previous = row
    assert rows["annotate"]["documents_out"] == rows["annotate"]["documents_in"]  # annotation drops nothing
    assert rows["filter"]["documents_out"] < rows["filter"]["documents_in"]  # the filter does filter
    # training read the last stage's shards, and only those
    from phi_jax import checkpoint

    meta = checkpoint.read_meta(checkpoint.make_manager(workdir, read_only=True), 6)
    last = workdir / "curated" / "decontaminate"
    nonempty = [str(last / o["path"]) for o in records.read_manifest(last)["outputs"] if o["records"]]
    assert meta["data"] == {"source": "jsonl", "files": nonempty}
    assert rows["pack"]["documents_in"] > 0 and rows["pack"]["tokens_out"] == 6 * 8 * 32
    assert rows["train"]["steps"] == [0, 6]


def test_manifests_are_chained_by_hash(main_job):
    workdir, _, _ = main_job
    curated = workdir / "curated"
    first = records.read_manifest(curated / "annotate")
    assert [i["path"] for i in first["inputs"]] == ["default"] and first["upstream"] == []
    for before, name in zip(CURATION, CURATION[1:]):
        manifest = records.read_manifest(curated / name)
        assert manifest["upstream"] == [{"path": str(curated / before),
                                         "manifest_sha256": _sha(curated / before / records.MANIFEST)}]
        assert {Path(i["path"]).name: i["sha256"] for i in manifest["inputs"]} == _shards(curated / before)


def test_rerun_skips_finished_stages_and_redoes_a_missing_one(main_job, tokenizer_dir):
    import shutil

    workdir, first, _ = main_job
    curated = workdir / "curated"
    manifests = {name: _sha(curated / name / records.MANIFEST) for name in CURATION[:-1]}
    shards = _shards(curated / "decontaminate")
    shutil.rmtree(curated / "decontaminate")  # as if the run had been killed during the last stage
    rows, stdout = _train(workdir, tokenizer_dir)
    assert [rows[n]["status"] for n in CURATION] == ["skipped"] * 3 + ["ran"]
    assert {name: _sha(curated / name / records.MANIFEST) for name in CURATION[:-1]} == manifests
    assert _shards(curated / "decontaminate") == shards  # redone byte for byte
    for name in CURATION:
        assert {k: rows[name][k] for k in ("documents_in", "documents_out", "tokens_in", "tokens_out")} == \
            {k: first[name][k] for k in ("documents_in", "documents_out", "tokens_in", "tokens_out")}
    assert rows["train"]["steps"] == [6, 6] and "nothing to train" in stdout


def test_a_stage_switched_off_is_passed_over(tmp_path, tokenizer_dir):
    rows, stdout = _train(tmp_path / "run", tokenizer_dir, "--config.curation.dedup.enabled=False",
                          "--config.train.steps=1")
    assert rows["dedup"]["status"] == "off" and "dedup          off" in stdout
    assert not (tmp_path / "run" / "curated" / "dedup").exists()
    decontaminated = records.read_manifest(tmp_path / "run" / "curated" / "decontaminate")
    assert [u["path"] for u in decontaminated["upstream"]] == [str(tmp_path / "run" / "curated" / "filter")]
    assert rows["decontaminate"]["documents_in"] == rows["filter"]["documents_out"]



def test_curation_off_trains_on_the_data_as_given(tmp_path):
    """In process (the CLI path of `--config.curation.enabled=False` runs in test_train's subprocess
    tests): nothing is curated and the table says why."""
    from phi_jax.jobs import main as stages
    from phi_jax.training.config_file import apply_overrides, load_config

    summary = {"start_step": 0, "end_step": 1, "losses": [9.0], "heldout": [], "heldout_tokens": 0,
               "data_stats": {"documents": 3, "tokens": 300}}
    for override, why in (("--config.curation.enabled=False", "curation.enabled=False"),
                          ("--config.data.source=jsonl", "data.source=jsonl is not in curation.sources")):
        config = apply_overrides(load_config(f"{ROOT / 'configs/tiny.py'}:runlocal"), [override])
        assert stages.curate_for_training(config, tmp_path / "run") == []
        text, rows = stages.stage_report([], summary, config, 1.0)
        assert "curation       off" in text and why in text
        assert [r["stage"] for r in rows] == ["pack", "train", "heldout"]
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------ phi-jax recipe, end to end
_EXERCISE = '''```python
def add_{n}(a: int, b: int) -> int:
    """Return a + b + {n}.

    >>> add_{n}(1, 2)
    {n3}
    """
    return a + b + {n}


def check(candidate):
    assert candidate(1, 2) == {n3}
    assert candidate(0, 0) == {n}
    assert candidate(-4, 4) == {n}
```'''
_SECTION = ("Loops repeat work. For example, a for loop visits every item of a list, because the "
            "loop asks the list for its items one by one.\n\n```python\nfor x in [1, 2, 3]:\n    print(x)\n```\n\n"
            "This prints each number on its own line. Note that the loop variable keeps its last value. {n}")


def _recipe_answer(doc: str) -> str:
    """A rubric prompt's document gets a score; a synthesis prompt an exercise or a textbook section."""
    n = int(hashlib.sha256(doc.encode()).hexdigest()[:4], 16) % 1000
    if "def check(candidate)" in doc:
        return _EXERCISE.replace("{n3}", str(n + 3)).replace("{n}", str(n))
    if "section of a textbook" in doc:
        return _SECTION.replace("{n}", str(n))
    return f"Reasons.\nEducational score: {len(doc) % 6}"


@pytest.mark.slow
def test_recipe_runs_every_stage_and_reruns_nothing(tmp_path):
    from fake_teacher import FakeTeacher
    from train_helpers import save_tiny_hf

    embedder = save_tiny_hf(tmp_path / "embedder", ["def f(x):\n    return x + 1\n", "Some prose about loops."])
    workdir = tmp_path / "recipe"
    with FakeTeacher(answer_of=_recipe_answer) as teacher:
        cmd = [sys.executable, "-m", "phi_jax.cli", "recipe", f"--config={ROOT / 'configs/recipe_phi1_tiny.py'}:runlocal",
               f"--workdir={workdir}", f"--teacher={teacher.url}", f"--config.classifier.embedder={embedder}",
               f"--config.pretrain.config={ROOT / 'configs/tiny.py'}:runlocal", "--config.filter.min_quality=1",
               "--config.pretrain.overrides=--config.model.max_len=1024",  # HumanEval prompts, 512-token BPE
               f"--report-copy={tmp_path / 'copy' / 'report.json'}"]
        first = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
        assert first.returncode == 0, first.stderr[-3000:]
        asked = sum(teacher.answered.values())
        second = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
        assert second.returncode == 0, second.stderr[-3000:]
        assert sum(teacher.answered.values()) == asked  # the rerun asked the teacher nothing
    report = json.loads((workdir / "report.json").read_text())
    stages = report["stages"]
    assert list(stages) == ["annotate", "classifier", "score", "filter", "dedup", "decontaminate", "textbook",
                            "exercises", "pretrain", "finetune", "humaneval"]
    assert stages["annotate"]["result"]["records_out"] == 12
    assert stages["classifier"]["status"] == "done" and stages["score"]["result"]["scorer"] == "classifier"
    assert stages["score"]["result"]["records_out"] == 40  # filter.documents of runlocal
    assert stages["filter"]["result"]["records_out"] <= 40
    assert stages["textbook"]["result"]["kept"] >= 1 and stages["exercises"]["result"]["kept"] >= 1
    assert stages["pretrain"]["result"]["steps"] == 4
    from phi_jax.cli import SUBCOMMANDS

    if "finetune" not in SUBCOMMANDS:
        assert stages["finetune"]["status"] == "skipped" and "not in this build" in stages["finetune"]["reason"]
    assert stages["humaneval"]["result"]["num_problems"] == 2 and 0 <= report["humaneval_pass@1"] <= 1
    lines = [line for line in second.stdout.splitlines() if line.startswith("  ")]
    assert len(lines) == 11 and all("already done" in line or line.split()[1] == "skipped" for line in lines)
    assert (tmp_path / "copy" / "report.png").read_bytes()[:4] == b"\x89PNG"
