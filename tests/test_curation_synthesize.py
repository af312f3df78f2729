"""`phi-jax data synthesize`: the plan, executed exercises, kill-and-resume, gates and the report.

References: the fake teacher's log (what it was asked, how often) and the answer it was told to
give for each topic; the exercise a test wrote by hand for the prompt/solution split; counts made
here with plain Python over the kept texts for the report's numbers; the host filesystem and the
fake teacher's own log for "nothing escaped the sandbox".
"""

import collections
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fake_teacher import FakeTeacher, kill_when_hung
from phi_jax import cli
from phi_jax.curation.synthesis.plan import Topic, load_steering, load_template, load_topics, make_plan
from phi_jax.curation.synthesis.run import request_seed
from phi_jax.data import records
from phi_jax.evals import humaneval
from phi_jax.data.documents import DocumentTokenizer, RecordFormat
from phi_jax.tokenizer import train_bpe

ROOT = Path(__file__).resolve().parents[1]
_TOPIC = re.compile(r"T-([a-z_]+)-(\d+)")


def _main(argv, capsys):
    rc = cli.main(argv)
    return rc, capsys.readouterr()


def _topics(path: Path, kinds) -> str:
    path.write_text("".join(f"T-{kind}-{i}\n" for i, kind in enumerate(kinds)))
    return str(path)


def _plan(kind="textbook", count=40, seed=0, topics=None, **mix):
    topics = topics or tuple(Topic(f"topic {i}", "user" if i % 3 else "other", f"t{i}") for i in range(7))
    return make_plan(kind, count=count, seed=seed, topics=topics, topic_source="test",
                     steering=load_steering(kind), template=load_template(kind), **mix)


# ------------------------------------------------------------------------------------------ plan

def test_the_same_seed_gives_the_same_prompts_and_a_larger_count_extends_them():
    def prompts(plan):
        return [(r["id"], r["text"], r["meta"]) for shard in plan.plan_shards(7) for r in shard.read()]

    first, again = _plan(), _plan()  # two plans built from scratch
    assert prompts(first) == prompts(again) and first.sha256 == again.sha256
    assert [r[0] for r in prompts(first)] == [f"textbook-s0-{i:06d}" for i in range(40)]
    assert prompts(_plan(count=90))[:40] == prompts(first)  # prefix-stable: cached answers reused
    other = _plan(seed=1)
    assert [r[1] for r in prompts(other)] != [r[1] for r in prompts(first)]
    assert other.sha256 != first.sha256
    shards = first.plan_shards(7)
    assert [s.size for s in shards] == [7] * 5 + [5] and shards[-1].name == "part-00005"


def test_every_prefix_of_the_plan_tracks_the_target_mix():
    plan = _plan(count=120, audiences="young_children:2,researchers:1", styles="blog_post:1,wikihow:3",
                 topic_mix="user:1,other:1")
    targets = plan.targets()
    assert targets["audience"] == {"young_children": 2 / 3, "researchers": 1 / 3}
    seen = {axis: collections.Counter() for axis in targets}
    for n, item in enumerate(plan.items(), 1):
        seen["audience"][item.audience] += 1
        seen["style"][item.style] += 1
        seen["topic_kind"][item.topic.kind] += 1
        for axis, shares in targets.items():
            for name, share in shares.items():
                assert abs(seen[axis][name] - share * n) <= 1.0, (axis, name, n)
    # Topics of a kind are each used once before any is used again.
    other = [i.topic.name for i in plan.items() if i.topic.kind == "other"]
    assert sorted(other[:3]) == ["t0", "t3", "t6"] and sorted(other[3:6]) == ["t0", "t3", "t6"]


def test_default_topics_are_modules_functions_and_language_headings_of_the_corpus():
    topics = load_topics("default")
    names = {t.kind: set() for t in topics}
    for t in topics:
        names[t.kind].add(t.name)
    assert set(names) == {"module", "function", "language"}
    assert {"json", "textwrap"} <= names["module"] and "textwrap.dedent" in names["function"]
    assert "assert" in names["language"]
    dedent = next(t for t in topics if t.name == "textwrap.dedent")
    assert "textwrap.dedent" in dedent.text and "whitespace" in dedent.text  # the docstring's hint
    assert not any(part.startswith("_") for t in topics if t.kind != "language" for part in t.name.split("."))
    plan = make_plan("exercises", count=30, seed=3, topics=topics, topic_source="default",
                     steering=load_steering("exercises"), template=load_template("exercises"))
    assert collections.Counter(i.topic.kind for i in plan.items()) == {"module": 10, "function": 10, "language": 10}


def test_topic_files(tmp_path):
    (tmp_path / "t.jsonl").write_text('"sorting"\n{"topic": "recursion", "kind": "cs"}\n\n')
    (tmp_path / "t.yaml").write_text("topics:\n  - sorting\n  - {topic: recursion, kind: cs, name: rec}\n")
    (tmp_path / "t.txt").write_text("sorting\n\nrecursion\n")
    assert load_topics(str(tmp_path / "t.jsonl")) == (
        Topic("sorting", "user", "sorting"), Topic("recursion", "cs", "recursion"))
    assert load_topics(str(tmp_path / "t.yaml"))[1] == Topic("recursion", "cs", "rec")
    assert [t.text for t in load_topics(str(tmp_path / "t.txt"))] == ["sorting", "recursion"]


@pytest.mark.parametrize("flags, files, error", [
    (["--topics=missing.jsonl"], {}, "--topics=missing.jsonl: no such file"),
    (["--topics=bad.jsonl"], {"bad.jsonl": '"ok"\n{"topic": \n'}, "bad.jsonl:2: not valid JSON"),
    (["--topics=empty.txt"], {"empty.txt": "\n"}, "holds no topic"),
    (["--template=t.txt"], {"t.txt": "About {topic} for {audience}."}, "no {style} placeholder"),
    (["--audiences=kids"], {}, "--audiences: unknown name 'kids'; choose from young_children"),
    (["--styles=blog_post:0"], {}, "weight '0' of blog_post must be a positive number"),
    (["--steering=s.yaml"], {"s.yaml": "audiences: [a]\n"}, "expected 'textbook: {audiences"),
    (["--count=0"], {}, "--count=0: must be >= 1"),
    (["--teacher=localhost:8000"], {}, "give the http(s) URL of an OpenAI-compatible endpoint"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, monkeypatch, flags, files, error):
    monkeypatch.chdir(tmp_path)
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    argv = ["data", "synthesize", "--kind=textbook", "--output=out", "--teacher=http://127.0.0.1:9/v1",
            "--teacher-model=m", "--no-progress", *flags]
    rc, io = _main(argv, capsys)
    assert rc == 2 and error in io.err and len(io.err.strip().splitlines()) == 1, io.err
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------- exercises

_EXERCISE = '''Here is the exercise.
```python
{imports}def add_{n}(a: int, b: int) -> int:
    """Return a + b + {n}.

    >>> add_{n}(1, 2)
    {n3}
    """
{body}


def check(candidate):
    assert candidate(1, 2) == {n3}
    assert candidate(0, 0) == {n}
    assert candidate(-4, 4) == {n}


check(add_{n})
```
I hope this helps!'''


def _exercise(n: int, body: str = "    return a + b + {n}", imports: str = "") -> str:
    return _EXERCISE.replace("{body}", body).replace("{imports}", imports).replace(
        "{n3}", str(n + 3)).replace("{n}", str(n))


HE0 = humaneval.load_problems()["HumanEval/0"]


def _exercise_teacher(escape: Path):
    """Answers chosen by the topic in the prompt: T-<behaviour>-<n>."""
    state = {}

    def answer(doc: str) -> str:
        behaviour, n = _TOPIC.search(doc).groups()
        n = int(n)
        ok = f"    return a + b + {n}"
        return {
            "correct": _exercise(n),
            "wrong": _exercise(n, "    return a - b"),
            "loop": _exercise(n, "    while True:\n        pass"),
            "unparsable": _exercise(n, "    return (a + b"),
            "no_block": "def add(a, b):\n    return a + b\n",
            "no_check": _exercise(n).split("def check")[0] + "```",
            "no_docstring": f"```python\ndef f(x):\n    return x\n\ndef check(candidate):\n    assert candidate(1) == 1\n```",
            "fork_bomb": _exercise(n, "    while True:\n        os.fork()", "import os\n\n"),
            "write_outside": _exercise(n, f"    open({str(escape)!r}, 'w').write('escaped')\n{ok}"),
            "network": _exercise(n, "    urllib.request.urlopen(URL, data=b'{\"model\": \"m\", \"messages\": "
                                    "[{\"role\": \"user\", \"content\": \"ESCAPED\"}]}', timeout=3)\n" + ok,
                                 f"import urllib.request\nURL = {state.get('url', '') + '/chat/completions'!r}\n\n"),
            "exit_early": _exercise(n, f"    import os\n    os._exit(0)\n{ok}"),
            "exit_at_import": _exercise(n, ok, "import sys\nsys.exit(0)\n\n"),
            "humaneval": f"```python\n{HE0['prompt']}{HE0['canonical_solution']}\n{HE0['test']}\n```",
        }[behaviour]

    return answer, state


EXERCISE_TOPICS = (["correct"] * 4 + ["wrong", "loop", "unparsable", "no_block", "no_check", "no_docstring",
                                      "fork_bomb", "write_outside", "network", "exit_early", "exit_at_import",
                                      "humaneval"])
EXPECTED_DROPS = {"failed": 6, "timeout": 1, "unparsable": 1, "no_code_block": 1, "no_check": 1,
                  "no_documented_function": 1}


def test_only_exercises_that_pass_their_own_check_are_kept_and_nothing_escapes(tmp_path, capsys):
    escape = tmp_path / "escaped.txt"
    answer, state = _exercise_teacher(escape)
    topics, out = _topics(tmp_path / "topics.txt", EXERCISE_TOPICS), tmp_path / "out"
    with FakeTeacher(answer_of=answer) as teacher:
        state["url"] = teacher.url
        rc, io = _main(["data", "synthesize", "--kind=exercises", f"--count={len(EXERCISE_TOPICS)}",
                        f"--topics={topics}", f"--output={out}", f"--teacher={teacher.url}", "--teacher-model=fake",
                        "--exec-timeout=8", "--shard-size=5", "--concurrency=4", "--no-progress"], capsys)
        asked = set(teacher.attempts)
    assert rc == 0, io.err
    assert not escape.exists() and "ESCAPED" not in asked  # no file on the host, no request to the teacher
    manifest = records.read_manifest(out / "generated")
    assert manifest["counts"]["dropped"] == EXPECTED_DROPS
    assert manifest["counts"]["stage"]["executed"] == 12 and manifest["counts"]["stage"]["passed"] == 5
    # HumanEval/0's own solution passes its check, and the gate drops it as benchmark contamination.
    assert records.read_manifest(out / "data")["counts"]["dropped"] == {"contaminated_code": 1}
    kept = list(records.iter_output(out / "data"))
    assert sorted(r["meta"]["topic"] for r in kept) == [f"T-correct-{i}" for i in range(4)]
    for r in kept:
        n, meta = int(r["meta"]["topic"].rsplit("-", 1)[1]), r["meta"]
        assert meta["prompt"] == (f'def add_{n}(a: int, b: int) -> int:\n    """Return a + b + {n}.\n\n'
                                  f'    >>> add_{n}(1, 2)\n    {n + 3}\n    """\n')
        assert meta["solution"] == f"    return a + b + {n}\n"  # no check, no call of it
        assert r["text"] == meta["prompt"] + meta["solution"]
        assert meta["check"].startswith("def check(candidate):\n") and meta["entry_point"] == f"add_{n}"
        assert meta["kind"] == "exercise" and meta["execution"]["status"] == "passed"
        assert meta["teacher"]["model"] == "fake" and meta["teacher"]["completion_tokens"] > 0
    lines = (out / "train.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [
        {"id": r["id"], "prompt": r["meta"]["prompt"], "completion": r["meta"]["solution"]} for r in kept]
    # The training pipeline reads them as instruction pairs: the loss on the solution (and EOS) only.
    tok = train_bpe([r["text"] for r in kept] * 2, vocab_size=300)
    doc = DocumentTokenizer(tok, RecordFormat("json"))({"origin": "train.jsonl:1", "data": lines[0].encode()})
    n_prompt, n_solution = len(tok.encode(kept[0]["meta"]["prompt"])), len(tok.encode(kept[0]["meta"]["solution"]))
    assert doc["token_mask"].tolist() == [0] * n_prompt + [1] * (n_solution + 1)
    report = json.loads((out / "report.json").read_text())
    assert report["counts"]["dropped"] == {**EXPECTED_DROPS, "contaminated_code": 1}
    assert report["counts"]["kept"] == 4
    assert report["execution"]["executed"] == 12 and report["execution"]["passed"] == 5
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "16 in, 5 out" in io.out and "5 of 12 passed their own check" in io.out


@pytest.mark.parametrize("answer, prompt, solution, entry", [
    # helpers before the entry point go into the prompt; a __main__ block is left out
    ("```python\nimport math\n\ndef _sq(x):\n    return x * x\n\ndef hyp(a, b):\n    \"\"\"Hypotenuse.\"\"\"\n"
     "    return math.sqrt(_sq(a) + _sq(b))\n\ndef check(c):\n    assert c(3, 4) == 5\n\n"
     "if __name__ == '__main__':\n    check(hyp)\n```",
     "import math\n\ndef _sq(x):\n    return x * x\n\ndef hyp(a, b):\n    \"\"\"Hypotenuse.\"\"\"\n",
     "    return math.sqrt(_sq(a) + _sq(b))\n", "hyp"),
    # a documented helper called by the entry point is not the entry point; an unlabelled fence
    ("```\ndef total(xs):\n    \"\"\"Sum.\"\"\"\n    return add_all(xs)\n\ndef add_all(xs):\n    \"\"\"Helper.\"\"\"\n"
     "    return sum(xs)\n\ndef check(candidate):\n    assert candidate([1, 2]) == 3\n```",
     "def total(xs):\n    \"\"\"Sum.\"\"\"\n",
     "    return add_all(xs)\n\ndef add_all(xs):\n    \"\"\"Helper.\"\"\"\n    return sum(xs)\n", "total"),
])
def test_an_answer_is_cut_into_prompt_and_solution(answer, prompt, solution, entry):
    from phi_jax.curation.synthesis.exercises import parse_exercise

    ex = parse_exercise(answer)
    assert (ex.prompt, ex.solution, ex.entry_point) == (prompt, solution, entry)
    assert ex.program().endswith(f"check({entry})\n") and "__main__" not in ex.program()


@pytest.mark.parametrize("answer, reason, detail", [
    ("no code here", "no_code_block", "no fenced"),
    ("```python\ndef f(x):\n    \"\"\"D.\"\"\"\n    return (x\n", "unparsable", "not closed"),
    ("```python\ndef f(x):\n    \"\"\"D.\"\"\"\n    return x\ndef check(c):\n    c(1)\n```", "no_check", "assert"),
    ("```python\ndef f(x):\n    \"\"\"D.\"\"\"\ndef check(c):\n    assert c(1)\n```", "no_documented_function",
     "no body"),
])
def test_answers_that_are_not_exercises_say_why(answer, reason, detail):
    from phi_jax.curation.synthesis.exercises import parse_exercise

    got = parse_exercise(answer)
    assert got.reason == reason and detail in got.detail


# --------------------------------------------------------------------------- resume and rerun

def _section(doc: str) -> str:
    found = _TOPIC.search(doc)
    n = int(found.group(2))
    return f"Section on {found.group(0)}.\n\n" + " ".join(f"word{n}x{i}" for i in range(n * 3 + 5))


def _command(topics: str, out: Path, url: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "phi_jax.cli", "data", "synthesize", "--kind=textbook", "--count=16",
            f"--topics={topics}", f"--output={out}", f"--teacher={url}", "--teacher-model=fake",
            "--shard-size=4", "--concurrency=2", "--timeout=5", "--backoff=0.01", "--no-progress", *extra]


def test_a_killed_run_resumes_without_asking_again(tmp_path):
    topics, out = _topics(tmp_path / "topics.txt", ["sec"] * 16), tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}", "JAX_PLATFORMS": "cpu"}
    with FakeTeacher(answer_of=_section) as teacher:
        teacher.hang_after(6)  # the 3rd answer of the second shard: then every request hangs
        proc = subprocess.Popen(_command(topics, out, teacher.url), env=env, cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, start_new_session=True)
        kill_when_hung(teacher, proc, threads=2)
        answered_before = set(teacher.answered)
        assert (out / "generated" / ".shards" / "part-00000.json").is_file()
        assert not (out / "generated" / ".shards" / "part-00001.json").exists()
        teacher.hang_after(None)
        teacher.release()
        restart = time.monotonic()
        done = subprocess.run(_command(topics, out, teacher.url), env=env, cwd=ROOT, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        asked_after = {doc for t, doc, _ in teacher.arrivals if t >= restart}
    assert not asked_after & answered_before
    assert len(teacher.answered) == 16 and set(teacher.answered.values()) == {1}
    got = {r["id"]: r for r in records.iter_output(out / "generated")}
    assert sorted(got) == [f"textbook-s0-{i:06d}" for i in range(16)]
    assert all(r["text"] == _section(r["meta"]["topic"]) + "\n" for r in got.values())
    run = records.read_manifest(out / "generated")["runs"]
    assert (run[0]["shards_processed"], run[0]["shards_resumed"]) == (3, 1)


def test_a_larger_count_is_refused_unless_overwrite_and_then_reuses_the_cached_answers(tmp_path, capsys):
    topics, out = _topics(tmp_path / "topics.txt", ["sec"] * 12), tmp_path / "out"
    with FakeTeacher(answer_of=_section) as teacher:
        argv = _command(topics, out, teacher.url)[3:]
        assert _main(argv[:-1] + ["--count=8", "--no-progress"], capsys)[0] == 0
        rc, io = _main(argv, capsys)
        assert rc == 2 and "count: 8 -> 16" in io.err and "--overwrite" in io.err
        assert _main(argv[:-1] + ["--count=12", "--overwrite", "--no-progress"], capsys)[0] == 0
        assert len(teacher.answered) == 12 and set(teacher.answered.values()) == {1}
    kept = list(records.iter_output(out / "data"))
    assert len(kept) == 12
    # Each request has its own sampling seed, derived from --seed (0) and its index, recorded with it.
    seeds = {r["meta"]["teacher"]["seed"] for r in kept}
    assert len(seeds) == 12 and seeds == set(teacher.seeds.values())
    assert {r["meta"]["teacher"]["seed"] for r in kept if r["meta"]["plan_index"] == 3} == {request_seed(0, 3)}


# --------------------------------------------------------------------------------- gates, report

def _textbook_answer(doc: str) -> str:
    behaviour, n = _TOPIC.search(doc).groups()
    n = int(n)
    if behaviour == "dup":  # the same text for every "dup" topic
        return "A duplicated section about lists and loops, " + " ".join(f"filler{i}" for i in range(30))
    if behaviour == "same_start":
        return "In this section we will learn about Python step by step today. " + f"Unique part {n} " * 3
    if behaviour == "loop":
        return "the cat sat on the mat " * 30
    if behaviour == "near":  # one word of 60 differs
        return "A nearly duplicated section. " + " ".join(f"near{i}" if i != 30 else f"changed{n}" for i in range(60))
    if behaviour == "leak":  # a HumanEval docstring, word for word
        return (f"Section {n} quotes a benchmark: Check if in given list of numbers, are any two numbers closer "
                "to each other than given threshold. That sentence is HumanEval/0's.")
    return f"Section {n}: " + " ".join(f"w{n}_{i}" for i in range(40 + n))


def test_gates_and_the_diversity_report(tmp_path, capsys):
    kinds = ["plain"] * 6 + ["dup"] * 3 + ["same_start"] * 2 + ["loop"] + ["near"] * 2 + ["leak"]
    topics, out = _topics(tmp_path / "topics.txt", kinds), tmp_path / "out"
    with FakeTeacher(answer_of=_textbook_answer) as teacher:
        rc, io = _main(["data", "synthesize", "--kind=textbook", f"--count={len(kinds)}", f"--topics={topics}",
                        f"--output={out}", f"--teacher={teacher.url}", "--teacher-model=fake", "--no-progress",
                        "--drop-flagged=low_distinct_2", "--audiences=young_children,researchers:3"], capsys)
    assert rc == 0, io.err
    gated = records.read_manifest(out / "data")["counts"]
    dropped = {"exact_duplicate": 2, "near_duplicate": 1, "contaminated_ngram": 1, "low_distinct_2": 1}
    assert gated["dropped"] == dropped
    assert gated["stage"]["flagged_repeated_opening"] == 3 + 2 + 2  # before dedup: the copies, same starts, near
    kept = list(records.iter_output(out / "data"))
    assert len(kept) == 15 - 5
    near = sorted((r["meta"]["plan_index"], r["meta"]["topic"]) for r in records.iter_output(out / "generated")
                  if r["meta"]["topic"].startswith("T-near"))
    assert [r["meta"]["topic"] for r in kept if r["meta"]["topic"].startswith("T-near")] == [near[0][1]]
    flags = {r["meta"]["topic"]: r["meta"]["flags"] for r in kept}
    assert flags["T-same_start-9"] == ["repeated_opening"] and flags["T-plain-0"] == []

    report = json.loads((out / "report.json").read_text())
    words = [re.findall(r"\w+", r["text"].lower()) for r in kept]
    for n in (1, 2, 3):
        grams = [tuple(w[i:i + n]) for w in words for i in range(len(w) - n + 1)]
        assert report["distinct"][f"distinct_{n}"] == round(len(set(grams)) / len(grams), 4)
    openings = collections.Counter(tuple(w[:10]) for w in words)
    assert report["openings"]["share_repeated"] == round(sum(openings[tuple(w[:10])] > 1 for w in words) / 10, 4)
    assert report["counts"] == {"planned": 15, "generated": 15, "kept": 10, "flagged": {
        "repeated_opening": 7, "low_distinct_2": 1}, "dropped": dropped}
    audience = report["coverage"]["audience"]
    assert audience["researchers"]["target"] == 0.75 and audience["researchers"]["planned"] == 11
    assert sum(v["kept"] for v in audience.values()) == 10
    tokens = sorted(len(_textbook_answer(r["meta"]["topic"]).split()) for r in kept)  # the fake's usage
    assert report["tokens_per_record"]["max"] == tokens[-1] and report["tokens_per_record"]["total"] == sum(tokens)
    assert report["embedding"] == {"skipped": "no --embedder given"}
    assert "humaneval" in report["gates"]["decontamination"] and "0.8" in report["gates"]["dedup"]


def test_embedding_spread_is_the_mean_pairwise_cosine_distance():
    import numpy as np

    from phi_jax.curation.synthesis.diversity import embedding_spread

    vectors = {"a": [1.0, 0.0], "b": [0.0, 2.0], "c": [1.0, 1.0], "d": [-3.0, 0.0]}
    got = embedding_spread(list(vectors), lambda texts: np.array([vectors[t] for t in texts]))
    unit = {k: np.array(v) / np.linalg.norm(v) for k, v in vectors.items()}
    pairs = [1 - unit[x] @ unit[y] for i, x in enumerate(vectors) for y in list(vectors)[i + 1:]]
    assert got["mean_pairwise_cosine_distance"] == pytest.approx(np.mean(pairs), abs=1e-5)
    assert got["documents"] == 4 and sum(got["histogram"]["counts"]) == 6


def test_a_run_that_keeps_nothing_still_reports(tmp_path, capsys):
    topics, out = _topics(tmp_path / "topics.txt", ["wrong", "no_block", "unparsable"]), tmp_path / "out"
    answer, state = _exercise_teacher(tmp_path / "unused")
    with FakeTeacher(answer_of=answer) as teacher:
        rc, io = _main(["data", "synthesize", "--kind=exercises", "--count=3", f"--topics={topics}",
                        f"--output={out}", f"--teacher={teacher.url}", "--teacher-model=fake", "--no-progress"], capsys)
    assert rc == 0, io.err
    report = json.loads((out / "report.json").read_text())
    assert report["counts"]["kept"] == 0 and report["counts"]["dropped"] == {
        "failed": 1, "no_code_block": 1, "unparsable": 1}
    assert "only 0 of 3 planned records were kept" in report["warnings"]
    assert not (out / "data").exists() and (out / "train.jsonl").read_text() == ""
    assert "nothing was generated" in io.out
