"""Every script in examples/ runs as a researcher would run it (`python examples/NAME.py`, tiny
sizes by default) and prints something: an example that rots fails CI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))


def test_there_are_examples():
    assert EXAMPLES, "examples/ holds no scripts"


@pytest.mark.slow
@pytest.mark.parametrize("script", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_runs(script):
    # As the docs say to run it: `python examples/NAME.py` from the repository root, on the one
    # device a user has (not the suite's 8 fake ones).
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    env.pop("XLA_FLAGS", None)
    result = subprocess.run([sys.executable, str(script.relative_to(ROOT))], cwd=ROOT, capture_output=True,
                            text=True, timeout=180, env=env)
    assert result.returncode == 0, f"{script.name} exited {result.returncode}:\n{result.stderr[-4000:]}"
    assert result.stdout.strip(), f"{script.name} printed nothing"
