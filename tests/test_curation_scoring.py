"""`phi-jax data annotate --scoring=logprobs` through the CLI against a fake teacher with known log-probs.

References: the distribution the fake teacher gives each document (so the expected score and the
mass are known answers), its log of request bodies (what was asked, and how often), and the cache.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from fake_teacher import FakeTeacher
from phi_jax import cli
from phi_jax.curation.quality.annotate import SCORE_PREFIX, score_from_logprobs
from phi_jax.data import records

ROOT = Path(__file__).resolve().parents[1]
N_DOCS = 12


def _doc(i: int) -> str:
    return f"def g{i}(x):\n    return x * {i}\n"


def _index(doc: str) -> int:
    return int(doc.split("(x)")[0][len("def g"):])


def _distribution(i: int) -> list[tuple[str, float]]:
    """Doc i: score i % 6 with p 0.6, " 5" (a spaced score token) with 0.2, "The" with 0.1;
    every 5th document puts only 0.3 on the scores (then `uncertain` at --min-score-mass=0.5)."""
    if i % 5 == 4:
        return [("The", math.log(0.6)), (str(i % 6), math.log(0.3)), ("I", math.log(0.1))]
    return [(str(i % 6), math.log(0.6)), (" 5", math.log(0.2)), ("The", math.log(0.1))]


def _want(i: int) -> tuple[str, float, float]:
    """(status, expected score, mass) of doc i, computed by hand from `_distribution`."""
    if i % 5 == 4:
        return "uncertain", float(i % 6), 0.3
    d = i % 6
    if d == 5:
        return "scored", 5.0, 0.8
    return "scored", (d * 0.6 + 5 * 0.2) / 0.8, 0.8


def _inputs(directory: Path) -> str:
    path = directory / "docs.jsonl"
    path.write_text("".join(json.dumps({"id": f"d{i}", "text": _doc(i), "meta": {"i": i}}) + "\n"
                            for i in range(N_DOCS)))
    return str(path)


def _annotate(inputs, out, url, *extra):
    return [sys.executable, "-m", "phi_jax.cli", "data", "annotate", f"--input={inputs}", f"--output={out}",
            f"--teacher={url}", "--teacher-model=fake", "--rubric=code", "--concurrency=4", "--no-progress",
            "--max-retries=1", "--backoff=0.01", *extra]


def test_score_from_logprobs_is_the_expected_score_over_score_tokens():
    got = score_from_logprobs([["3", math.log(0.5)], [" 4", math.log(0.3)], ["2", math.log(0.1)],
                               ["x", math.log(0.1)]], 0.5)
    assert got["status"] == "scored" and got["score_mass"] == pytest.approx(0.9)
    assert got["score"] == pytest.approx((3 * 0.5 + 4 * 0.3 + 2 * 0.1) / 0.9, abs=1e-6)
    assert got["distribution"]["4"] == pytest.approx(0.3 / 0.9, abs=1e-6)
    low = score_from_logprobs([["3", math.log(0.2)], ["The", math.log(0.8)]], 0.5)
    assert (low["status"], low["score"], low["expected_score"]) == ("uncertain", None, 3.0)
    none = score_from_logprobs([["The", 0.0]], 0.5)
    assert none["status"] == "uncertain" and none["expected_score"] is None
    assert score_from_logprobs([["7", 0.0], ["33", -1.0]], 0.0)["status"] == "uncertain"


def test_logprobs_scoring_known_scores_uncertain_and_no_answer_paid_twice(tmp_path):
    inputs = _inputs(tmp_path)
    env = {"PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"}
    teacher = FakeTeacher(logprobs_of=lambda doc: _distribution(_index(doc)))
    with teacher:
        done = subprocess.run(_annotate(inputs, tmp_path / "a", teacher.url), cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        asked = len(teacher.bodies)
        assert asked == N_DOCS
        body = teacher.bodies[0]
        assert (body["max_tokens"], body["top_logprobs"], body["logprobs"]) == (1, 20, True)
        assert body["continue_final_message"] is True and body["add_generation_prompt"] is False
        assert body["messages"][-1] == {"role": "assistant", "content": SCORE_PREFIX}
        got = {r["meta"]["i"]: r["meta"]["annotation"] for r in records.iter_output(tmp_path / "a")}
        for i in range(N_DOCS):
            status, expected, mass = _want(i)
            a = got[i]
            assert a["status"] == status and a["scoring"] == "logprobs"
            assert a["expected_score"] == pytest.approx(expected, abs=1e-5)
            assert a["score_mass"] == pytest.approx(mass, abs=1e-5)
            assert a["score"] == (None if status == "uncertain" else pytest.approx(expected, abs=1e-5))
            assert sum(a["distribution"].values()) == pytest.approx(1.0, abs=1e-5)
        counts = records.read_manifest(tmp_path / "a")["counts"]["stage"]
        assert counts["uncertain"] == sum(_want(i)[0] == "uncertain" for i in range(N_DOCS))

        # Same answers into another output, sharing the cache: nothing is asked again ...
        cache = tmp_path / "a" / "teacher_cache.sqlite"
        again = subprocess.run(_annotate(inputs, tmp_path / "b", teacher.url, f"--teacher-cache={cache}"),
                               cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert again.returncode == 0, again.stderr[-2000:]
        assert len(teacher.bodies) == asked
        assert [r["meta"]["annotation"] for r in records.iter_output(tmp_path / "b")] == \
            [r["meta"]["annotation"] for r in records.iter_output(tmp_path / "a")]
        # ... while the other scoring is asked for (never served from the logprobs answers).
        answer = subprocess.run(_annotate(inputs, tmp_path / "c", teacher.url, f"--teacher-cache={cache}",
                                          "--scoring=answer"),
                                cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert answer.returncode == 0, answer.stderr[-2000:]
        assert len(teacher.bodies) == asked + N_DOCS
        assert all("top_logprobs" not in b for b in teacher.bodies[asked:])
        modes = {r["meta"]["annotation"]["scoring"] for r in records.iter_output(tmp_path / "c")}
        assert modes == {"answer"}


def test_an_endpoint_without_logprobs_falls_back_to_answers_with_one_warning(tmp_path, caplog):
    teacher = FakeTeacher(score_of=lambda doc: _index(doc) % 6, logprobs=False)
    with teacher, caplog.at_level("WARNING"):
        rc = cli.main(_annotate(_inputs(tmp_path), tmp_path / "a", teacher.url, "--shard-size=4")[3:])
    assert rc == 0
    assert sum("returned no log-probs" in r.getMessage() for r in caplog.records) == 1
    got = [r["meta"] for r in records.iter_output(tmp_path / "a")]
    assert all(m["annotation"]["scoring"] == "answer" for m in got)
    assert all(m["annotation"]["score"] == m["i"] % 6 for m in got)


@pytest.mark.parametrize("flag, error", [("--scoring=vibes", "--scoring='vibes'"),
                                         ("--min-score-mass=1.5", "--min-score-mass=1.5")])
def test_bad_scoring_flags_are_one_line(tmp_path, capsys, flag, error):
    rc = cli.main(_annotate(_inputs(tmp_path), tmp_path / "a", "http://127.0.0.1:9/v1", flag)[3:])
    err = capsys.readouterr().err
    assert rc == 2 and error in err and len(err.strip().splitlines()) == 1


def test_an_endpoint_that_refuses_a_structured_field_is_asked_plainly_once_warned(tmp_path, caplog):
    """Synthesis asks for an exercise's shape (a regex); an endpoint without structured outputs
    answers 400 naming the field: the client asks without it, warns once, and stops sending it."""
    from phi_jax.curation.synthesis.exercises import ANSWER_REGEX
    from phi_jax.curation.teacher.client import Prompt, TeacherClient, TeacherConfig

    teacher = FakeTeacher(answer_of=lambda doc: "```python\ndef f():\n    pass\n```",
                          refuse_fields=("structured_outputs",))
    prompts = []
    for i in range(6):
        plain = Prompt([{"role": "user", "content": f"exercise {i}"}], "sha")
        prompts.append(Prompt(plain.messages, "sha", request={"structured_outputs": {"regex": ANSWER_REGEX}},
                              fallback=plain))
    with teacher, caplog.at_level("WARNING"), \
            TeacherClient(TeacherConfig(url=teacher.url, model="m", concurrency=1), tmp_path / "c.sqlite") as c:
        answers = c.ask(prompts)
    assert all(a.error is None and a.text.startswith("```python") for a in answers)
    assert sum("structured_outputs" in r.getMessage() for r in caplog.records) == 1
    assert "structured_outputs" in teacher.bodies[0]
    assert not any("structured_outputs" in b for b in teacher.bodies[2:])  # asked plainly from then on


def test_the_exercise_regex_accepts_what_the_parser_keeps():
    import re

    from phi_jax.curation.synthesis.exercises import ANSWER_REGEX, Exercise, parse_exercise

    answer = ('```python\nimport math\n\ndef area(r):\n    """Area of a circle of radius r."""\n'
              '    return math.pi * r * r\n\n\ndef check(candidate):\n    assert candidate(1) == math.pi\n```')
    assert re.fullmatch(ANSWER_REGEX, answer) and isinstance(parse_exercise(answer), Exercise)
    assert not re.fullmatch(ANSWER_REGEX, "def area(r):\n    return r\n")
