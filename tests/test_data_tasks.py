"""The task format, its splits, and the scorers shared by strategy selection and evaluation.

References: hand-written answers with their known verdicts, a split recomputed here from sha256,
and a user scorer file written by the test.
"""

import hashlib
import json

import pytest

from phi_jax.data.answers import (checked_score, choice_accuracy, exact_match, extract_choice, load_scorer,
                                  normalize)
from phi_jax.data.tasks import (GENERIC_SYSTEM_MESSAGE, Task, example_messages, read_tasks, select_split,
                                split_of, task_from_json, task_split)
from phi_jax.errors import InputError


def _task(answer, choices=None):
    return Task("t", "x", "prompt", answer, tuple(choices) if choices else None)


@pytest.mark.parametrize("answer, reference, hit", [
    ("Let me think.\n2 + 1 = 3\nAnswer: 3", "3", True),
    ("The answer is `dedent`.", "dedent", True),
    ("dedent", "dedent", True),
    ("**Answer:** [1, 2]", "[1,2]", True),
    ("Answer: abc", "'abc'", True),
    ("Answer: “abc”", "'abc'", True),
    ("Answer: 4\nOn reflection:\nAnswer: 3", "3", True),
    ("Answer: 4.", "4", True),
    ("```\nFalse\n```", "False", True),
    ("Answer: -1", "1", False),
    ("Answer: (1, 2)", "[1, 2]", False),
    ("It could be 3 or 4", "3", False),
    ("Answer: 34", "3", False),
])
def test_exact_match_compares_what_the_answer_concludes(answer, reference, hit):
    assert exact_match(answer, _task(reference)) == float(hit)


OPTIONS = ("dedent", "indent", "fill", "wrap")


@pytest.mark.parametrize("answer, letter", [
    ("Answer: B", "B"),
    ("(C) fits: the others do not.", "C"),
    ("Ruling out A and D, the answer is C.", "C"),
    ("A function that indents.\nAnswer: D", "D"),
    ("**Answer:** (A)", "A"),
    ("I would pick option B here, since it indents.", "B"),
    ("Answer: indent", "B"),  # the option's text
    ("A. dedent\nB. indent\nC. fill\nD. wrap", None),  # the options echoed: no choice
    ("A. dedent\nB. indent\nC. fill\nD. wrap\n\nThe answer is D. wrap.", "D"),
    ("A list of lines.", None),  # the article is not an option
    ("Answer: E", None),  # not among four options
    ("no idea", None),
])
def test_choice_extraction_from_free_text(answer, letter):
    assert extract_choice(answer, OPTIONS) == letter
    assert choice_accuracy(answer, _task(letter or "A", OPTIONS)) == float(letter is not None)



def test_the_final_answer_constraint_is_what_the_scorer_reads():
    """Every answer `final_answer_regex` accepts concludes where the scorer looks (`_after_marker`):
    checked with Python's `re` over answers built from tricky reasoning and final lines (markers
    inside them, a marker ending the answer, whitespace Python strips but Unicode does not count)."""
    import random
    import re

    from phi_jax.data.answers import _after_marker, final_answer_regex

    free, mc3 = final_answer_regex(_task("3")), final_answer_regex(_task("B", OPTIONS[:3]))
    assert free == r"(?:[^\n]*\n)*Answer: [^\s" + "\x1c-\x1f" + r"][^\n]*"
    assert mc3 == r"(?:[^\n]*\n)*Answer: [ABC]"
    letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    assert final_answer_regex(_task("Z", [str(i) for i in range(26)])).endswith(f"Answer: [{letters}]")
    assert final_answer_regex(_task(None)) is None  # nothing to score: the answer stays free
    reasoning = ["", "  ", "Step 1: add.", "Answer: 4", "the answer is", "final answer =", "x\x1cy",
                 "A. dedent", "B. indent", "my answer is:"]
    finals = ["3", "3.", "[1, 2]", "the answer is 3", "my answer is:", "x = answer:", "3 \x1c", "Answer: 3",
              "answer is", "(3)"]
    rng = random.Random(0)
    for _ in range(400):
        lines = rng.sample(reasoning, rng.randint(0, 4))
        head = "".join(line + "\n" for line in lines) + "Answer: "
        final = rng.choice(finals)
        answer = head + final
        assert re.fullmatch(free, answer)
        after = _after_marker(answer)
        assert after and final.strip().endswith(after)  # the final line, or what its own marker heads
        if "answer" not in final.lower():
            assert after == final.strip() and exact_match(answer, _task(final)) == 1.0
        letter = rng.choice("ABC")
        assert re.fullmatch(mc3, head + letter)
        assert _after_marker(head + letter) == letter == extract_choice(head + letter, OPTIONS[:3])
        assert choice_accuracy(head + letter, _task("B", OPTIONS[:3])) == float(letter == "B")
    for rejected in ("Answer: ", "Answer: \x1c", "Answer:  3", "Answer: 3\n", "The answer is 3", "3"):
        assert not re.fullmatch(free, rejected)
    for rejected in ("Answer: D", "Answer: b", "Answer: (B)", "Answer: B\n", "B"):
        assert not re.fullmatch(mc3, rejected)


def test_normalize_keeps_what_changes_a_value():
    assert normalize("  [1,   2] ") == normalize("[1, 2]") == "[1,2]"
    assert normalize("-1") != normalize("1") and normalize("'1'") == "1"


def test_user_scorers_load_from_a_file_or_module_and_are_held_to_0_1(tmp_path):
    (tmp_path / "my_scorers.py").write_text(
        "def exact_number(answer, task):\n    return answer.split()[-1] == task.answer\n"
        "def broken(answer, task):\n    return 7\n")
    task = _task("3")
    fn = load_scorer(f"{tmp_path}/my_scorers.py:exact_number")
    assert checked_score(fn, "so it is 3", task) == 1.0 and checked_score(fn, "3 or 4", task) == 0.0
    with pytest.raises(InputError, match="returned 7 for task 't'"):
        checked_score(load_scorer(f"{tmp_path}/my_scorers.py:broken"), "x", task)
    assert load_scorer("phi_jax.data.answers:exact_match") is exact_match
    for spec, error in (("nonsense", "give auto, exact, choice"), ("no_such_module_xyz:f", "cannot import"),
                        (f"{tmp_path}/my_scorers.py:missing", "has no function 'missing'"),
                        (f"{tmp_path}/none.py:f", "no such file")):
        with pytest.raises(InputError, match=error):
            load_scorer(spec)


def test_splits_come_from_a_hash_of_the_id():
    def reference(task_id, dev=0.1, heldout=0.1):
        u = int.from_bytes(hashlib.sha256(task_id.encode()).digest()[:8], "big") / 2 ** 64
        return "heldout" if u < heldout else "dev" if u < heldout + dev else "train"

    ids = [f"task-{i}" for i in range(2000)]
    assert [split_of(i) for i in ids] == [reference(i) for i in ids]
    assert [split_of(i, dev_fraction=0.3) for i in ids] == [reference(i, dev=0.3) for i in ids]
    heldout = {i for i in ids if split_of(i) == "heldout"}
    assert heldout == {i for i in ids if split_of(i, dev_fraction=0.5) == "heldout"}  # never moves
    assert 150 < len(heldout) < 250
    assert task_split(Task("task-1", "x", "p")) == "train"  # no answer: always train
    assert task_split(Task("task-1", "x", "p", "a", split="dev")) == "dev"  # the file's own split wins
    tasks = [Task(i, "x", "p", "a") for i in ids]
    assert {t.id for t in select_split(tasks, "heldout")} == heldout
    with pytest.raises(InputError, match="each must be in"):
        split_of("x", dev_fraction=0.6, heldout_fraction=0.5)


def test_task_files_keep_their_fields_and_bad_tasks_name_the_line(tmp_path):
    rows = [{"id": "a", "type": "t", "prompt": "p?", "answer": "B", "choices": ["x", "y"], "source": "s"},
            {"id": "b", "type": "t", "prompt": "q?"}]
    path = tmp_path / "tasks.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    a, b = read_tasks(str(path))
    assert (a.id, a.type, a.prompt, a.answer, a.choices) == ("a", "t", "p?", "B", ("x", "y"))
    assert a.meta == {"source": "s"}
    assert a.to_json() == rows[0] and b.to_json() == rows[1]
    for bad, error in (({"id": "c", "prompt": "p"}, "'type' must be a non-empty string"),
                       ({"id": "c", "type": "t", "prompt": "p", "answer": "Z", "choices": ["x", "y"]},
                        "is a letter A-B"),
                       ({"id": "c", "type": "t", "prompt": "p", "split": "heldout"}, "needs an 'answer'"),
                       ({"id": "c", "type": "t", "prompt": "p", "answer": "1", "split": "test"},
                        "must be one of train, dev, heldout")):
        with pytest.raises(InputError, match=error):
            task_from_json(bad, "tasks.jsonl:3")
    (tmp_path / "bad.jsonl").write_text(json.dumps({"id": "x", "type": "t"}) + "\n")
    with pytest.raises(InputError, match="bad.jsonl:1 .*no string field 'prompt'"):
        list(read_tasks(str(tmp_path / "bad.jsonl")))


def test_example_messages_checks_the_conversation():
    messages = [{"role": "system", "content": GENERIC_SYSTEM_MESSAGE}, {"role": "user", "content": "q"},
                {"role": "assistant", "content": "a"}]
    assert example_messages({"id": "e", "meta": {"messages": messages}}) == messages
    with pytest.raises(InputError, match="roles"):
        example_messages({"id": "e", "meta": {"messages": messages[::-1]}})
    with pytest.raises(InputError, match="no meta.messages"):
        example_messages({"id": "e", "meta": {}})
