"""Tasks with automatically checkable answers, built from the embedded corpus (stdlib + pydoc topics).

    tasks = generate_tasks(count=400, seed=0)      # deterministic for a seed, count and corpus

Four task types (`TASK_TYPES`), each a `phi_jax.data.tasks.Task`:
  docstring_to_name  a stdlib function's docstring (its name blanked out) and its module; the
                     reference is the function's name (exact match).
  multiple_choice    the same question with four names of that module's functions as options
                     A-D; the reference is the letter (choice accuracy).
  return_value       a small pure stdlib function's source and a call; the reference is the repr
                     of what the call returns, computed by running the function in the sandbox
                     (`phi_jax.sandbox`), never guessed. Only functions that touch nothing but
                     their arguments, locals and a few pure builtins qualify (`_pure_functions`).
  topic_summary      a pydoc topic of the language reference, to summarise in one sentence;
                     no reference (always a train task).
Each source function or topic is used by at most one task, so no held-out question is answered
by a training example about the same function. The split comes from a hash of the task id
(`phi_jax.data.tasks.split_of`), and ids name the source (`return_value:textwrap.dedent`), so a
task keeps its split whatever the seed or count.
"""

from __future__ import annotations

import ast
import json
import random
import re
from typing import Any, Iterator, Sequence

from phi_jax.data import corpus
from phi_jax.data.tasks import DEV_FRACTION, HELDOUT_FRACTION, LETTERS, Task, split_of
from phi_jax.errors import InputError, RunError

TASK_TYPES = ("docstring_to_name", "multiple_choice", "return_value", "topic_summary")
BLANK = "____"
TASKS_FILE = "tasks.jsonl"
_TOPIC_PREFIX = "pydoc_data.topics:"
_MAX_DOC_CHARS, _MAX_TOPIC_CHARS, _MAX_REPR = 500, 1500, 60
_MAX_FUNCTION_LINES, _ATTEMPTS, _CALL_LIMIT_S = 15, 6, 1.0
_PURE_BUILTINS = frozenset({
    "abs", "all", "any", "bin", "bool", "bytes", "chr", "dict", "divmod", "enumerate", "filter", "float",
    "format", "frozenset", "hex", "int", "isinstance", "iter", "len", "list", "map", "max", "min", "next",
    "oct", "ord", "pow", "range", "repr", "reversed", "round", "set", "slice", "sorted", "str", "sum",
    "tuple", "zip", "True", "False", "None", "ValueError", "TypeError", "IndexError", "KeyError"})
_UNSAFE_NODES = (ast.Import, ast.ImportFrom, ast.Global, ast.Nonlocal, ast.Yield, ast.YieldFrom, ast.Await,
                 ast.With, ast.ClassDef, ast.Lambda, ast.AsyncFunctionDef)
_STRINGS = ("hello world", "Hello, World!", "a,b,c", "  padded  ", "CamelCaseName", "__init__",
            "http://example.com:8080/path?q=1", "key=value", "abc123", "x", "", "line one\nline two",
            "3.14", "UPPER lower", "a/b/c.txt")
_INTS = (0, 1, 2, 3, 7, 10, 42, 100, 255, -5)
_INT_NAMES = re.compile(r"^(n|i|j|k|x|y|num|number|count|size|mode|year|month|day|bias|offset|start|"
                        r"stop|end|index|pos|width|value|val|delta|code|bits|level|flags)\d*$")
_STR_NAMES = re.compile(r"(^s$|str|text|line|name|url|doc|path|host|attr|word|prefix|suffix|sep|char|"
                        r"^c$|pattern|string|source|data|msg|key|tag)")

# Runs inside the sandbox: every candidate function on its inputs, one JSON line per success.
_RUNNER = r"""
import json, signal, sys
class _Slow(Exception):
    pass
def _alarm(signum, frame):
    raise _Slow()
signal.signal(signal.SIGALRM, _alarm)
ALLOWED = (int, float, str, bool, type(None), tuple, list, bytes, dict)
def plain(value, depth=0):
    if depth > 3 or not isinstance(value, ALLOWED):
        return False
    if isinstance(value, (tuple, list)):
        return all(plain(v, depth + 1) for v in value)
    if isinstance(value, dict):
        return all(plain(k, depth + 1) and plain(v, depth + 1) for k, v in value.items())
    return True
for line in open("candidates.jsonl"):
    cand = json.loads(line)
    namespace = {}
    try:
        exec(compile(cand["source"], cand["key"], "exec"), namespace)
    except BaseException:
        continue
    fn, found = namespace[cand["name"]], None
    for args in cand["attempts"]:
        signal.setitimer(signal.ITIMER_REAL, LIMIT)
        try:
            value = fn(*args)
            text = repr(value) if plain(value) else None
        except BaseException:
            text = None
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        if text is not None and len(text) <= MAX_REPR and "0x" not in text:
            found = {"key": cand["key"], "args": args, "repr": text}
            if value is not None and value is not False:  # the more telling answer, when there is one
                break
    if found is not None:
        print(json.dumps(found), flush=True)
"""


def _module_of(path: str) -> str:
    """'email/utils.py' -> 'email.utils'; 'json/__init__.py' -> 'json'."""
    return path[:-3].removesuffix("/__init__").replace("/", ".")


def _functions() -> Iterator[tuple[str, str, ast.FunctionDef]]:
    """(module, source, top-level function) of every parseable corpus code file, in corpus order."""
    names, root = corpus.document_names(), corpus.stdlib_dir()
    for name in names:
        if name.startswith(_TOPIC_PREFIX):
            continue
        source = corpus.read_document(name, root)
        try:
            tree = ast.parse(source)
        except (SyntaxError, ValueError):
            continue
        seen = set()
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and node.name not in seen:
                seen.add(node.name)
                yield _module_of(name), source, node


def _first_paragraph(doc: str) -> str:
    return re.split(r"\n\s*\n", doc.strip(), maxsplit=1)[0].strip()[:_MAX_DOC_CHARS]


def _documented(functions) -> tuple[list[tuple[str, str, str]], dict[str, list[str]]]:
    """[(module, name, blanked docstring)] of public documented functions, and every module's
    public function names (the multiple-choice distractors)."""
    found, names_by_module = [], {}
    for module, _, node in functions:
        if node.name.startswith("_"):
            continue
        names_by_module.setdefault(module, []).append(node.name)
        doc = ast.get_docstring(node)
        if not doc:
            continue
        blanked = re.sub(rf"\b{re.escape(node.name)}\b", BLANK, _first_paragraph(doc))
        if len(blanked.split()) >= 6:
            found.append((module, node.name, blanked))
    return found, names_by_module


def _pure(node: ast.FunctionDef) -> bool:
    """Whether a function touches only its arguments, its locals and pure builtins."""
    args = node.args
    if (node.decorator_list or args.vararg or args.kwarg or args.kwonlyargs
            or not 1 <= len(args.posonlyargs + args.args) <= 2
            or node.end_lineno - node.lineno + 1 > _MAX_FUNCTION_LINES):
        return False
    local = {a.arg for a in args.posonlyargs + args.args}
    returns = False
    for sub in ast.walk(node):
        if isinstance(sub, _UNSAFE_NODES) or (isinstance(sub, ast.FunctionDef) and sub is not node):
            return False
        if isinstance(sub, ast.Name) and isinstance(sub.ctx, (ast.Store, ast.Del)):
            local.add(sub.id)
        elif isinstance(sub, ast.arg):
            local.add(sub.arg)
        returns |= isinstance(sub, ast.Return) and sub.value is not None
    names = {sub.id for sub in ast.walk(node) if isinstance(sub, ast.Name) and isinstance(sub.ctx, ast.Load)}
    return returns and names <= local | _PURE_BUILTINS


def _attempts(params: Sequence[str], rng: random.Random) -> list[list[Any]]:
    """Inputs to try, guessing each parameter's type from its name (str, int, or either)."""
    out = []
    for attempt in range(_ATTEMPTS):
        args = []
        for param in params:
            kinds = (("int",) if _INT_NAMES.match(param) else ("str",) if _STR_NAMES.search(param)
                     else ("str", "int"))
            kind = kinds[attempt % len(kinds)] if attempt < 4 else rng.choice(("str", "int"))
            args.append(rng.choice(_STRINGS) if kind == "str" else rng.choice(_INTS))
        out.append(args)
    return out


def _run_returns(candidates: list[dict], backend: str = "auto") -> dict[str, dict]:
    """key -> {"args", "repr"} for every candidate that returned a plain value in the sandbox."""
    from phi_jax import sandbox

    if not candidates:
        return {}
    program = _RUNNER.replace("LIMIT", repr(_CALL_LIMIT_S)).replace("MAX_REPR", str(_MAX_REPR))
    files = {"candidates.jsonl": "".join(json.dumps(c) + "\n" for c in candidates)}
    limits = sandbox.Limits(timeout_s=60.0 + _CALL_LIMIT_S * len(candidates), memory_bytes=2 << 30)
    result = sandbox.run_python(program, files=files, limits=limits,
                                backend=sandbox.default_backend() if backend == "auto" else backend)
    if result.status != "passed":
        raise RunError(f"running the return_value candidates in the sandbox failed ({result.status}: "
                       f"{result.reason}; {result.stderr[-300:]!r}); leave return_value out of --types "
                       "or fix the sandbox (see phi-jax's README, Evaluation)")
    found = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    return {f["key"]: f for f in found}


def _quotas(count: int, types: Sequence[str], available: dict[str, int]) -> dict[str, int]:
    """count split evenly over types; a type short of sources passes its share to the others."""
    quota = {t: 0 for t in types}
    left = count
    while left > 0:
        open_types = [t for t in types if quota[t] < available[t]]
        if not open_types:
            break
        share = max(1, left // len(open_types))
        for t in open_types:
            take = min(share, available[t] - quota[t], left)
            quota[t] += take
            left -= take
    return quota


def generate_tasks(count: int, seed: int = 0, types: Sequence[str] = TASK_TYPES, *,
                   dev_fraction: float = DEV_FRACTION, heldout_fraction: float = HELDOUT_FRACTION,
                   sandbox_backend: str = "auto") -> list[Task]:
    """`count` tasks (fewer if the corpus runs out), spread evenly over `types`; deterministic."""
    unknown = sorted(set(types) - set(TASK_TYPES))
    if unknown or not types:
        raise InputError(f"--types={','.join(types)}: choose from {', '.join(TASK_TYPES)}")
    if count < 1:
        raise InputError(f"--count={count}: must be >= 1")
    functions = list(_functions())
    rng = random.Random(seed)
    documented, names_by_module = _documented(functions)
    rng.shuffle(documented)
    pure = [(m, s, n) for m, s, n in functions if "return_value" in types and _pure(n)]
    topics = [n[len(_TOPIC_PREFIX):] for n in corpus.document_names() if n.startswith(_TOPIC_PREFIX)]
    rng.shuffle(topics)
    doc_types = [t for t in ("docstring_to_name", "multiple_choice") if t in types]
    available = {"docstring_to_name": len(documented), "multiple_choice": len(documented),
                 "return_value": len(pure), "topic_summary": len(topics)}
    quota = _quotas(count, types, available)
    if len(doc_types) == 2 and quota["docstring_to_name"] + quota["multiple_choice"] > len(documented):
        quota["multiple_choice"] = len(documented) - quota["docstring_to_name"]  # one task per function
    tasks: list[Task] = []
    used = 0
    for task_type in doc_types:
        for module, name, doc in documented[used:used + quota[task_type]]:
            tasks.append(_docstring_task(task_type, module, name, doc, names_by_module, rng))
        used += quota[task_type]
    if quota.get("return_value"):
        tasks += _return_value_tasks(pure, quota["return_value"], seed, sandbox_backend)
    for key in topics[:quota.get("topic_summary", 0)]:
        text = corpus.read_document(_TOPIC_PREFIX + key).strip()[:_MAX_TOPIC_CHARS]
        prompt = (f"Here is the start of the Python language reference section on `{key}`:\n\n{text}\n\n"
                  "Summarise in one sentence what this section describes.")
        tasks.append(Task(f"topic_summary:{key}", "topic_summary", prompt, split="train"))
    return [_with_split(t, dev_fraction, heldout_fraction) for t in tasks]


def _with_split(task: Task, dev_fraction: float, heldout_fraction: float) -> Task:
    if task.split is not None:
        return task
    split = split_of(task.id, dev_fraction=dev_fraction, heldout_fraction=heldout_fraction)
    return Task(task.id, task.type, task.prompt, task.answer, task.choices, split, task.meta)


def _docstring_task(task_type: str, module: str, name: str, doc: str, names_by_module: dict,
                    rng: random.Random) -> Task:
    quoted = f'"""\n{doc}\n"""'
    if task_type == "docstring_to_name":
        prompt = (f"Here is the docstring of a function in Python's standard library module `{module}`, "
                  f"with the function's name replaced by {BLANK}:\n\n{quoted}\n\n"
                  "What is the function's name? Answer with the name only.")
        return Task(f"docstring_to_name:{module}.{name}", task_type, prompt, name, meta={"module": module})
    others = sorted(set(names_by_module.get(module, ())) - {name})
    if len(others) < 3:
        pool = sorted({n for names in names_by_module.values() for n in names} - {name})
        others = sorted(set(others) | set(rng.sample(pool, 3 - len(others))))
    options = rng.sample(others, 3) + [name]
    rng.shuffle(options)
    letter = LETTERS[options.index(name)]
    listed = "\n".join(f"{LETTERS[i]}. {option}" for i, option in enumerate(options))
    prompt = (f"Which function of Python's standard library module `{module}` has this docstring (its "
              f"name is replaced by {BLANK})?\n\n{quoted}\n\n{listed}\n\n"
              "Answer with the letter of the correct option.")
    return Task(f"multiple_choice:{module}.{name}", task_type, prompt, letter, tuple(options),
                meta={"module": module})


def _return_value_tasks(pure, quota: int, seed: int, backend: str) -> list[Task]:
    candidates, sources = [], {}
    for module, source, node in pure:
        key = f"{module}.{node.name}"
        code = ast.get_source_segment(source, node)
        params = [a.arg for a in node.args.posonlyargs + node.args.args]
        sources[key] = (module, node.name, code)
        candidates.append({"key": key, "name": node.name, "source": code,
                           "attempts": _attempts(params, random.Random(f"{seed}:{key}"))})
    returned = _run_returns(candidates, backend)
    keys = sorted(returned)
    random.Random(seed).shuffle(keys)
    tasks = []
    for key in keys[:quota]:
        module, name, code = sources[key]
        call = f"{name}({', '.join(repr(a) for a in returned[key]['args'])})"
        prompt = (f"Here is a function from Python's standard library module `{module}`:\n\n```python\n"
                  f"{code}\n```\n\nWhat does `{call}` return? Answer with the returned Python value "
                  "only, written as Python would print its repr().")
        tasks.append(Task(f"return_value:{key}", "return_value", prompt, returned[key]["repr"],
                          meta={"module": module, "call": call}))
    return tasks


def write_tasks(tasks: Sequence[Task], output, parameters: dict, *, overwrite: bool = False,
                seconds: float = 0.0) -> dict:
    """Publish `output/tasks.jsonl` (the task format) with a records manifest, as one directory
    (so `--tasks=output` and `--input=output --text-field=prompt` read it); returns the manifest."""
    import collections
    import platform
    from pathlib import Path

    from phi_jax.data import records
    from phi_jax.fileio import staged_directory

    inputs = [{"path": "default", "sha256": corpus.corpus_hash(), "python": platform.python_version()}]
    with staged_directory(output, overwrite=overwrite) as tmp:
        writer = records.ShardWriter(Path(tmp) / TASKS_FILE, "jsonl")
        for task in tasks:
            writer.write(task.to_json())
        manifest = records.new_manifest("tasks", parameters, inputs)
        counts = collections.Counter(f"type_{t.type}" for t in tasks)
        counts.update(f"split_{t.split}" for t in tasks)
        manifest.update(status="complete", outputs=[writer.commit()], wall_seconds=round(seconds, 3),
                        counts={"records_in": 0, "records_out": len(tasks), "dropped": {},
                                "stage": dict(sorted(counts.items()))})
        records.write_manifest(tmp, manifest)
    return manifest
