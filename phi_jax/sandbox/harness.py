"""A test program that passes only when its tests ran to the end: the nonce-guarded harness.

    result = run_checked(program, limits=sandbox.Limits(timeout_s=10))
    result.passed, result.status, result.reason

HumanEval (`phi_jax.evals.humaneval`) and executed synthetic exercises
(`phi_jax.curation.synthesis.exercises`) both judge code by running "solution + tests" in the sandbox, and
both need the same guarantee: exit status 0 is not enough. The program is run by a small runner
that reads a random nonce from stdin *before* executing it and prints the nonce only after the
program (whose last statement calls the tests) has returned. An early `os._exit(0)`,
`sys.exit(0)`, an `atexit` hook or a crash therefore never passes. (Code that deliberately
introspects the runner's frames could find the nonce; the sandbox, not the nonce, is what
contains hostile code.)
"""

from __future__ import annotations

import dataclasses
import secrets

from phi_jax.sandbox.execute import Limits, run_python

_MARK = b"PHI_JAX_CHECK_DONE "
_RUNNER = r"""
import os, sys
def _run():
    nonce = sys.stdin.buffer.readline().strip()
    sys.stdin.close()
    os.close(0)
    os.open(os.devnull, os.O_RDONLY)  # fd 0 again: input() sees EOF, not a bad descriptor
    with open("solution.py") as f:
        program = compile(f.read(), "solution.py", "exec")
    exec(program, {"__name__": "__main__", "__builtins__": __builtins__})
    sys.stdout.flush()
    sys.stderr.flush()
    os.write(1, b"\n" + MARK + nonce + b"\n")
    os._exit(0)  # skip atexit hooks and finalizers: the verdict is already written
_run()
""".replace("MARK", repr(_MARK))


@dataclasses.dataclass(frozen=True)
class CheckResult:
    """Verdict on one program. `status`: passed | failed | timeout | error (see `SandboxResult`)."""

    passed: bool
    status: str
    reason: str
    wall_s: float
    protections: str


def run_checked(program: str, *, limits: Limits | None = None, backend: str = "auto") -> CheckResult:
    """Run `program` (solution, tests, and the call of the tests) in the sandbox under the harness."""
    nonce = secrets.token_hex(16).encode()
    res = run_python(_RUNNER, stdin=nonce + b"\n", files={"solution.py": program},
                     limits=limits or Limits(), backend=backend)
    verified = _MARK + nonce in res.stdout.encode(errors="replace")
    if res.status == "passed" and verified:
        reason, status = "passed", "passed"
    elif res.status == "passed":
        reason, status = "exited with status 0 before the tests completed", "failed"
    else:
        reason, status = res.reason, res.status
    return CheckResult(passed=status == "passed", status=status, reason=reason, wall_s=res.wall_s,
                       protections=res.protections.summary() if res.protections else "none")
