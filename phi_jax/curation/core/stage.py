"""A stage is a plain function over batches of records; this module runs one over one shard.

    step = stage.make_step()                 # once per worker: opens clients, loads models
    out = step(records, counts)              # a batch in, the records to keep out
    counts.drop("below_min_quality")         # every record not returned is counted, with why
    counts.log({"id": ..., "why": ...})      # a row of the stage's log (Stage.log_name), if it has one

A step may also have `begin_shard(shard, output)`, called before a shard's first batch (a
whole-corpus stage reads what its `prepare` pass decided for that shard), and `close()`.

Runners (`runners/local.py`, `runners/beam.py`) only decide *where* `process_shard` runs; the
shard's records, its output file and its completion marker are the same whichever runs it, which
is why a local run and a Beam run of the same stage write the same bytes.

A shard is finished when its marker (`.shards/part-NNNNN.json`) exists: the output file is
renamed into place first, its log rows (`.shards/part-NNNNN.log.jsonl`) next, the marker last, so
a run killed at any point redoes exactly the shards without a marker.

Whole-corpus stages (dedup) add `Stage.prepare`: a pass over all shards that `run_stage` runs
before the per-shard one, keeping its intermediate files under `OUTPUT/.work/` (resumable in its
own steps, removed once the output is complete). An output in a bucket (gs://...) keeps the same
files and the same order of publication (each is one object upload, whole or absent); only
`.work/`, which whole-corpus passes need on a real disk, is then a local scratch directory
(`work_dir`), so those passes resume only on the machine that started them.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Protocol

from phi_jax import fileio
from phi_jax.data.records import InputShard, ShardWriter, batched, shard_filename
from phi_jax.errors import RunError
from phi_jax.fileio import atomic_write_bytes, atomic_write_json

MARKERS = ".shards"
WORK = ".work"


class Counts:
    """What a step saw in one shard: records dropped (by reason), stage counters, log rows."""

    def __init__(self):
        self.dropped: collections.Counter = collections.Counter()
        self.stage: collections.Counter = collections.Counter()
        self.rows: list[dict] = []

    def drop(self, reason: str, n: int = 1) -> None:
        self.dropped[reason] += n

    def add(self, name: str, n: int = 1) -> None:
        self.stage[name] += n

    def log(self, row: dict) -> None:
        """A row for the stage's log file (`Stage.log_name`, e.g. removed.jsonl), in record order."""
        self.rows.append(row)


class PlannedInputs(Protocol):
    """Inputs that are computed rather than read from files (a synthesis plan).

    `run_stage` shards them like files, so per-shard resume, markers and the manifest apply
    unchanged. The shards behave like `InputShard` (`index`, `name`, `size`, `describe()`,
    `read()`) and pickle (they travel to worker processes and Beam); `read()` must be a pure
    function of the shard, so a rerun redoes a shard with exactly the same records.
    """

    def plan_shards(self, shard_size: int) -> list: ...

    def fingerprints(self) -> list[dict[str, Any]]: ...


class Step(Protocol):
    def __call__(self, records: list[dict], counts: Counts) -> list[dict]: ...


@dataclasses.dataclass(frozen=True)
class Stage:
    """What a runner needs to run a step anywhere (it is pickled to worker processes and Beam).

    Attributes:
      name: the stage's name (`annotate`, `score`, ...), recorded in the manifest.
      make_step: builds the step in the process that runs it; a picklable callable
        (a module-level function or a `functools.partial` of one). The step may have `close()`.
      parameters: everything the output depends on; a rerun into the same output must match.
      settings: how it ran (concurrency, timeouts); recorded, free to change between resumes.
      batch_size: records per step call.
      log_name: the file (in the output directory) that gathers every shard's `counts.log` rows,
        in shard order; "" when the stage logs nothing.
      prepare: a whole-corpus pass run before the per-shard one (see `Prepare`), or None.
    """

    name: str
    make_step: Callable[[], Step]
    parameters: dict[str, Any]
    settings: dict[str, Any] = dataclasses.field(default_factory=dict)
    batch_size: int = 64
    log_name: str = ""
    prepare: Callable[["Prepare"], dict] | None = None


@dataclasses.dataclass(frozen=True)
class Prepare:
    """What a stage's `prepare(ctx) -> dict` gets: every shard of the run and how to run.

    It runs under the output's lock, after the manifest is checked, and must be resumable (its
    files live under `work`); the dict it returns lands in the manifest as `global`.
    """

    shards: tuple[InputShard, ...]
    output: Path
    runner: str
    workers: int
    beam_options: str | tuple[str, ...]
    progress: bool

    @property
    def work(self) -> Path:
        return work_dir(self.output)


def work_dir(output) -> Path:
    """OUTPUT/.work; for an output in a bucket, a local scratch directory keyed by its URL."""
    if fileio.is_remote(output):
        return fileio.scratch_dir(output) / WORK
    return Path(output) / WORK


def log_path(output, shard: InputShard):
    return fileio.as_path(output) / MARKERS / f"{shard.name}.log.jsonl"


def marker_path(output, shard: InputShard):
    return fileio.as_path(output) / MARKERS / f"{shard.name}.json"


def finished(output: Path, shard: InputShard, fmt: str) -> dict | None:
    """The shard's marker if the shard is complete (marker and an output file of the right size)."""
    path = marker_path(output, shard)
    try:
        marker = json.loads(path.read_text())
        out = fileio.as_path(output) / shard_filename(shard.name, fmt)
        if fileio.size(out) == marker["output"]["bytes"]:
            return marker
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def process_shard(step: Step, stage: Stage, shard: InputShard, output: Path, fmt: str,
                  on_batch: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Run `step` over one shard, publish its output, then its marker; returns the marker."""
    start = time.perf_counter()
    counts = Counts()
    begin = getattr(step, "begin_shard", None)
    if begin is not None:
        begin(shard, output)
    writer = ShardWriter(fileio.as_path(output) / shard_filename(shard.name, fmt), fmt)
    records_in = 0
    try:
        for batch in batched(shard.read(), stage.batch_size):
            kept = step(batch, counts)
            for record in kept:
                writer.write(record)
            records_in += len(batch)
            if on_batch is not None:
                on_batch(len(batch))
        lost = records_in - writer.records - sum(counts.dropped.values())
        if lost:
            raise RunError(f"stage {stage.name!r} returned {writer.records} of {records_in} records of "
                           f"{shard.describe()} but counted {sum(counts.dropped.values())} as dropped; "
                           "a step must count every record it drops (this is a bug in the step)")
        written = writer.commit()
    except BaseException:
        writer.abort()
        raise
    if stage.log_name:
        atomic_write_bytes(log_path(output, shard), b"".join(
            json.dumps(row, ensure_ascii=False).encode("utf-8") + b"\n" for row in counts.rows))
    marker = {"shard": shard.name, "input": shard.describe(), "output": written,
              "records_in": records_in, "records_out": written["records"],
              "dropped": dict(counts.dropped), "stage": dict(counts.stage),
              "seconds": round(time.perf_counter() - start, 3), "pid": os.getpid()}
    atomic_write_json(marker_path(output, shard), marker)
    return marker


def close_step(step: Step) -> None:
    close = getattr(step, "close", None)
    if close is not None:
        close()


def record_shard_error(output: Path, shard: InputShard, error: Exception) -> None:
    """Leave a user-facing error where the driver finds it (runners whose workers are elsewhere)."""
    atomic_write_json(fileio.as_path(output) / MARKERS / f"{shard.name}.error.json",
                      {"type": type(error).__name__, "message": str(error)})


def shard_error(output: Path, shards) -> Exception | None:
    """The first recorded error of `shards`, rebuilt as its phi_jax error class."""
    from phi_jax import errors

    for shard in shards:
        path = fileio.as_path(output) / MARKERS / f"{shard.name}.error.json"
        try:
            found = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        cls = getattr(errors, found.get("type", ""), None)
        if not (isinstance(cls, type) and issubclass(cls, errors.PhiJaxError)):
            cls = errors.RunError
        return cls(found.get("message", "a shard failed"))
    return None
