"""Synthetic exercises: cut the teacher's code into prompt, solution and check; keep what runs.

phi-1's CodeExercises are a function signature with a docstring (the prompt) followed by its body
(the solution). The teacher is asked for one fenced ```python block holding imports, one function
with a docstring and its body, and a HumanEval-style `def check(candidate):` of assertions.
`parse_exercise` reads that block with `ast`:

    prompt   = the block from its first line through the end of the function's docstring
               (imports, helpers defined before it, the signature, the docstring)
    solution = the rest of the block (the body, and anything after it), without the check
    check    = the source of `def check(candidate): ...`
A top-level call of `check(...)` or an `if __name__ == "__main__":` block is left out (the harness
calls the check itself); anything else the teacher wrote stays, and runs.

`run_exercise` executes `prompt + solution + check + check(entry_point)` in the sandbox (no
network, read-only filesystem but for its work dir, time, memory, process and file-size limits)
under the nonce-guarded harness, so an exercise is kept only when its solution passes its own
check to the end: an early exit, a crash, a fork bomb or an endless loop never passes.

The training form of a kept exercise is `{"prompt": prompt, "completion": solution}` (see
`training_pair`), which `phi_jax.data` reads with the loss on the completion only.
"""

from __future__ import annotations

import ast
import dataclasses
import re

from phi_jax import sandbox

# Why an answer is not an exercise; execution adds failed / timeout.
PARSE_REASONS = ("no_code_block", "unparsable", "no_check", "no_documented_function")
# The shape `parse_exercise` needs, as a regex a teacher endpoint can constrain its answer with
# (vLLM's `structured_outputs`; `phi-jax serve` takes it too): one fenced python block holding a
# function with a docstring and a `def check(candidate):`. Only the shape: the code may still fail.
ANSWER_REGEX = (r'(?s)```python\n.*def [A-Za-z_][A-Za-z0-9_]*\(.*\).*:\n[ \t]+(""".*"""|' + r"'''.*''')"
                + r'.*\ndef check\(candidate\):\n.*\n```')
_FENCE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)(?:\n[ \t]*```|\Z)", re.S | re.I)


@dataclasses.dataclass(frozen=True)
class Exercise:
    prompt: str
    solution: str
    check: str
    entry_point: str

    @property
    def text(self) -> str:
        """The exercise as training text: prompt + solution (the check is not part of it)."""
        return self.prompt + self.solution

    def program(self) -> str:
        return f"{self.text.rstrip()}\n\n\n{self.check.rstrip()}\n\n\ncheck({self.entry_point})\n"


@dataclasses.dataclass(frozen=True)
class Rejected:
    """An answer that is not a usable exercise: `reason` (one of PARSE_REASONS) and why."""

    reason: str
    detail: str


def code_block(answer: str) -> tuple[str | None, str]:
    """The first fenced code block of an answer (python, py or unlabelled), and a note if cut off."""
    found = _FENCE.search(answer)
    if found is None:
        return None, "the answer has no fenced ``` code block"
    closed = found.group(0).rstrip().endswith("```")
    return found.group(1), "" if closed else " (the block is not closed: cut at max_tokens?)"


def parse_exercise(answer: str) -> Exercise | Rejected:
    """The teacher's answer -> an `Exercise`, or `Rejected` naming what is missing."""
    code, note = code_block(answer)
    if code is None:
        return Rejected("no_code_block", note)
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError) as e:
        return Rejected("unparsable", f"{type(e).__name__}: {getattr(e, 'msg', e)} (line "
                                      f"{getattr(e, 'lineno', '?')}){note}")
    lines = code.splitlines(keepends=True)
    checks = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "check"]
    if not checks:
        return Rejected("no_check", "no top-level `def check(candidate):`")
    check = checks[-1]
    if len(check.args.args) != 1 or not any(isinstance(n, ast.Assert) for n in ast.walk(check)):
        return Rejected("no_check", "`check` must take one argument (the candidate) and assert something")
    functions = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
                 and n.name != "check" and ast.get_docstring(n) is not None]
    if not functions:
        return Rejected("no_documented_function", "no top-level function with a docstring besides `check`")
    # The entry point is the documented function no other function calls (helpers are called).
    called = {n.func.id for f in functions for n in ast.walk(f)
              if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id != f.name}
    entry = ([f for f in functions if f.name not in called] or functions)[-1]
    docstring = entry.body[0]
    if len(entry.body) < 2 or entry.body[1].lineno <= docstring.end_lineno:
        return Rejected("no_documented_function", f"`{entry.name}` has no body after its docstring "
                                                  "(on lines of its own)")
    dropped = set()
    for node in tree.body:
        if node is check or _calls_check(node) or _is_main_guard(node):
            start = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
            dropped.update(range(start - 1, node.end_lineno))
    kept = [(i, line) for i, line in enumerate(lines) if i not in dropped]
    cut = docstring.end_lineno  # lines [0, cut) are the prompt
    prompt = "".join(line for i, line in kept if i < cut)
    solution = "".join(line for i, line in kept if i >= cut).rstrip() + "\n"
    check_source = "".join(lines[min([check.lineno] + [d.lineno for d in check.decorator_list]) - 1:
                                 check.end_lineno])
    if not prompt.endswith("\n"):
        prompt += "\n"
    return Exercise(prompt, solution, check_source, entry.name)


def _calls_check(node: ast.stmt) -> bool:
    return (isinstance(node, ast.Expr) and isinstance(node.value, ast.Call)
            and isinstance(node.value.func, ast.Name) and node.value.func.id == "check")


def _is_main_guard(node: ast.stmt) -> bool:
    return (isinstance(node, ast.If) and isinstance(node.test, ast.Compare)
            and isinstance(node.test.left, ast.Name) and node.test.left.id == "__name__")


@dataclasses.dataclass(frozen=True)
class ExecutionLimits:
    """Limits of one exercise's run in the sandbox."""

    timeout_s: float = 10.0
    memory_bytes: int = 512 << 20
    processes: int = 16

    def sandbox_limits(self) -> sandbox.Limits:
        return sandbox.Limits(timeout_s=self.timeout_s, memory_bytes=self.memory_bytes,
                              processes=self.processes)


def run_exercise(exercise: Exercise, limits: ExecutionLimits, *, backend: str = "auto"
                 ) -> sandbox.CheckResult:
    """The exercise's solution against its own check, in the sandbox under the nonce harness."""
    return sandbox.run_checked(exercise.program(), limits=limits.sandbox_limits(), backend=backend)


def training_pair(record: dict) -> dict:
    """A kept exercise record -> {"id", "prompt", "completion"} (the loss goes on the completion)."""
    meta = record["meta"]
    return {"id": record["id"], "prompt": meta["prompt"], "completion": meta["solution"]}
