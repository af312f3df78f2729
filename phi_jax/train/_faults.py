"""Fault injection for tests: not user configuration, so it lives here and not in the config.

Tests set PHI_JAX_FAULTS to a JSON object before the trainer starts (in-process with
monkeypatch.setenv, or in a subprocess's environment):
  {"nan_at": [2, 3]}                 the loss and gradients of these steps are multiplied by NaN
  {"kill_after_save_start": 4}       SIGKILL the process right after the save of step 4 started
Unset (the only state users ever see), every hook is off.
"""

from __future__ import annotations

import json
import os
import signal

ENV = "PHI_JAX_FAULTS"


def _faults() -> dict:
    text = os.environ.get(ENV, "")
    return json.loads(text) if text else {}


def nan_steps() -> tuple[int, ...]:
    return tuple(int(s) for s in _faults().get("nan_at", ()))


def after_save_started(step: int) -> None:
    if _faults().get("kill_after_save_start") == step:
        os.kill(os.getpid(), signal.SIGKILL)  # the save is still in flight
