"""Fault injection for tests: not user configuration, so it lives here and not in the config.

Tests set PHI_JAX_FAULTS to a JSON object before the trainer starts (in-process with
monkeypatch.setenv, or in a subprocess's environment):
  {"nan_at": [2, 3]}                 the loss and gradients of these steps are multiplied by NaN
  {"kill_after_save_start": 4}       SIGKILL the process right after the save of step 4 started
  {"engine_fail_at_decode": 1}       the serving engine's first decode call raises (a fatal,
                                     shared failure: the server must exit non-zero)
  {"engine_fail_prefill_of": [5, 6]} admitting a request whose prompt is exactly these ids
                                     raises (one request fails; the others carry on)
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


class InjectedFault(RuntimeError):
    """Raised by the serving hooks below."""


def engine_decode(call_number: int) -> None:
    if _faults().get("engine_fail_at_decode") == call_number:
        raise InjectedFault(f"injected failure of decode call {call_number}")


def engine_prefill(prompt: list[int]) -> None:
    if _faults().get("engine_fail_prefill_of") == list(prompt):
        raise InjectedFault("injected failure of this request's prefill")
