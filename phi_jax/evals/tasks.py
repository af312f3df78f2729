"""Tasks with references, answered by a chat model and scored: the before/after evaluation of
Orca-2-style instruction tuning (the base and the tuned model on the same held-out tasks).

    from phi_jax.data.tasks import read_tasks, select_split
    tasks = select_split(read_tasks("out/tasks"), "heldout")
    result = evaluate_tasks(loaded.model, loaded.variables, loaded.tokenizer, tasks, loaded.chat_template)
    result["score"], result["by_type"]["return_value"]["score"]

Each task is asked as `[system: GENERIC_SYSTEM_MESSAGE, user: task.prompt]` (what the tuned model
was trained with, `phi_jax.data.tasks`), rendered with the model's chat template
(`phi_jax.chat.render_chat`, the tokenizer's special tokens; ChatML when the model has no template),
answered greedily with `phi_jax.inference.decode.generate`, and scored with the same scorers that
chose the strategies (`phi_jax.data.answers`: exact match, choice accuracy, or a user scorer).
`tasks_report` puts several models' results side by side in one JSON and one PNG.
"""

from __future__ import annotations

import collections
import functools
import json
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from phi_jax.chat import render_chat
from phi_jax.data.answers import checked_score, load_scorer
from phi_jax.data.tasks import GENERIC_SYSTEM_MESSAGE, Task, task_from_json
from phi_jax.errors import InputError

# End-of-turn tokens of common chat formats; those in the vocabulary stop generation.
STOP_TOKENS = ("<|im_end|>", "<|end|>", "<|eot_id|>", "<|endoftext|>", "</s>")


def _stop_ids(tokenizer) -> list[int]:
    ids = {tokenizer.eos_id} if tokenizer.eos_id is not None else set()
    for token in STOP_TOKENS:
        token_id = tokenizer.token_to_id(token) if hasattr(tokenizer, "token_to_id") else None
        if token_id is not None:
            ids.add(token_id)
    return sorted(ids)


def evaluate_tasks(model, variables, tokenizer, tasks: Iterable[Task | Mapping[str, Any]],
                   chat_template: str | None = None, *, scorer: str = "auto",
                   system_message: str | None = GENERIC_SYSTEM_MESSAGE, max_new_tokens: int = 256,
                   batch_size: int = 8, add_bos: bool = False,
                   render: Callable[[list[dict[str, str]]], str] | None = None,
                   generate_fn: Callable | None = None) -> dict:
    """Answer and score every task that has a reference.

    Args:
      model, variables, tokenizer: as `phi_jax.inference.load` returns them.
      tasks: `Task`s or task JSON objects ({"id", "type", "prompt", "answer", ...}); tasks without
        an answer are skipped (counted in `skipped`).
      chat_template: the Jinja chat template (`Loaded.chat_template`); None: the tokenizer's own,
        else ChatML (`phi_jax.chat.DEFAULT_CHAT_TEMPLATE`).
      scorer: "auto" | "exact" | "choice" | "module:function" (see `phi_jax.data.answers`).
      system_message: the system turn (the generic one the tuned model saw; None: no system turn).
      max_new_tokens: the answer length limit; a task whose prompt leaves no room for it is skipped.
      add_bos: prepend BOS (when the template does not write it and the model expects it).
      render: messages -> prompt text, replacing the chat template (a format of your own).
    Returns:
      {"score": mean, "num_scored", "by_type": {type: {"num_scored", "score"}}, "skipped": {reason: n},
       "examples": [{"id", "type", "reference", "answer", "score"}], "settings", "seconds"}.
    """
    if generate_fn is None:
        from phi_jax.inference.decode import generate as generate_fn
    if batch_size < 1 or max_new_tokens < 1:
        raise InputError("batch_size and max_new_tokens must be >= 1")
    score = load_scorer(scorer)
    if render is None:
        template = chat_template if chat_template is not None else getattr(tokenizer, "chat_template", None)
        special = getattr(tokenizer, "special_tokens_map", {"bos_token": "", "eos_token": ""})
        render = functools.partial(render_chat, template=template, **special)
    start = time.perf_counter()
    skipped: collections.Counter = collections.Counter()
    jobs = []
    for i, task in enumerate(tasks):
        task = task if isinstance(task, Task) else task_from_json(task, f"task {i}")
        if task.answer is None:
            skipped["no_reference"] += 1
            continue
        messages = ([{"role": "system", "content": system_message}] if system_message is not None else [])
        ids = tokenizer.encode(render(messages + [{"role": "user", "content": task.prompt}]), add_bos=add_bos)
        if not ids or len(ids) + max_new_tokens > model.config.max_len:
            skipped["prompt_too_long"] += 1
            continue
        jobs.append((task, ids))
    order = sorted(range(len(jobs)), key=lambda j: len(jobs[j][1]))  # similar lengths share a batch
    answers: dict[int, str] = {}
    stops = _stop_ids(tokenizer)
    for b in range(0, len(order), batch_size):
        idx = order[b:b + batch_size]
        new = generate_fn(model, variables, [jobs[j][1] for j in idx], max_new_tokens, stop_tokens=stops)
        for j, ids in zip(idx, new):
            answers[j] = tokenizer.decode([t for t in ids if t not in stops]).strip()
    examples, by_type = [], collections.defaultdict(list)
    for j, (task, _) in enumerate(jobs):
        value = checked_score(score, answers[j], task, f"scorer {scorer!r}")
        by_type[task.type].append(value)
        examples.append({"id": task.id, "type": task.type, "reference": task.answer, "answer": answers[j],
                         "score": value})
    values = [e["score"] for e in examples]
    return {"score": statistics.fmean(values) if values else float("nan"), "num_scored": len(values),
            "by_type": {t: {"num_scored": len(v), "score": statistics.fmean(v)}
                        for t, v in sorted(by_type.items())},
            "skipped": dict(skipped), "examples": examples,
            "settings": {"scorer": scorer, "system_message": system_message, "max_new_tokens": max_new_tokens,
                         "add_bos": add_bos, "stop_ids": stops},
            "seconds": round(time.perf_counter() - start, 3)}


def tasks_report(results: Mapping[str, Mapping[str, Any]], output: str | Path, *,
                 title: str = "task accuracy") -> dict:
    """Several models' `evaluate_tasks` results (e.g. {"base": ..., "tuned": ...}) side by side:
    OUTPUT/tasks_report.json (overall and per-type scores, without the examples) and
    OUTPUT/tasks_report.png (grouped bars per task type)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import io

    from phi_jax.fileio import as_path, atomic_write_bytes, atomic_write_json

    if not results:
        raise InputError("tasks_report needs at least one model's results")
    output = as_path(output)  # local or gs://
    output.mkdir(parents=True, exist_ok=True)
    report = {name: {k: v for k, v in r.items() if k != "examples"} for name, r in results.items()}
    atomic_write_json(output / "tasks_report.json", report)
    types = sorted({t for r in results.values() for t in r["by_type"]}) + ["all"]
    fig, ax = plt.subplots(figsize=(max(5.0, 1.3 * len(types)), 3.6), dpi=120)
    width = 0.8 / len(results)
    for k, (name, r) in enumerate(results.items()):
        heights = [r["by_type"].get(t, {}).get("score", 0.0) if t != "all" else r["score"] for t in types]
        ax.bar([i + (k - (len(results) - 1) / 2) * width for i in range(len(types))], heights, width,
               label=f"{name} ({r['num_scored']} tasks)")
    ax.set_xticks(range(len(types)), types, rotation=20, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("score")
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png")
    plt.close(fig)
    atomic_write_bytes(output / "tasks_report.png", png.getvalue())
    return report


def write_examples(result: Mapping[str, Any], path: str | Path) -> None:
    """One JSON line per scored example (answer, reference, score), for reading what went wrong."""
    with open(path, "w", encoding="utf-8") as f:
        for example in result["examples"]:
            f.write(json.dumps(example, ensure_ascii=False) + "\n")
