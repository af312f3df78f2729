r"""Score a free-text answer against a task's reference: exact match, choice accuracy, or yours.

    scorer = load_scorer("auto")           # choice accuracy for tasks with choices, else exact match
    scorer("...so it returns 3.\nAnswer: 3", task)      # -> 1.0 when task.answer == "3"

A scorer is `fn(answer: str, task: Task) -> float` in [0, 1]. The same scorers choose Orca-2
strategies on the dev split (`phi-jax data instruct --select-strategy=dev`) and score models on the
held-out split (`phi_jax.evals.tasks`), so a strategy is chosen by the measure it is judged by.

Answers are free text (a teacher thinking step by step, a chat model being chatty), so the
reference is compared with what the answer *concludes*: the text after its last "Answer:" /
"the answer is" marker that has text after it, else its last non-empty line, else the whole answer
(any one matching is a hit). A teacher asked for an answer to score can be held to end that way:
`final_answer_regex` is the structured-output constraint whose every match this reads.
Normalisation (`normalize`): Unicode NFKC, lower case, markdown emphasis and code fences removed,
one pair of surrounding quotes or backticks and a final full stop dropped, whitespace collapsed
and removed next to brackets and separators, so `[1, 2]` == `[1,2]` and `'abc'` ==
`abc`, but `-1` != `1` and `(1, 2)` != `[1, 2]` (the values of code differ there).
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import unicodedata
from pathlib import Path
from typing import Any, Callable

from phi_jax.data.tasks import LETTERS, Task
from phi_jax.errors import InputError, MissingFileError

Scorer = Callable[[str, Task], float]
BUILTIN_SCORERS = ("auto", "exact", "choice")

_MARKER = re.compile(r"(?:final answer|answer)\s*(?:is)?\s*[:=]|the answer is\b|answer is\b", re.I)
_EMPHASIS = re.compile(r"\*\*|__|^#+\s*|^>\s*", re.M)
_FENCE = re.compile(r"^```[\w-]*\s*$", re.M)
_TIGHT = re.compile(r"\s*([,:;()\[\]{}])\s*")
_QUOTES = ("''", '""', "``")
_LETTER_ALONE = re.compile(r"^(?:\(([A-Z])\)|([A-Z])(?:[.):](?:\s|$)|$))")
_OPTION_LINE = re.compile(r"^\s*\(?([A-Z])[.)]\s", re.M)
_LETTER_MENTION = re.compile(r"\b(?i:answer|option|choice)\s*(?i:is)?\s*:?\s*\(?([A-Z])\b")


def normalize(text: str) -> str:
    """The comparable form of an answer (see the module docstring)."""
    text = unicodedata.normalize("NFKC", text)
    text = _FENCE.sub("", _EMPHASIS.sub("", text)).strip().lower()
    text = text.replace("\u2019", "'").replace("\u2018", "'").replace("\u201c", '"').replace("\u201d", '"')
    text = re.sub(r"\s+", " ", text).strip()
    text = text[:-1].rstrip() if text.endswith(".") and len(text) > 1 else text
    if len(text) >= 2 and text[0] + text[-1] in _QUOTES:
        text = text[1:-1].strip()
    return _TIGHT.sub(r"\1", text)


def _after_marker(answer: str) -> str | None:
    """The line after the last "Answer:" / "the answer is" marker with text after it, if any.

    A marker that ends the answer ("Answer: my answer is:") concludes nothing, so the one before it
    is read: every answer `final_answer_regex` accepts concludes here, never in a fallback.
    """
    for marker in reversed(list(_MARKER.finditer(answer))):
        rest = answer[marker.end():].strip()
        if rest:
            return rest.splitlines()[0].strip()
    return None


FINAL_ANSWER = "Answer: "
# The first character of a final answer: not whitespace, as `str.strip` counts it (Python's
# whitespace adds \x1c-\x1f to Unicode's), so what follows the marker is never empty. Those four
# are written as the characters themselves, not \x escapes, which not every regex engine takes.
_ANSWER_START = "[^\\s\x1c-\x1f]"


def final_answer_regex(task: Task) -> str | None:
    """The structured-output regex a teacher's answer to `task` is held to, or None (no reference).

    Why: an answer to be scored (strategy selection on the dev split, `reference_score` on train
    tasks) is lost when it concludes in a form `_after_marker` cannot read; a teacher constrained
    to end with a final line `Answer: <one line>` (for a choice task `Answer: <one of its letters>`)
    always can be scored. The reasoning before it is free: any lines, each ended by a newline, so a
    strategy's steps are never cut short; the line `Answer: ...` may appear among them too (the
    last one counts, as in the scorer), and an answer still running at max_tokens ends as the
    truncated answer it is. The regex uses only literals, classes, a group and a star (no inline
    flags, lookarounds or hex escapes): the common core of regex dialects, which llguidance
    (`phi-jax serve`) takes; an endpoint that refuses it is asked plainly (the teacher client).
    Tasks without a reference return None: nothing reads their answer, so it stays free.
    """
    if task.answer is None:
        return None
    if task.choices:
        last = "[" + LETTERS[:len(task.choices)] + "]"
    else:
        last = _ANSWER_START + r"[^\n]*"
    return r"(?:[^\n]*\n)*" + FINAL_ANSWER + last


def concluding_parts(answer: str) -> list[str]:
    """What an answer concludes, most specific first: after its last answer marker, its last
    non-empty line, the whole answer."""
    after = _after_marker(answer)
    parts = [after] if after else []
    lines = [line.strip() for line in answer.strip().splitlines() if line.strip()]
    if lines:
        parts.append(lines[-1])
    parts.append(answer.strip())
    return [p for i, p in enumerate(parts) if p and p not in parts[:i]]


def exact_match(answer: str, task: Task) -> float:
    """1.0 when what the answer concludes equals the reference after `normalize`."""
    reference = normalize(_reference(task))
    return float(any(normalize(part) == reference for part in concluding_parts(answer)))


def extract_choice(answer: str, choices: tuple[str, ...] | None = None, count: int = 4) -> str | None:
    """The option letter an answer picks (A, B, ...), or None when it picks none clearly.

    Tried in order: a letter standing alone where the answer concludes ("Answer: (B)", "B."),
    "the answer is B" / "option B" anywhere (the last one), then (with `choices`) the one option
    whose text is what the answer concludes. An answer that lists the options ("A. x", "B. y", ...)
    picks only through a marker: its last line is the list's, not a choice.
    """
    count = len(choices) if choices else count
    valid = LETTERS[:count]
    parts = concluding_parts(answer)
    if len(set(_OPTION_LINE.findall(answer))) >= 2:
        after = _after_marker(answer)
        parts = [after] if after else []
    for part in parts[:2]:
        found = _LETTER_ALONE.match(part.strip().strip("*_`").strip())
        letter = found and (found.group(1) or found.group(2))
        if letter and letter in valid:
            return letter
    mentions = [m.group(1) for m in _LETTER_MENTION.finditer(answer) if m.group(1) in valid]
    if mentions:
        return mentions[-1]
    if choices:
        options = [normalize(c) for c in choices]
        for part in parts:
            hits = [i for i, option in enumerate(options) if option == normalize(part)]
            if len(hits) == 1:
                return LETTERS[hits[0]]
    return None


def choice_accuracy(answer: str, task: Task) -> float:
    """1.0 when the letter the answer picks is the reference letter."""
    picked = extract_choice(answer, task.choices)
    return float(picked is not None and picked == _reference(task).strip().upper())


def auto(answer: str, task: Task) -> float:
    """Choice accuracy for tasks with choices, exact match for the rest."""
    return choice_accuracy(answer, task) if task.choices else exact_match(answer, task)


def _reference(task: Task) -> str:
    if task.answer is None:
        raise InputError(f"task {task.id!r} has no reference answer to score against")
    return task.answer


def load_scorer(spec: str) -> Scorer:
    """"auto" | "exact" | "choice" | "package.module:function" | "path/to/file.py:function".

    A user scorer is called as `fn(answer, task)` with a `phi_jax.data.tasks.Task` and must return
    a number in [0, 1] (a bool counts); `checked_score` holds it to that.
    """
    builtin = {"auto": auto, "exact": exact_match, "choice": choice_accuracy}
    if spec in builtin:
        return builtin[spec]
    module_name, sep, name = spec.rpartition(":")
    if not sep or not module_name or not name.isidentifier():
        raise InputError(f"--scorer={spec!r}: give {', '.join(BUILTIN_SCORERS)}, or module:function "
                         "(e.g. my_scorers:exact_number, or path/to/scorers.py:exact_number)")
    if module_name.endswith(".py"):
        path = Path(module_name)
        if not path.is_file():
            raise MissingFileError(f"--scorer={spec!r}: no such file {path}")
        loader_spec = importlib.util.spec_from_file_location(f"_phi_jax_scorer_{path.stem}", path)
        module = importlib.util.module_from_spec(loader_spec)
        loader_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            raise InputError(f"--scorer={spec!r}: cannot import {module_name!r} ({e}); put it on "
                             "PYTHONPATH or give the file's path (path/to/file.py:function)") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise InputError(f"--scorer={spec!r}: {module_name} has no function {name!r}")
    return fn


def checked_score(scorer: Scorer, answer: str, task: Task, name: str = "scorer") -> float:
    """scorer(answer, task) as a float in [0, 1], or an InputError naming the scorer and task."""
    value: Any = scorer(answer, task)
    if isinstance(value, bool):
        return float(value)
    if not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise InputError(f"{name} returned {value!r} for task {task.id!r}; a scorer returns a number "
                         "in [0, 1] (1 = correct)")
    return float(value)
