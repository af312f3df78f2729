"""Instruction tasks (the input of Orca-2-style data) and the chat examples made from them.

A task is one JSON object (a JSONL line):

    {"id": str, "type": str, "prompt": str, "answer": str?, "choices": [str, ...]?, "split": str?}

  type     the task family ("return_value", a FLAN task name, ...); strategies are chosen per type.
  answer   an optional reference: the answer itself (exact match), or a letter for a choice task.
  choices  the options of a multiple-choice task, lettered A, B, ... in order (answer = a letter).
  split    "train" | "dev" | "heldout"; when absent it is decided by a hash of the id (`split_of`),
           so a task keeps its split however the file is ordered, cut or extended.
Tasks without an answer are always "train": dev (strategy selection) and heldout (the before/after
evaluation) need a reference to score against. Other fields travel along in `Task.meta`.

An instruction example (written by `phi-jax data instruct`, read by fine-tuning) is a record
(`phi_jax.data.records`) whose `meta.messages` is the conversation to train on:

    {"id": task id, "text": prompt + "\\n\\n" + answer,
     "meta": {"messages": [{"role": "system", "content": GENERIC_SYSTEM_MESSAGE},
                           {"role": "user", "content": prompt},
                           {"role": "assistant", "content": the teacher's answer}],
              "type", "strategy", "strategy_sha256", "teacher", "split": "train",
              "reference"?, "reference_score"?, "choices"?, ...}}

The system message is always GENERIC_SYSTEM_MESSAGE, never the strategy prompt the teacher saw
(Orca-2's prompt erasure): the student must learn to pick the strategy from the task alone. Train
on it with the same constant, and put the loss on the assistant turns only (`example_messages`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import string
from typing import Any, Iterable, Iterator, Mapping, Sequence

from phi_jax.errors import InputError

GENERIC_SYSTEM_MESSAGE = "You are a helpful assistant."
SPLITS = ("train", "dev", "heldout")
DEV_FRACTION = 0.1
HELDOUT_FRACTION = 0.1
LETTERS = string.ascii_uppercase
_TASK_KEYS = ("type", "answer", "choices", "split")


@dataclasses.dataclass(frozen=True)
class Task:
    """One task; `meta` holds the fields of the JSON object that are not the task's own."""

    id: str
    type: str
    prompt: str
    answer: str | None = None
    choices: tuple[str, ...] | None = None
    split: str | None = None
    meta: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The flat JSON object of the task format (what `phi-jax data tasks` writes)."""
        out: dict[str, Any] = {"id": self.id, "type": self.type, "prompt": self.prompt}
        if self.answer is not None:
            out["answer"] = self.answer
        if self.choices is not None:
            out["choices"] = list(self.choices)
        if self.split is not None:
            out["split"] = self.split
        return {**out, **{k: v for k, v in self.meta.items() if k not in out}}


def task_from_json(obj: Any, where: str) -> Task:
    """A flat task object (or a record read with text_field="prompt") -> Task, validated."""
    if not isinstance(obj, Mapping):
        raise InputError(f"{where}: a task must be a JSON object, got {type(obj).__name__}")
    if "text" in obj and "meta" in obj and "prompt" not in obj:  # a record: prompt in text
        obj = {**obj["meta"], "id": obj.get("id"), "prompt": obj["text"]}
    fix = '; each task is {"id": str, "type": str, "prompt": str, "answer": str (optional)}'
    tid = obj.get("id")
    if not isinstance(tid, str) or not tid:
        raise InputError(f"{where}: 'id' must be a non-empty string, got {tid!r}{fix}")
    where = f"{where} (task {tid!r})"
    for key in ("type", "prompt"):
        if not isinstance(obj.get(key), str) or not obj[key].strip():
            raise InputError(f"{where}: {key!r} must be a non-empty string, got {obj.get(key)!r}{fix}")
    answer = obj.get("answer")
    if answer is not None and (not isinstance(answer, str) or not answer.strip()):
        raise InputError(f"{where}: 'answer' must be a non-empty string when given, got {answer!r}")
    choices = obj.get("choices")
    if choices is not None:
        if not (isinstance(choices, list) and 2 <= len(choices) <= len(LETTERS)
                and all(isinstance(c, str) and c.strip() for c in choices)):
            raise InputError(f"{where}: 'choices' must be a list of 2-26 non-empty strings")
        if answer is not None and answer.strip().upper() not in LETTERS[:len(choices)]:
            raise InputError(f"{where}: the answer of a choice task is a letter A-"
                             f"{LETTERS[len(choices) - 1]}, got {answer!r}")
        choices = tuple(choices)
    split = obj.get("split")
    if split is not None and split not in SPLITS:
        raise InputError(f"{where}: 'split' must be one of {', '.join(SPLITS)}, got {split!r}")
    if split in ("dev", "heldout") and answer is None:
        raise InputError(f"{where}: a {split} task needs an 'answer' to score against; give one or "
                         "put the task in the train split")
    meta = {k: v for k, v in obj.items() if k not in ("id", "prompt", *_TASK_KEYS)}
    return Task(tid, obj["type"], obj["prompt"], answer, choices, split, meta)


def read_tasks(inputs: str | Sequence[str], max_records: int = 0) -> Iterator[Task]:
    """The tasks of JSONL / ArrayRecord files, globs, or an output of `phi-jax data tasks` (the
    first `max_records` when > 0)."""
    from phi_jax.data import records

    for shard in records.plan_shards(inputs, shard_size=1 << 30, text_field="prompt",
                                     max_records=max_records):
        for record in shard.read():
            yield task_from_json(record, shard.describe())


def split_of(task_id: str, *, dev_fraction: float = DEV_FRACTION,
             heldout_fraction: float = HELDOUT_FRACTION) -> str:
    """"heldout", "dev" or "train" from a hash of the id alone: stable under any reordering, and a
    larger dev fraction never moves a heldout task."""
    check_fractions(dev_fraction, heldout_fraction)
    u = int.from_bytes(hashlib.sha256(task_id.encode("utf-8")).digest()[:8], "big") / 2.0 ** 64
    if u < heldout_fraction:
        return "heldout"
    return "dev" if u < heldout_fraction + dev_fraction else "train"


def task_split(task: Task, *, dev_fraction: float = DEV_FRACTION,
               heldout_fraction: float = HELDOUT_FRACTION) -> str:
    """The task's own split if it names one; else `split_of` its id (train when it has no answer)."""
    if task.split is not None:
        return task.split
    if task.answer is None:
        return "train"
    return split_of(task.id, dev_fraction=dev_fraction, heldout_fraction=heldout_fraction)


def select_split(tasks: Iterable[Task], split: str, *, dev_fraction: float = DEV_FRACTION,
                 heldout_fraction: float = HELDOUT_FRACTION) -> list[Task]:
    """The tasks of one split ("train", "dev", "heldout"; "all" keeps every task), by `task_split`;
    use the fractions the data was built with (`phi-jax data instruct` records them)."""
    if split == "all":
        return list(tasks)
    if split not in SPLITS:
        raise InputError(f"--split={split!r}; choose one of {', '.join(SPLITS)} or all")
    fractions = {"dev_fraction": dev_fraction, "heldout_fraction": heldout_fraction}
    return [t for t in tasks if task_split(t, **fractions) == split]


def check_fractions(dev_fraction: float, heldout_fraction: float) -> None:
    if not (0 <= dev_fraction < 1 and 0 <= heldout_fraction < 1 and dev_fraction + heldout_fraction < 1):
        raise InputError(f"--dev-fraction={dev_fraction} and --heldout-fraction={heldout_fraction}: each "
                         "must be in [0, 1) and together below 1, leaving tasks to train on")


def example_messages(record: Mapping[str, Any]) -> list[dict[str, str]]:
    """The conversation of an instruction example (`meta.messages`), checked for fine-tuning:
    a system turn, then user / assistant turns alternating, ending with the assistant's."""
    messages = record.get("meta", {}).get("messages") if isinstance(record, Mapping) else None
    where = f"record {record.get('id')!r}" if isinstance(record, Mapping) else "record"
    if not isinstance(messages, list) or len(messages) < 3:
        raise InputError(f"{where}: no meta.messages conversation; is it an output of "
                         "`phi-jax data instruct`?")
    roles = [m.get("role") if isinstance(m, Mapping) else None for m in messages]
    expected = ["system"] + ["user", "assistant"] * ((len(messages) - 1) // 2)
    if roles != expected or not all(isinstance(m.get("content"), str) for m in messages):
        raise InputError(f"{where}: meta.messages roles {roles} are not system, then user/assistant "
                         "turns ending with the assistant's, each with a string content")
    return [{"role": m["role"], "content": m["content"]} for m in messages]
