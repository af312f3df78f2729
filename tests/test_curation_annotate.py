"""`phi-jax data annotate` through the CLI: a misbehaving teacher, a kill -9 mid-run and a restart.

References: the fake teacher's log (what it was asked and answered) and the score it was told to
give each document; the records on disk must hold exactly those.
"""

import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fake_teacher import FakeTeacher, kill_when_hung
from phi_jax import cli
from phi_jax.curation.quality.annotate import load_rubric, parse_score
from phi_jax.curation.teacher.client import Answer
from phi_jax.data import records

ROOT = Path(__file__).resolve().parents[1]
N_DOCS = 40


def _doc(i: int) -> str:
    return f"def f{i}():\n    return {i}\n"


def _index(doc: str) -> int:
    return int(doc.split("():")[0][len("def f"):])


def _expected_score(i: int):
    return None if i % 7 == 5 else i % 6  # i % 7 == 5: free text without a score


_FAULT = {1: "500", 2: "429", 3: "stall", 4: "malformed", 6: "shape"}


def _write_inputs(directory: Path) -> str:
    for name, part in (("a.jsonl", range(0, 20)), ("b.jsonl", range(20, N_DOCS))):
        (directory / name).write_text("".join(json.dumps({"id": f"doc-{i}", "text": _doc(i), "meta": {"i": i}}) + "\n"
                                              for i in part))
    return f"{directory}/a.jsonl,{directory}/b.jsonl"


def _command(inputs: str, out: Path, url: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "phi_jax.cli", "data", "annotate", f"--input={inputs}", f"--output={out}",
            f"--teacher={url}", "--teacher-model=fake", "--rubric=code", "--concurrency=4", "--timeout=0.5",
            "--backoff=0.01", "--max-retries=4", "--shard-size=10", "--no-progress", "--scoring=answer", *extra]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}


def test_faults_and_a_kill_mid_run_then_restart_record_every_document_once(tmp_path):
    inputs, out = _write_inputs(tmp_path), tmp_path / "out"
    teacher = FakeTeacher(score_of=lambda d: _expected_score(_index(d)),
                          faults=lambda d, attempt: _FAULT.get(_index(d) % 7) if attempt == 0 else None)
    with teacher:
        teacher.hang_after(13)  # the 3rd answer of the second shard: then every request hangs
        proc = subprocess.Popen(_command(inputs, out, teacher.url), env=_env(), cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        kill_when_hung(teacher, proc, threads=4)
        answered_before_kill = set(teacher.answered)
        in_second_shard = sum(teacher.answered.values()) - 10
        assert 3 <= in_second_shard < 10  # requests decided before the 13th answer may still answer
        assert (out / ".shards" / "part-00000.json").is_file()
        assert not (out / ".shards" / "part-00001.json").exists()

        teacher.hang_after(None)
        teacher.release()
        restart = time.monotonic()
        done = subprocess.run(_command(inputs, out, teacher.url), env=_env(), cwd=ROOT,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        asked_after_restart = {doc for t, doc, _ in teacher.arrivals if t >= restart}

    assert not asked_after_restart & answered_before_kill  # no answered document asked again
    assert all(n == 1 for n in teacher.answered.values()) and len(teacher.answered) == N_DOCS
    got = list(records.iter_output(out))
    assert sorted(r["id"] for r in got) == sorted(f"doc-{i}" for i in range(N_DOCS))
    for r in got:
        i, a = r["meta"]["i"], r["meta"]["annotation"]
        assert r["text"] == _doc(i) and a["teacher"] == "fake" and a["rubric"] == "code"
        if _expected_score(i) is None:
            assert (a["status"], a["score"]) == ("unparsed", None)
            assert a["reason"] == "no 'Educational score: N' line in the answer"
            assert a["answer"] == "A fine file, I suppose."
        else:
            assert (a["status"], a["score"], a["reason"]) == ("scored", _expected_score(i), None)
    manifest = records.read_manifest(out)
    counts, (run,) = manifest["counts"], manifest["runs"]
    unparsed = sum(_expected_score(i) is None for i in range(N_DOCS))
    assert (counts["stage"]["scored"], counts["stage"]["unparsed"]) == (N_DOCS - unparsed, unparsed)
    assert (run["shards_processed"], run["shards_resumed"]) == (3, 1)
    assert counts["stage"]["teacher_cache_hits"] == in_second_shard  # answers from before the kill
    assert counts["stage"]["teacher_prompt_tokens"] > 0 and manifest["status"] == "complete"
    assert not list(out.glob(".part-*"))
    assert "scored" in done.stdout and "40 in, 40 out" in done.stdout


def test_a_corrupt_input_shard_is_one_line_naming_it(tmp_path):
    inputs = _write_inputs(tmp_path)
    lines = (tmp_path / "b.jsonl").read_text().splitlines()
    lines[2] = lines[2][:25]
    (tmp_path / "b.jsonl").write_text("\n".join(lines) + "\n")
    done = subprocess.run(_command(inputs, tmp_path / "out", "heuristic"), env=_env(), cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    (line,) = done.stderr.strip().splitlines()
    assert f"{tmp_path}/b.jsonl:3 (part-00002): not valid JSON" in line and "regenerate it" in line


def _main(argv, capsys):
    rc = cli.main(argv)
    return rc, capsys.readouterr()


def test_an_unreachable_teacher_is_a_run_error_naming_the_url(tmp_path, capsys):
    rc, io = _main(_command(_write_inputs(tmp_path), tmp_path / "out", "http://127.0.0.1:9/v1")[3:]
                   + ["--max-retries=1"], capsys)
    assert rc == 1
    assert "teacher at http://127.0.0.1:9/v1/chat/completions gave no usable answer" in io.err
    assert "cached in" in io.err and len(io.err.strip().splitlines()) == 1


def test_other_settings_into_an_existing_output_are_refused_unless_overwrite(tmp_path, capsys):
    inputs, out = _write_inputs(tmp_path), tmp_path / "out"
    base = ["data", "annotate", f"--input={inputs}", f"--output={out}", "--teacher=heuristic", "--no-progress"]
    assert _main(base + ["--rubric=code"], capsys)[0] == 0
    first = (out / "part-00000.jsonl").stat().st_mtime_ns
    rc, io = _main(base + ["--rubric=code"], capsys)  # same: nothing left to do
    assert rc == 0 and "0 processed, 2 already done" in io.out
    assert (out / "part-00000.jsonl").stat().st_mtime_ns == first
    rc, io = _main(base + ["--rubric=edu"], capsys)
    assert rc == 2 and "rubric: 'code' -> 'edu'" in io.err and "--overwrite" in io.err
    assert _main(base + ["--rubric=edu", "--overwrite"], capsys)[0] == 0
    rubrics = {r["meta"]["annotation"]["rubric"] for r in records.iter_output(out)}
    assert rubrics == {"edu"}


def test_the_heuristic_teacher_is_named_everywhere(tmp_path, capsys):
    out = tmp_path / "out"
    assert _main(["data", "annotate", f"--input={_write_inputs(tmp_path)}", f"--output={out}",
                  "--teacher=heuristic", "--rubric=code", "--no-progress"], capsys)[0] == 0
    got = list(records.iter_output(out))
    assert len(got) == N_DOCS and {r["meta"]["annotation"]["teacher"] for r in got} == {"heuristic"}
    assert all("not a model's judgement" in r["meta"]["annotation"]["answer"] for r in got)
    assert records.read_manifest(out)["parameters"]["teacher"]["kind"] == "heuristic"


@pytest.mark.parametrize("rubric, error", [
    ("missing.txt", "--rubric=missing.txt: no such file"),
    ("no_placeholder", "has no {text} placeholder"),
    ("not_utf8", "cannot read it as UTF-8"),
])
def test_unusable_rubric_files(tmp_path, capsys, rubric, error):
    (tmp_path / "no_placeholder").write_text("Rate the document.")
    (tmp_path / "not_utf8").write_bytes(b"\xff\xfe{text}")
    path = rubric if rubric == "missing.txt" else str(tmp_path / rubric)
    rc, io = _main(["data", "annotate", "--input=default", f"--output={tmp_path / 'o'}",
                    "--teacher=http://127.0.0.1:9/v1", "--teacher-model=m", f"--rubric={path}"], capsys)
    assert rc == 2 and error.replace("missing.txt", path) in io.err


def test_the_heuristic_refuses_a_custom_rubric(tmp_path, capsys):
    (tmp_path / "r.txt").write_text("Rate {text}")
    rc, io = _main(["data", "annotate", "--input=default", f"--output={tmp_path / 'o'}",
                    "--teacher=heuristic", f"--rubric={tmp_path / 'r.txt'}"], capsys)
    assert rc == 2 and "knows the built-in rubrics only" in io.err


@pytest.mark.parametrize("text, finish, score, reason", [
    ("Good.\nEducational score: 3", "stop", 3, None),
    ("Good.\n**Educational score:** 4", "stop", 4, None),
    ("Educational score: 1 ... on reflection\nEducational score: 2", "stop", 2, None),
    ("educational SCORE: 0", "stop", 0, None),
    ("Educational score: 7", "stop", None, "score 7 is outside 0-5"),
    ("Educational score: 2.5", "stop", None, "score 2.5 is not a whole number"),
    ("Educational score: 4.0", "stop", 4, None),
    ("I would give it a 3.", "stop", None, "no 'Educational score: N' line in the answer"),
    ("The file is", "length", None, "cut at max_tokens"),
    ("  ", "stop", None, "empty answer"),
])
def test_parse_score_takes_only_what_the_teacher_wrote(text, finish, score, reason):
    got_score, got_reason = parse_score(Answer(text=text, finish_reason=finish))
    assert got_score == score
    assert (got_reason is None) if reason is None else (reason in got_reason)


def test_builtin_rubrics_ask_for_the_score_line():
    for name in ("edu", "code"):
        rubric = load_rubric(name)
        assert "{text}" in rubric.template and '"Educational score: <total points>"' in rubric.template
    assert "basic coding concepts" in load_rubric("code").template


def test_worker_processes_share_one_cache(tmp_path, capsys):
    inputs, out = _write_inputs(tmp_path), tmp_path / "out"
    teacher = FakeTeacher(score_of=lambda d: _expected_score(_index(d)))
    with teacher:
        argv = _command(inputs, out, teacher.url)[3:] + ["--workers=2"]
        assert _main(argv, capsys)[0] == 0
    assert sorted(r["id"] for r in records.iter_output(out)) == sorted(f"doc-{i}" for i in range(N_DOCS))
    assert sum(teacher.answered.values()) == N_DOCS
    assert sqlite3.connect(out / "teacher_cache.sqlite").execute("SELECT COUNT(*) FROM answers").fetchone()[0] == N_DOCS
