"""`phi-jax data instruct` through the CLI: prompt erasure, the leak check, strategy selection on a
dev split, a kill -9 mid-run and a restart, a changed strategy file re-asking only its tasks, and
the structured final answer asked for on reference tasks (the request bodies, an endpoint that
refuses the field, constrained and plain answers cached apart).

References: the strategy files as written (read here, not through the library), the fake
teacher's log of the system prompts it was sent and what it answered under each, and the answer
each task's strategy is known to produce.
"""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest


from fake_strategy_teacher import StrategyTeacher
from fake_teacher import kill_when_hung
from phi_jax import cli
from phi_jax.data import records

ROOT = Path(__file__).resolve().parents[1]
STRATEGY_DIR = ROOT / "phi_jax" / "curation" / "prompts" / "strategies"
GENERIC = "You are a helpful assistant."
NAMES = ("step_by_step", "recall_then_generate", "recall_reason_generate", "extract_generate",
         "direct_answer")


def _prompt_of(path: Path) -> str:
    return path.read_text().split("\n---\n", 1)[1].strip()


PROMPTS = {name: _prompt_of(STRATEGY_DIR / f"{name}.txt") for name in NAMES}


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", text.lower())


def _quotes_a_prompt(text: str, n: int = 13) -> bool:
    spans = {tuple(w[i:i + n]) for w in map(_words, PROMPTS.values()) for i in range(len(w) - n + 1)}
    w = _words(text)
    return any(tuple(w[i:i + n]) in spans for i in range(len(w) - n + 1))


# ------------------------------------------------------------------------------------ the tasks
def _tasks() -> list[dict]:
    """arith: 4 dev, 1 heldout, 15 train; lookup: 4 dev, 1 heldout, 7 train; chat: 4 train, no answer."""
    tasks = []
    for i in range(20):
        split = "dev" if i < 4 else "heldout" if i == 4 else "train"
        tasks.append({"id": f"a{i}", "type": "arith", "prompt": f"[a{i}] What is {i} + {i + 3}?",
                      "answer": str(2 * i + 3), "split": split})
    for i in range(12):
        split = "dev" if i < 4 else "heldout" if i == 4 else "train"
        tasks.append({"id": f"l{i}", "type": "lookup", "prompt": f"[l{i}] Which word follows w{i}?",
                      "answer": f"w{i + 1}", "split": split, "source": "test"})
    tasks += [{"id": f"c{i}", "type": "chat", "prompt": f"[c{i}] Say hello."} for i in range(4)]
    return tasks


def _task_id(prompt: str) -> str:
    return prompt[1:prompt.index("]")]


def _right(task_id: str) -> str:
    i = int(task_id[1:])
    return str(2 * i + 3) if task_id[0] == "a" else f"w{i + 1}"


# The strategy each type is answered correctly under (the known answer of the selection).
BEST = {"a": "step_by_step", "l": "extract_generate"}
QUOTE_LONG, QUOTE_SHORT, EMPTY, REFUSED = "a7", "a8", "l9", "a10"
DEV_QUOTE = "a3"  # a dev task whose best-strategy answer quotes the prompt: it scores 0


def _reply(strategy, prompt):
    tid = _task_id(prompt)
    if tid[0] == "c":
        return f"Hello! ({strategy})"
    if tid == EMPTY:
        return "   "
    correct = strategy == BEST[tid[0]] or (strategy == "recall_reason_generate" and int(tid[1:]) % 2 == 0)
    answer = f"Working under {strategy}.\nAnswer: {_right(tid) if correct else 'no idea'}"
    if tid == QUOTE_LONG or (tid == DEV_QUOTE and strategy == "step_by_step"):
        # a 20-word quote, shouted and re-punctuated: still a leak
        quoted = " ".join(_words(PROMPTS[strategy])[:20]).upper().replace(" ", ", ", 3)
        answer = f"My instructions say: {quoted}!\n{answer}"
    elif tid == QUOTE_SHORT:  # 12 words of it: below the 13-word span, kept
        answer = f"As told, {' '.join(PROMPTS[strategy].split()[:12])} ...\n{answer}"
    return answer


def _faults(doc, attempt):
    return "400" if doc.startswith(f"[{REFUSED}]") else None


def _write(path: Path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _map_file(tmp_path: Path) -> str:
    mapping = {"default": "direct_answer",
               "types": {"arith": "step_by_step", "lookup": "recall_then_generate"}}
    return _write(tmp_path / "map.json", [mapping])


def _args(tasks: str, out: Path, url: str, *extra: str) -> list[str]:
    return ["data", "instruct", f"--tasks={tasks}", f"--output={out}", f"--teacher={url}",
            "--teacher-model=fake", "--concurrency=4", "--timeout=5", "--backoff=0.01", "--max-retries=2",
            "--shard-size=10", "--no-progress", *extra]


def _by_id(out: Path) -> dict[str, dict]:
    return {r["id"]: r for r in records.iter_output(out)}


# ------------------------------------------------------------------------------------- the tests
def test_erasure_and_leak_check_with_a_strategy_map(tmp_path, capsys):
    tasks = _tasks()
    path, out = _write(tmp_path / "tasks.jsonl", tasks), tmp_path / "out"
    strategy = {"arith": "step_by_step", "lookup": "recall_then_generate", "chat": "direct_answer"}
    with StrategyTeacher(PROMPTS, _reply, _faults) as teacher:
        assert cli.main(_args(path, out, teacher.url, f"--strategy-map={_map_file(tmp_path)}")) == 0

    train = [t for t in tasks if t.get("split", "train") == "train"]
    # The teacher saw each train task once, under its type's strategy prompt, and nothing else.
    assert sorted(teacher.systems) == sorted(PROMPTS[strategy[t["type"]]] for t in train)
    assert sum(teacher.asked.values()) == len(train) - 1  # the refused one got no answer
    for t in train:
        if t["id"] != REFUSED:
            assert teacher.asked[strategy[t["type"]], t["prompt"]] == 1
    got = _by_id(out)
    dropped = {QUOTE_LONG, EMPTY, REFUSED}
    assert set(got) == {t["id"] for t in train} - dropped
    for t in train:
        if t["id"] in dropped:
            continue
        r, answer = got[t["id"]], _reply(strategy[t["type"]], t["prompt"])
        assert r["meta"]["messages"] == [{"role": "system", "content": GENERIC},
                                         {"role": "user", "content": t["prompt"]},
                                         {"role": "assistant", "content": answer}]
        assert r["text"] == f"{t['prompt']}\n\n{answer}" and not _quotes_a_prompt(r["text"])
        assert (r["meta"]["type"], r["meta"]["strategy"]) == (t["type"], strategy[t["type"]])
        assert r["meta"]["teacher"] == "fake" and r["meta"]["split"] == "train"
        assert r["meta"].get("reference") == t.get("answer")
        if "answer" in t:  # arith is right under step_by_step; lookup wrong under recall_then_generate
            assert r["meta"]["reference_score"] == (1.0 if t["type"] == "arith" else 0.0)
        assert not any(_quotes_a_prompt(m["content"]) for m in r["meta"]["messages"])
    assert got["l5"]["meta"]["source"] == "test"  # the task's other fields travel along
    assert QUOTE_SHORT in got  # 12 quoted words are not a leak
    manifest = records.read_manifest(out)
    counts = manifest["counts"]
    assert counts["dropped"] == {"leaked_strategy_prompt": 1, "empty_answer": 1, "teacher_refused": 1,
                                 "dev_split": 8, "heldout_split": 2}
    assert counts["records_in"] == len(tasks) and counts["records_out"] == len(got)
    assert counts["stage"]["strategy_step_by_step"] == 13 and counts["stage"]["strategy_direct_answer"] == 4
    params = manifest["parameters"]
    assert params["generic_system_message"] == GENERIC and params["select_strategy"] == "map"
    assert params["assignment"]["types"] == strategy and params["strategy_selection"] is None
    assert "leaked_strategy_prompt" in capsys.readouterr().out


def test_dev_selection_picks_the_strategy_the_teacher_answers_best_under(tmp_path, capsys):
    tasks = _tasks()
    path, out = _write(tmp_path / "tasks.jsonl", tasks), tmp_path / "out"
    with StrategyTeacher(PROMPTS, _reply, _faults) as teacher:
        assert cli.main(_args(path, out, teacher.url, "--select-strategy=dev",
                              f"--strategy-map={_map_file(tmp_path)}")) == 0
    selection = records.read_manifest(out)["parameters"]["strategy_selection"]
    assert selection["arith"]["strategy"] == "step_by_step" and selection["arith"]["dev_tasks"] == 4
    assert selection["arith"]["scores"] == {"step_by_step": 0.75, "recall_then_generate": 0.0,
                                            "recall_reason_generate": 0.5, "extract_generate": 0.0,
                                            "direct_answer": 0.0}  # the leaking dev answer scores 0
    assert selection["arith"]["unusable"]["step_by_step"] == 1
    assert selection["lookup"]["strategy"] == "extract_generate"  # not the map's recall_then_generate
    assert selection["lookup"]["scores"]["extract_generate"] == 1.0
    assert selection["chat"] == {"strategy": "direct_answer", "chosen_by": "map (no dev tasks)",
                                 "dev_tasks": 0}
    # Every dev task was asked under every strategy; train tasks under the chosen one only.
    for t in tasks:
        if t.get("split") == "dev":
            assert all(teacher.asked[name, t["prompt"]] == 1 for name in NAMES)
        if t.get("split") == "heldout":
            assert not any(teacher.asked[name, t["prompt"]] for name in NAMES)
    got = _by_id(out)
    lookup = {r["meta"]["strategy"] for r in got.values() if r["meta"]["type"] == "lookup"}
    assert lookup == {"extract_generate"}
    assert all(r["meta"]["reference_score"] == 1.0 for r in got.values() if "reference" in r["meta"])
    detail = json.loads((out / "strategy_selection.json").read_text())
    assert len(detail["answers"]) == 8 * len(NAMES)
    assert "lookup (4 dev): step_by_step 0.00" in capsys.readouterr().out


def _kill_tasks() -> list[dict]:
    return [{"id": f"a{i}", "type": "arith", "prompt": f"[a{i}] What is {i} + {i + 3}?",
             "answer": str(2 * i + 3), "split": "dev" if i < 2 else "train"} for i in range(42)]


def test_a_kill_mid_run_then_restart_pays_for_no_answer_twice(tmp_path):
    path, out = _write(tmp_path / "tasks.jsonl", _kill_tasks()), tmp_path / "out"
    command = [sys.executable, "-m", "phi_jax.cli", *_args(path, out, "URL", "--select-strategy=dev")]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    dev_asks = 2 * len(NAMES)

    def plain(strategy, prompt):
        return f"Answer: {_right(_task_id(prompt)) if strategy == 'step_by_step' else 0}"

    with StrategyTeacher(PROMPTS, plain) as teacher:
        command = [c.replace("URL", teacher.url) for c in command]
        teacher.hang_after(dev_asks + 13)  # the 5th answer of the second shard (8 train tasks in the first)
        proc = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True)
        kill_when_hung(teacher, proc, threads=4)  # every client thread waits on the teacher
        before = set(teacher.asked)
        in_second_shard = sum(teacher.answered.values()) - dev_asks - 8
        assert 5 <= in_second_shard < 10  # requests decided before the hang may still answer
        assert (out / ".shards" / "part-00000.json").is_file()
        assert not (out / ".shards" / "part-00001.json").exists()
        teacher.hang_after(None)
        teacher.release()
        restart = time.monotonic()
        done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        asked_after = {doc for t, doc, _ in teacher.arrivals if t >= restart}
    assert not asked_after & {doc for _, doc in before}  # nothing answered before the kill asked again
    assert all(n == 1 for n in teacher.asked.values())
    assert len(teacher.asked) == dev_asks + 40
    assert sorted(_by_id(out)) == sorted(f"a{i}" for i in range(2, 42))
    manifest = records.read_manifest(out)
    assert manifest["status"] == "complete" and manifest["counts"]["records_out"] == 40
    (run,) = manifest["runs"]
    assert (run["shards_processed"], run["shards_resumed"]) == (4, 1)
    assert manifest["counts"]["stage"]["teacher_cache_hits"] == in_second_shard  # paid before the kill
    assert manifest["strategy_selection"]["teacher_cache_hits"] == dev_asks  # selection: all cached
    assert manifest["parameters"]["strategy_selection"]["arith"]["strategy"] == "step_by_step"


def test_a_changed_strategy_file_re_asks_only_the_tasks_it_answers(tmp_path, capsys):
    tasks = [t for t in _tasks() if t["id"] not in (QUOTE_LONG, REFUSED)]
    path, out, mine = _write(tmp_path / "tasks.jsonl", tasks), tmp_path / "out", tmp_path / "mine"
    args = [f"--strategy-map={_map_file(tmp_path)}"]
    with StrategyTeacher(PROMPTS, _reply) as teacher:
        assert cli.main(_args(path, out, teacher.url, *args)) == 0
        first = sum(teacher.asked.values())
        mine.mkdir()
        edited = PROMPTS["recall_then_generate"] + " Keep the list of facts to five items at most."
        (mine / "edited.txt").write_text("name: recall_then_generate\ndescription: shorter recall\n---\n"
                                         + edited)
        teacher.prompts["recall_then_generate"] = edited
        teacher._names[edited] = "recall_then_generate"
        # Other strategies: resuming into the same output is refused, naming what differs ...
        assert cli.main(_args(path, out, teacher.url, *args, f"--strategies={mine}")) == 2
        assert "strategies" in capsys.readouterr().err and sum(teacher.asked.values()) == first
        assert cli.main(_args(path, out, teacher.url, *args, f"--strategies={mine}", "--overwrite")) == 0
    asked_again = sum(teacher.asked.values()) - first
    lookup_train = [t for t in tasks if t["type"] == "lookup" and t.get("split") == "train"]
    assert asked_again == len(lookup_train)  # ... and with --overwrite only recall_then_generate's tasks
    assert teacher.systems[-len(lookup_train):] == [edited] * len(lookup_train)
    manifest = records.read_manifest(out)
    assert manifest["parameters"]["strategies"]["recall_then_generate"] != \
        manifest["parameters"]["strategies"]["step_by_step"]
    train = [t for t in tasks if t.get("split", "train") == "train"]
    assert manifest["counts"]["stage"]["teacher_cache_hits"] == len(train) - len(lookup_train)



# --------------------------------------------------------------- structured final answers
# The constraints a reference task is asked with, written out here (not built by the library).
FREE_REGEX = r"(?:[^\n]*\n)*Answer: [^\s" + "\x1c-\x1f" + r"][^\n]*"
MC_REGEX = {3: r"(?:[^\n]*\n)*Answer: [ABC]", 4: r"(?:[^\n]*\n)*Answer: [ABCD]"}


def _structured_tasks() -> list[dict]:
    """arith (free answers) and mc3 / mc4 (choice tasks): 2 dev + 3 train each; chat: 3 free tasks."""
    tasks = []
    for i in range(5):
        split = "dev" if i < 2 else "train"
        tasks.append({"id": f"a{i}", "type": "arith", "prompt": f"[a{i}] What is {i} + {i + 3}?",
                      "answer": str(2 * i + 3), "split": split})
        for n in (3, 4):
            tasks.append({"id": f"m{n}{i}", "type": f"mc{n}", "prompt": f"[m{n}{i}] Pick one.",
                          "choices": [f"option {k}" for k in range(n)], "answer": "ABCD"[i % n],
                          "split": split})
    return tasks + [{"id": f"c{i}", "type": "chat", "prompt": f"[c{i}] Say hello."} for i in range(3)]


def _structured_reply(strategy, prompt):
    """Right under step_by_step, wrong (but well formed) under the others."""
    tid = _task_id(prompt)
    if tid[0] == "c":
        return "Hello!"
    right = strategy == "step_by_step"
    if tid[0] == "a":
        return f"1. add them\nAnswer: {_right(tid) if right else -1}"
    n, i = int(tid[1]), int(tid[2:])
    return f"Option {'ABCD'[i % n]} fits.\nAnswer: {'ABCD'[(i + (not right)) % n]}"


def test_reference_tasks_are_asked_for_a_final_answer_line_free_tasks_are_not(tmp_path):
    """The request bodies the teacher receives, in dev selection and in the stage: the regex of the
    task's kind for every task with a reference, none for a task without one."""
    tasks = _structured_tasks()
    path, out = _write(tmp_path / "tasks.jsonl", tasks), tmp_path / "out"
    with StrategyTeacher(PROMPTS, _structured_reply) as teacher:
        assert cli.main(_args(path, out, teacher.url, "--select-strategy=dev")) == 0
    by_task: dict[str, list[dict]] = {}
    for body in teacher.bodies:
        user = [m["content"] for m in body["messages"] if m["role"] == "user"][-1]
        by_task.setdefault(_task_id(user), []).append(body)
    assert set(by_task) == {t["id"] for t in tasks}
    for t in tasks:
        bodies = by_task[t["id"]]
        assert len(bodies) == (len(NAMES) if t.get("split") == "dev" else 1)  # selection, then the stage
        if "answer" not in t:
            assert not any("structured_outputs" in b for b in bodies)
            continue
        regex = MC_REGEX[len(t["choices"])] if "choices" in t else FREE_REGEX
        assert all(b["structured_outputs"] == {"regex": regex} for b in bodies)
        for strategy in NAMES:  # what the teacher answered fits what it was asked for
            assert re.fullmatch(regex, _structured_reply(strategy, t["prompt"]))
    manifest = records.read_manifest(out)
    selection = manifest["parameters"]["strategy_selection"]
    assert {selection[k]["strategy"] for k in ("arith", "mc3", "mc4")} == {"step_by_step"}
    assert selection["mc4"]["scores"]["step_by_step"] == 1.0 and selection["mc4"]["scores"]["direct_answer"] == 0.0
    got = _by_id(out)
    assert len(got) == 9 + 3 and all(r["meta"]["reference_score"] == 1.0 for r in got.values()
                                     if "reference" in r["meta"])


def test_an_endpoint_without_structured_outputs_is_asked_plainly_and_answers_are_not_mixed(tmp_path, caplog):
    """A teacher that answers 400 to `structured_outputs`: every task is answered plainly, one
    warning, nothing lost. The plain answers are cached under their own key: a later run against
    an endpoint that takes the field asks every reference task again (constrained), and only the
    free tasks come from the cache."""
    tasks = [t for t in _structured_tasks() if t.get("split") != "dev"]
    path, out = _write(tmp_path / "tasks.jsonl", tasks), tmp_path / "out"
    args = [f"--strategy-map={_write(tmp_path / 'map.json', [{'default': 'step_by_step'}])}",
            f"--teacher-cache={tmp_path / 'cache.sqlite'}"]
    with StrategyTeacher(PROMPTS, _structured_reply, refuse_fields=("structured_outputs",)) as teacher, \
            caplog.at_level("WARNING"):
        assert cli.main(_args(path, out, teacher.url, *args)) == 0
    warnings = [r.getMessage() for r in caplog.records if "structured_outputs" in r.getMessage()]
    assert len(warnings) == 1 and "asking without" in warnings[0]
    assert all(n == 1 for n in teacher.asked.values()) and len(teacher.asked) == len(tasks)
    # only the first requests (one per client thread) carried the field; none after the 400
    assert 1 <= sum("structured_outputs" in b for b in teacher.bodies) <= 4
    got = _by_id(out)
    assert set(got) == {t["id"] for t in tasks}
    assert all(r["meta"]["reference_score"] == 1.0 for r in got.values() if "reference" in r["meta"])
    assert not records.read_manifest(out)["counts"].get("dropped")

    with StrategyTeacher(PROMPTS, _structured_reply) as takes_it:
        assert cli.main(_args(path, tmp_path / "again", takes_it.url, *args)) == 0
    reference = [t for t in tasks if "answer" in t]
    assert len(takes_it.bodies) == len(reference)  # constrained: not the cached plain answers
    assert all("structured_outputs" in b for b in takes_it.bodies)
    counts = records.read_manifest(tmp_path / "again")["counts"]["stage"]
    assert counts["teacher_cache_hits"] == len(tasks) - len(reference)  # the free tasks' answers

# ------------------------------------------------------------------------- strategies, leak check
def test_the_built_in_strategies_and_map():
    from phi_jax.curation.instruct.corpus_tasks import TASK_TYPES
    from phi_jax.curation.instruct.strategies import load_strategies, load_strategy_map

    strategies = load_strategies()
    assert tuple(strategies) == NAMES
    assert all(s.prompt == PROMPTS[s.name] and s.description for s in strategies.values())
    mapping = load_strategy_map("default", strategies)
    assert set(mapping.types) == set(TASK_TYPES) and mapping.strategy_of("unknown") == mapping.default


def test_the_leak_check_finds_13_word_runs_whatever_the_case_and_punctuation():
    from phi_jax.curation.instruct.strategies import LeakCheck

    prompt = PROMPTS["extract_generate"]
    check, w = LeakCheck(PROMPTS.values()), _words(prompt)
    assert check.leaks("Sure. " + " ".join(w[5:18]).upper() + " -- done")
    assert check.leaks(", ".join(w[30:43]))
    assert not check.leaks(" ".join(w[5:17]))  # 12 words
    assert not check.leaks(" ".join(w[5:17] + ["banana"] + w[18:30]))  # 12 + 12, broken by one word
    assert not check.leaks("Answer: 3")


def test_strategy_files_and_maps_are_checked(tmp_path):
    from phi_jax.curation.instruct.strategies import load_strategies, load_strategy_map, parse_strategy
    from phi_jax.errors import InputError

    long = "Explain every step of the argument with care before you give the final result to the user."
    for text, error in (("name: x\ndescription: d\n" + long, "no '---' line"),
                        ("name: Bad Name\ndescription: d\n---\n" + long, "must be lower-case"),
                        ("name: x\ndescription: d\n---\ntoo short", "fewer than 13 words"),
                        ("name: x\ncolour: red\n---\n" + long, "is not 'name: ...'")):
        with pytest.raises(InputError, match=error):
            parse_strategy(text, "my.txt")
    (tmp_path / "mine.txt").write_text(f"name: explain\ndescription: explain it\n---\n{long}\n")
    strategies = load_strategies(str(tmp_path))
    assert strategies["explain"].prompt == long and len(strategies) == len(NAMES) + 1
    (tmp_path / "map.json").write_text(json.dumps({"default": "explain", "types": {"t": "nope"}}))
    with pytest.raises(InputError, match="t -> 'nope' is not a strategy"):
        load_strategy_map(str(tmp_path / "map.json"), strategies)
