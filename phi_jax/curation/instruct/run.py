"""Orca-2 instruction data: a teacher answers each task under its type's strategy, the student's
copy keeps only a generic system message (prompt erasure).

    manifest = run_instruct("tasks/", "out/instruct", teacher=TeacherConfig(url, model),
                            select="dev", scorer="auto")

For every train task (see `phi_jax.data.tasks` for the task format and splits) the teacher is
sent `[system: the strategy's prompt, user: the task]`; the stored example is
`[system: GENERIC_SYSTEM_MESSAGE, user: the task, assistant: the teacher's answer]` (the record
schema is in `phi_jax.data.tasks`). Which strategy a type gets:
  * `select="map"`: the strategy map (`--strategy-map`, a type -> strategy JSON with a default);
  * `select="dev"`: as Orca-2 chose, by measurement. For each type, the teacher answers the type's
    dev tasks under every strategy; the answers are scored against the references (the scorer:
    exact match, choice accuracy, or yours) and the best mean wins. A tie keeps the map's choice if
    it is among the best, else the first best in strategy order; a type without dev tasks keeps
    the map's. An answer that would be dropped (below) scores 0 there: selection measures what
    would be stored. The choice and every strategy's mean score go into the manifest's parameters
    (`strategy_selection`), the per-task scores into `strategy_selection.json`.
Dev and held-out tasks are never trained on: they are dropped and counted (`dev_split`,
`heldout_split`), so the held-out split stays clean for the before/after evaluation.

Not stored, and counted by reason: answers the teacher refused (`teacher_refused`), empty answers
(`empty_answer`), answers cut at max_tokens (`truncated_answer`), and answers that quote a
strategy prompt (`leaked_strategy_prompt`: a 13-word run of any strategy's prompt, see
`strategies.LeakCheck`). Nothing is ever written in the teacher's place.

Every answer goes through the one teacher client, whose cache key holds the strategy prompt's hash
and the rendered messages (which contain the prompt itself): editing one strategy file re-asks
exactly the tasks answered under it, and a killed run, rerun, pays for nothing twice.

A task with a reference answer (dev tasks in selection, train tasks scored into `reference_score`)
is asked with a structured-output regex (vLLM's `structured_outputs`, which `phi-jax serve` takes):
free reasoning, then a last line `Answer: <one line>`, or `Answer: <letter>` for a choice task
(`phi_jax.data.answers.final_answer_regex`), so the scorer always finds what the answer concludes.
The regex is part of the cache key (constrained and free answers are never mixed); an endpoint that
answers 400 to the field is asked plainly instead, with one warning.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import statistics
from pathlib import Path
from typing import Any, Mapping, Sequence

from phi_jax.curation.core.stage import Counts, Stage
from phi_jax.curation.instruct.strategies import LEAK_WORDS, LeakCheck, Strategy, StrategyMap
from phi_jax.curation.teacher.client import Answer, Prompt, TeacherClient, TeacherConfig, default_cache_path
from phi_jax.data import records
from phi_jax.data.answers import checked_score, final_answer_regex, load_scorer
from phi_jax.data.tasks import (DEV_FRACTION, GENERIC_SYSTEM_MESSAGE, HELDOUT_FRACTION, Task,
                                check_fractions, read_tasks, task_from_json, task_split)
from phi_jax.errors import InputError
from phi_jax import fileio
from phi_jax.fileio import atomic_write_json

SELECT_MODES = ("map", "dev")
SELECTION_FILE = "strategy_selection.json"


def teacher_messages(strategy: Strategy, task: Task) -> list[dict[str, str]]:
    """What the teacher sees: the strategy's system prompt, then the task."""
    return [{"role": "system", "content": strategy.prompt}, {"role": "user", "content": task.prompt}]


def student_messages(task: Task, answer: str) -> list[dict[str, str]]:
    """What the student trains on: the generic system message, the task, the teacher's answer."""
    return [{"role": "system", "content": GENERIC_SYSTEM_MESSAGE}, {"role": "user", "content": task.prompt},
            {"role": "assistant", "content": answer}]


def _prompt(strategy: Strategy, task: Task) -> Prompt:
    """A task with a reference is asked for an answer that ends `Answer: ...` (a structured-output
    regex, `answers.final_answer_regex`), so none is lost to parsing when it is scored; plainly
    from an endpoint that refuses the field (the client warns once). Free tasks stay free."""
    plain = Prompt(teacher_messages(strategy, task), strategy.sha256)
    regex = final_answer_regex(task)
    if regex is None:
        return plain
    return dataclasses.replace(plain, request={"structured_outputs": {"regex": regex}}, fallback=plain)


def _unusable(answer: Answer, leak: LeakCheck) -> str | None:
    """Why an answer cannot be stored (a drop reason), or None."""
    if answer.error is not None:
        return "teacher_refused"
    if not (answer.text or "").strip():
        return "empty_answer"
    if answer.finish_reason == "length":
        return "truncated_answer"
    if leak.leaks(answer.text):
        return "leaked_strategy_prompt"
    return None


# ------------------------------------------------------------------------------- selection
def select_strategies(tasks: Sequence[Task], strategies: Sequence[Strategy], client: TeacherClient,
                      scorer: str, fallback: StrategyMap, *, dev_fraction: float = DEV_FRACTION,
                      heldout_fraction: float = HELDOUT_FRACTION) -> tuple[dict, list[dict]]:
    """Choose each type's strategy on its dev tasks (see the module docstring).

    Returns (summary, details): summary = {type: {"strategy", "chosen_by", "dev_tasks", "scores":
    {strategy: mean score}, "unusable": {strategy: answers that would be dropped, scored 0}}};
    details = one row per (dev task, strategy) with its score and the teacher's answer.
    """
    score = load_scorer(scorer)
    leak = LeakCheck(s.prompt for s in strategies)
    dev: dict[str, list[Task]] = collections.defaultdict(list)
    types = sorted({t.type for t in tasks})
    for task in tasks:
        if task_split(task, dev_fraction=dev_fraction, heldout_fraction=heldout_fraction) == "dev":
            dev[task.type].append(task)
    asks = [(task, s) for task_type in types for task in dev[task_type] for s in strategies]
    answers = client.ask([_prompt(s, task) for task, s in asks])
    scores: dict[tuple[str, str], list[float]] = collections.defaultdict(list)
    unusable: collections.Counter = collections.Counter()
    details = []
    for (task, strategy), answer in zip(asks, answers):
        reason = _unusable(answer, leak)
        value = 0.0 if reason else checked_score(score, answer.text, task, f"--scorer={scorer}")
        unusable[task.type, strategy.name] += reason is not None
        scores[task.type, strategy.name].append(value)
        details.append({"id": task.id, "type": task.type, "strategy": strategy.name, "score": value,
                        "unusable": reason, "answer": answer.text})
    summary = {}
    for task_type in types:
        mapped = fallback.strategy_of(task_type)
        if not dev[task_type]:
            summary[task_type] = {"strategy": mapped, "chosen_by": "map (no dev tasks)", "dev_tasks": 0}
            continue
        means = {s.name: round(statistics.fmean(scores[task_type, s.name]), 6) for s in strategies}
        best = max(means.values())
        tied = [name for name, mean in means.items() if mean == best]
        chosen = mapped if mapped in tied else tied[0]
        tie = " (tie: map)" if chosen == mapped and len(tied) > 1 else ""
        summary[task_type] = {"strategy": chosen, "chosen_by": "dev score" + tie,
                              "dev_tasks": len(dev[task_type]), "scores": means,
                              "unusable": {s.name: unusable[task_type, s.name] for s in strategies}}
    return summary, details


# ------------------------------------------------------------------------------------ stage
@dataclasses.dataclass(frozen=True)
class InstructSpec:
    """Everything a worker needs to build the instruct step (picklable)."""

    strategies: tuple[Strategy, ...]
    assignment: Mapping[str, str]  # task type -> strategy name
    default: str  # the strategy of a type not in `assignment`
    teacher: TeacherConfig
    cache: str | None
    scorer: str
    dev_fraction: float = DEV_FRACTION
    heldout_fraction: float = HELDOUT_FRACTION


def instruct_stage(spec: InstructSpec, selection: dict | None = None, select: str = "map",
                   strategy_map: StrategyMap | None = None) -> Stage:
    """The stage that asks the teacher and writes the erased examples; `selection` and the map
    only go into the parameters (the manifest)."""
    teacher = spec.teacher
    parameters = {
        "generic_system_message": GENERIC_SYSTEM_MESSAGE,
        "strategies": {s.name: s.sha256 for s in spec.strategies},
        "select_strategy": select, "strategy_map": strategy_map.as_json() if strategy_map else None,
        "assignment": {"types": dict(sorted(spec.assignment.items())), "default": spec.default},
        "strategy_selection": selection,
        "teacher": {"model": teacher.model, **teacher.sampling()}, "scorer": spec.scorer,
        "dev_fraction": spec.dev_fraction, "heldout_fraction": spec.heldout_fraction,
        "leak_words": LEAK_WORDS}
    settings = {"teacher_url": teacher.endpoint, "concurrency": teacher.concurrency,
                "timeout_s": teacher.timeout_s, "max_retries": teacher.max_retries,
                "teacher_cache": spec.cache}
    return Stage("instruct", functools.partial(_InstructStep, spec), parameters, settings,
                 batch_size=max(16, 4 * teacher.concurrency))


class _InstructStep:
    def __init__(self, spec: InstructSpec):
        self._spec = spec
        self._strategies = {s.name: s for s in spec.strategies}
        self._leak = LeakCheck(s.prompt for s in spec.strategies)
        self._score = load_scorer(spec.scorer)
        self._client = TeacherClient(spec.teacher, spec.cache)

    def __call__(self, batch: list[dict], counts: Counts) -> list[dict]:
        spec, train = self._spec, []
        for record in batch:
            task = task_from_json(record, "task")
            split = task_split(task, dev_fraction=spec.dev_fraction, heldout_fraction=spec.heldout_fraction)
            if split == "train":
                train.append((task, self._strategies[spec.assignment.get(task.type, spec.default)]))
            else:
                counts.drop(f"{split}_split")
        answers = self._client.ask([_prompt(s, task) for task, s in train], counts)
        kept = []
        for (task, strategy), answer in zip(train, answers):
            reason = _unusable(answer, self._leak)
            if reason is not None:
                counts.drop(reason)
                continue
            kept.append(self._example(task, strategy, answer.text, counts))
        return kept

    def _example(self, task: Task, strategy: Strategy, answer: str, counts: Counts) -> dict:
        meta = {**task.meta, "messages": student_messages(task, answer), "type": task.type,
                "strategy": strategy.name, "strategy_sha256": strategy.sha256[:16],
                "teacher": self._spec.teacher.model, "split": "train"}
        if task.choices is not None:
            meta["choices"] = list(task.choices)
        if task.answer is not None:
            value = checked_score(self._score, answer, task, f"--scorer={self._spec.scorer}")
            meta.update(reference=task.answer, reference_score=value)
            counts.add("reference_scored")
            counts.add("reference_correct", int(value == 1.0))
        counts.add(f"strategy_{strategy.name}")
        return records.make_record(task.id, f"{task.prompt}\n\n{answer}", meta)

    def close(self) -> None:
        self._client.close()


# ------------------------------------------------------------------------------------ driver
def load_tasks(inputs: str | Sequence[str], max_records: int = 0) -> list[Task]:
    """Every task of the inputs (the first `max_records` when > 0), ids checked to be unique."""
    tasks = list(read_tasks(inputs, max_records=max_records))
    if not tasks:
        raise InputError(f"--tasks={inputs}: no tasks")
    seen: set[str] = set()
    for task in tasks:
        if task.id in seen:
            raise InputError(f"--tasks={inputs}: task id {task.id!r} appears twice; ids name the examples "
                             "and decide the splits, so each must be unique")
        seen.add(task.id)
    return tasks


def run_instruct(tasks: str | Sequence[str], output: str | Path, *, teacher: TeacherConfig,
                 strategies: Mapping[str, Strategy], strategy_map: StrategyMap, select: str = "map",
                 scorer: str = "auto", dev_fraction: float = DEV_FRACTION,
                 heldout_fraction: float = HELDOUT_FRACTION, cache: str | Path | None = None,
                 **run_options: Any) -> dict:
    """Select strategies (select="dev"), then run the instruct stage; returns the manifest.

    `run_options` go to `phi_jax.curation.core.runners.run_stage` (runner, workers, shard_size,
    output_format, max_records, overwrite, beam_options, progress).
    """
    from phi_jax.curation.core.runners import run_stage

    if select not in SELECT_MODES:
        raise InputError(f"--select-strategy={select!r}; choose one of {', '.join(SELECT_MODES)}")
    check_fractions(dev_fraction, heldout_fraction)
    load_scorer(scorer)  # a bad --scorer fails before the teacher is asked anything
    cache = str(cache or default_cache_path(output))
    task_list = load_tasks(tasks, run_options.get("max_records", 0))
    types = sorted({t.type for t in task_list})
    selection = details = None
    if select == "dev":
        with TeacherClient(teacher, cache) as client:
            selection, details = select_strategies(task_list, list(strategies.values()), client, scorer,
                                                   strategy_map, dev_fraction=dev_fraction,
                                                   heldout_fraction=heldout_fraction)
            usage = dict(client.usage)
        assignment = {t: selection[t]["strategy"] for t in types}
    else:
        assignment = {t: strategy_map.strategy_of(t) for t in types}
    spec = InstructSpec(tuple(strategies.values()), assignment, strategy_map.default, teacher, cache, scorer,
                        dev_fraction, heldout_fraction)
    stage = instruct_stage(spec, selection, select, strategy_map)
    manifest = run_stage(stage, tasks, output, text_field="prompt", **run_options)
    if details is not None:
        atomic_write_json(fileio.as_path(output) / SELECTION_FILE, {"scorer": scorer, "types": selection,
                                                          "answers": details})
        manifest["strategy_selection"] = {"file": SELECTION_FILE, "dev_answers": len(details),
                                          **{f"teacher_{k}": v for k, v in sorted(usage.items())}}
        records.write_manifest(output, manifest)
    return manifest


def selection_table(selection: dict) -> str:
    """The strategy selection as a few lines for the run's summary."""
    lines = ["  strategy selection (mean dev score per strategy; * = chosen)"]
    for task_type, row in selection.items():
        scores = row.get("scores")
        if not scores:
            lines.append(f"    {task_type}: {row['strategy']} ({row['chosen_by']})")
            continue
        cells = ", ".join(f"{'*' if n == row['strategy'] else ''}{n} {v:.2f}" for n, v in scores.items())
        lines.append(f"    {task_type} ({row['dev_tasks']} dev): {cells}")
    return "\n".join(lines)
