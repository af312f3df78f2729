"""The teacher client against a fake OpenAI-compatible endpoint that misbehaves on purpose.

The reference is the fake teacher's own log: what it was asked, how often, and what it answered.
Timeouts are short (0.5 s) and backoff tiny, so the faults cost well under a second each.
"""

import sqlite3
import time

import pytest

from fake_teacher import FakeTeacher
from phi_jax.curation.core.templates import template_sha256
from phi_jax.curation.teacher.cache import TeacherCache
from phi_jax.curation.teacher.client import Prompt, TeacherClient, TeacherConfig
from phi_jax.errors import InputError, RunError

TEMPLATE = "Rate this:\n<code>\n{text}\n</code>"
SHA = template_sha256(TEMPLATE)


def _prompt(doc: str, template: str = TEMPLATE) -> Prompt:
    return Prompt([{"role": "user", "content": template.replace("{text}", doc)}], template_sha256(template))


def _config(url: str, **kw) -> TeacherConfig:
    kw = {"model": "fake", "concurrency": 4, "timeout_s": 0.5, "max_retries": 3, "backoff_s": 0.01,
          "max_backoff_s": 0.05, **kw}
    return TeacherConfig(url=url, **kw)


def test_retries_every_transient_fault_and_returns_the_teachers_answer(tmp_path):
    faults = {"d500": ["500", "500"], "d429": ["429"], "stall": ["stall"], "bad": ["malformed"],
              "shape": ["shape"]}
    teacher = FakeTeacher(score_of=lambda d: len(d) % 6,
                          faults=lambda d, a: faults.get(d, [])[a] if a < len(faults.get(d, [])) else None)
    docs = list(faults) + ["plain"]
    with teacher, TeacherClient(_config(teacher.url), tmp_path / "c.sqlite") as client:
        answers = client.ask([_prompt(d) for d in docs])
    for doc, answer in zip(docs, answers):
        assert answer.text == f"Some reasons.\nEducational score: {len(doc) % 6}", doc
        assert (answer.prompt_tokens, answer.completion_tokens, answer.cached) == (11, 5, False)
        assert teacher.attempts[doc] == len(faults.get(doc, [])) + 1 and teacher.answered[doc] == 1
    u = client.usage
    assert (u["http_5xx"], u["http_429"], u["timeouts"], u["malformed"]) == (2, 1, 1, 2)
    assert u["retries"] == 6 and u["answers"] == 6 and u["prompt_tokens"] == 66 and u["completion_tokens"] == 30


def test_429_waits_for_retry_after(tmp_path):
    teacher = FakeTeacher(score_of=lambda d: 1, faults=lambda d, a: "429" if a == 0 else None,
                          retry_after="1")
    with teacher, TeacherClient(_config(teacher.url), None) as client:
        client.ask([_prompt("x")])
    (first, _, what), (second, _, _) = teacher.arrivals
    assert what == "429" and second - first >= 0.95  # backoff alone would be 0.01 s


def test_concurrency_is_bounded(tmp_path):
    teacher = FakeTeacher(score_of=lambda d: 2, delay_s=0.05)
    with teacher, TeacherClient(_config(teacher.url, concurrency=3), None) as client:
        assert len(client.ask([_prompt(str(i)) for i in range(12)])) == 12
    assert teacher.max_in_flight == 3


def test_cache_is_written_before_use_and_keyed_by_template_model_sampling_and_input(tmp_path):
    path = tmp_path / "cache.sqlite"
    teacher = FakeTeacher(score_of=lambda d: 3)
    with teacher:
        with TeacherClient(_config(teacher.url), path) as client:
            (answer,) = client.ask([_prompt("doc")])
            # Already committed, visible to another connection, before this client is closed.
            assert sqlite3.connect(path).execute("SELECT COUNT(*) FROM answers").fetchone()[0] == 1
        with TeacherClient(_config(teacher.url), path) as client:
            (again,) = client.ask([_prompt("doc")])
            assert again.cached and again.text == answer.text and client.usage["cache_hits"] == 1
            assert client.usage["cached_prompt_tokens"] == answer.prompt_tokens
        assert teacher.attempts["doc"] == 1
        variants = [(_config(teacher.url, model="other"), _prompt("doc")),
                    (_config(teacher.url, temperature=0.7), _prompt("doc")),
                    (_config(teacher.url), _prompt("doc", "Judge:\n<code>\n{text}\n</code>")),
                    (_config(teacher.url), _prompt("doc2"))]
        for config, prompt in variants:
            with TeacherClient(config, path) as client:
                assert not client.ask([prompt])[0].cached
    assert teacher.attempts["doc"] == 4 and len(TeacherCache(path)) == 5


def test_a_refusal_is_recorded_not_retried_nor_cached(tmp_path):
    teacher = FakeTeacher(score_of=lambda d: 3, faults=lambda d, a: "400" if d == "long" else None)
    with teacher, TeacherClient(_config(teacher.url), tmp_path / "c.sqlite") as client:
        refused, fine = client.ask([_prompt("long"), _prompt("short")])
        assert refused.text is None and "HTTP 400" in refused.error and "fake 400" in refused.error
        assert fine.error is None and teacher.attempts["long"] == 1
        assert len(client.cache) == 1


def test_wrong_url_or_model_is_bad_input_naming_the_url(tmp_path):
    teacher = FakeTeacher(score_of=lambda d: 3, faults=lambda d, a: "404")
    with teacher, TeacherClient(_config(teacher.url), None) as client:
        with pytest.raises(InputError, match=r"answered HTTP 404 .*--teacher-model='fake'") as e:
            client.ask([_prompt("x")])
        assert teacher.url + "/chat/completions" in str(e.value)


def test_retries_run_out_with_a_run_error_naming_the_url_and_the_cache(tmp_path):
    teacher = FakeTeacher(score_of=lambda d: 3, faults=lambda d, a: "shape" if d == "x" else None)
    with teacher, TeacherClient(_config(teacher.url, concurrency=1), tmp_path / "c.sqlite") as client:
        with pytest.raises(RunError, match=r"after 4 attempts \(last: a body that is not an OpenAI chat "
                                           r"completion .*1 answers received so far are cached"):
            client.ask([_prompt("ok"), _prompt("x")])
    with TeacherClient(_config("http://127.0.0.1:9/v1", max_retries=1), None) as client:
        start = time.monotonic()
        with pytest.raises(RunError, match=r"teacher at http://127.0.0.1:9/v1/chat/completions .*cannot reach"):
            client.ask([_prompt("x")])
        assert time.monotonic() - start < 5


@pytest.mark.parametrize("url, endpoint", [
    ("http://h:1/v1", "http://h:1/v1/chat/completions"), ("http://h:1", "http://h:1/v1/chat/completions"),
    ("http://h:1/v1/chat/completions/", "http://h:1/v1/chat/completions")])
def test_endpoint_from_base_url(url, endpoint):
    assert TeacherConfig(url=url, model="m").endpoint == endpoint


def test_config_errors_are_one_line():
    with pytest.raises(InputError, match="http"):
        TeacherConfig(url="localhost:8000", model="m")
    with pytest.raises(InputError, match="teacher-model"):
        TeacherConfig(url="http://h/v1", model="")


def test_a_corrupt_cache_file_is_bad_input(tmp_path):
    path = tmp_path / "c.sqlite"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(InputError, match="not a usable sqlite database .*move it away"):
        TeacherCache(path)
