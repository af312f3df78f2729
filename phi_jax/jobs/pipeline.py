"""The one pipeline orchestrator: named stages in order, each resumable, over one marker directory.

    outcomes = run_pipeline([Step("filter", run=do_filter, output=out / "filter"), ...],
                            marks=workdir / "stages", on_outcome=print_line)

Both jobs that chain stages use it: the main job's curation (`phi_jax.jobs.curate`: annotate ->
filter -> dedup -> decontaminate under WORKDIR/curated) and the phi-1 recipe (`phi_jax.jobs.recipe`).
So they share one resume mechanism:

  * one marker format: MARKS/<stage>.json = {"status": "done" | "skipped", "result": {...},
    "seconds": s, "settings": {...}, "reason": why skipped, plus what the job adds}, written
    atomically (through `phi_jax.fileio`, so a gs:// workdir keeps its markers in the bucket);
  * one rule for "done": the marker says done and the stage's output still exists (delete a
    stage's output to redo it), or, where a stage knows better (a curation stage's manifest
    records its inputs' hashes), its own `complete` check says so;
  * one "settings differ" check (`settings_differ`): a stage made with other settings is refused
    rather than silently mixed with new ones, since later stages (and checkpoints) were made from it;
  * a stage that cannot run here raises `StageSkipped(reason)`: recorded, not an error, and asked
    again on the next run.
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any, Callable

from phi_jax import fileio
from phi_jax.errors import InputError

ALREADY_DONE = "skipped (already done)"


class StageSkipped(Exception):
    """A stage that cannot run here, with the reason (recorded in its marker, not an error)."""


@dataclasses.dataclass
class Step:
    """One stage of a pipeline.

    run: does the work and returns the stage's result (JSON-able); may raise `StageSkipped`.
    output: the stage's output path; a marker whose output is gone is stale (the stage reruns).
    settings: what the stage was made with (JSON-able); a marker with other settings is refused.
    complete: `complete(marker or None)` -> the result of an output that is already whole (the
      stage is not run), or None to run it; replaces the marker's own "done" when given.
    off: a reason the stage is switched off (it is passed over and reported as "off").
    """

    name: str
    run: Callable[[], dict] | None = None
    output: Any = None
    settings: Any = None
    complete: Callable[[dict | None], dict | None] | None = None
    off: str = ""


def settings_differ(where: Any, problems: list[str]) -> InputError:
    """The one error for an output made with other settings or inputs."""
    return InputError(f"{where} was made with other settings or inputs ({'; '.join(problems)[:300]}); "
                      "rerun with its settings to resume, use a new --workdir, or delete it and the "
                      "stages after it to redo them")


def read_marker(marks: Any, name: str) -> dict | None:
    """The saved marker of stage `name`, or None (absent or unreadable: the stage runs again)."""
    try:
        return json.loads(fileio.as_path(marks).joinpath(f"{name}.json").read_text())
    except (OSError, ValueError):
        return None


def run_pipeline(steps: list[Step], marks: Any, *,
                 on_outcome: Callable[[str, dict], None] | None = None,
                 decorate: Callable[[str, dict], None] | None = None) -> dict[str, dict]:
    """Run (or skip, or resume) `steps` in order; returns {stage: outcome} (the marker's content,
    with "rerun" set on a stage already done).

    on_outcome(name, outcome): called as each stage finishes (the jobs print their line there).
    decorate(name, outcome): adds job-specific fields before the marker is written.
    """
    marks = fileio.as_path(marks)
    outcomes: dict[str, dict] = {}
    for step in steps:
        if step.off:
            out = {"status": "off", "reason": step.off}
        else:
            out = _run_step(step, marks, decorate)
        outcomes[step.name] = out
        if on_outcome:
            on_outcome(step.name, out)
    return outcomes


def _run_step(step: Step, marks, decorate) -> dict:
    saved = read_marker(marks, step.name)
    if saved is not None and step.output is not None and not fileio.as_path(step.output).exists():
        saved = None  # its output was deleted: redo it
    settings = None if step.settings is None else json.loads(json.dumps(step.settings))
    if saved is not None and settings is not None and saved.get("settings") is not None:
        from phi_jax.data import records

        problems = records.parameter_differences(saved["settings"], settings)
        if problems:
            raise settings_differ(step.output if step.output is not None else marks, problems)
    if step.complete is not None:
        result = step.complete(saved)
    else:
        result = saved["result"] if saved is not None and saved.get("status") == "done" else None
    mark = marks / f"{step.name}.json"
    if result is not None:
        out = {**(saved or {}), "status": "done", "result": result}
        if saved is None or saved.get("result") != json.loads(json.dumps(result)):
            fileio.atomic_write_json(mark, out)
        return {**out, "rerun": ALREADY_DONE}
    start = time.perf_counter()
    try:
        out = {"status": "done", "result": step.run()}
    except StageSkipped as e:
        out = {"status": "skipped", "reason": str(e)}
    out["seconds"] = round(time.perf_counter() - start, 1)
    if settings is not None:
        out["settings"] = settings
    if decorate:
        decorate(step.name, out)
    fileio.atomic_write_json(mark, out)
    return out
