"""`--runner=beam` (Apache Beam's DirectRunner, in this process) against `--runner=local`.

The reference is the local runner's output: the Beam run of the same command must write the same
bytes, the same manifest counts, and report a corrupt shard the same one-line way.
"""

import json
import logging

import pytest

from fake_teacher import FakeTeacher
from phi_jax import cli
from phi_jax.data import records

pytest.importorskip("apache_beam")
pytestmark = pytest.mark.slow  # Beam's import and pipeline start-up: ~5 s on 2 cores


@pytest.fixture(autouse=True)
def _quiet_beam():
    logging.getLogger("apache_beam").setLevel(logging.ERROR)


def _inputs(tmp_path, n=30):
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps({"id": f"d{i}", "text": f"def f{i}():\n    return {i}\n"}) + "\n"
                            for i in range(n)))
    return str(path)


def test_beam_writes_what_local_writes(tmp_path, capsys):
    src = _inputs(tmp_path)
    teacher = FakeTeacher(score_of=lambda d: None if "f7(" in d else len(d) % 6,
                          faults=lambda d, a: "500" if a == 0 and "f3" in d else None)
    with teacher:
        for runner in ("local", "beam"):
            rc = cli.main(["data", "annotate", f"--input={src}", f"--output={tmp_path / runner}",
                           f"--teacher={teacher.url}", "--teacher-model=fake", "--rubric=code",
                           "--shard-size=8", "--concurrency=2", "--backoff=0.01", f"--runner={runner}",
                               "--scoring=answer",  # the parsed-answer path, with its unparsed count
                           "--no-progress"])
            assert rc == 0, capsys.readouterr().err
    local, beam = records.read_manifest(tmp_path / "local"), records.read_manifest(tmp_path / "beam")
    assert local["outputs"] == beam["outputs"] and len(local["outputs"]) == 4
    for out in local["outputs"]:
        assert (tmp_path / "local" / out["path"]).read_bytes() == (tmp_path / "beam" / out["path"]).read_bytes()
    keep = ("scored", "unparsed")
    assert {k: local["counts"]["stage"][k] for k in keep} == {k: beam["counts"]["stage"][k] for k in keep} \
        == {"scored": 29, "unparsed": 1}
    assert beam["runs"][-1]["runner"] == "beam"


def test_beam_reports_a_corrupt_shard_in_one_line(tmp_path, capsys):
    src = _inputs(tmp_path)
    lines = open(src).read().splitlines()
    lines[20] = lines[20][:10]
    open(src, "w").write("\n".join(lines) + "\n")
    argv = ["data", "annotate", f"--input={src}", f"--output={tmp_path / 'out'}", "--teacher=heuristic",
            "--rubric=code", "--shard-size=8", "--runner=beam", "--no-progress"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"phi-jax data: error: {src}:21 (part-00002): not valid JSON (Unterminated string starting "
                   "at, column 8); the shard is corrupt or truncated: regenerate it or remove the line")
