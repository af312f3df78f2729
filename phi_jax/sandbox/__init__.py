"""Running untrusted Python (model-written code, teacher-written exercises) in a sandbox.

Both evaluation (HumanEval) and curation (executed synthetic exercises) use it, so it is a
package of its own rather than part of either. See `execute.py` for what is and is not isolated.

    result = sandbox.run_python(source, limits=sandbox.Limits(timeout_s=5))
    result.status, result.reason, result.stdout
    verdict = sandbox.run_checked(solution + tests, limits=...)   # passes only if the tests finished
"""

from phi_jax.sandbox.execute import (SANDBOX_DIR, Limits, Protections, SandboxResult, default_backend,
                                     default_python, run_python)
from phi_jax.sandbox.harness import CheckResult, run_checked

__all__ = ["CheckResult", "Limits", "Protections", "SANDBOX_DIR", "SandboxResult", "default_backend",
           "default_python", "run_checked", "run_python"]
