"""Run a stage over inputs into an output directory: plan, resume, run, manifest, summary.

    manifest = run_stage(stage, "data/*.jsonl", "out/annotated", runner="local", workers=4)
    print(summary(manifest))

`run_stage` owns everything around the step, the same for every stage and runner:
  * the inputs are cut into shards (`phi_jax.data.records.plan_shards`) and fingerprinted;
  * an output that already has a manifest is *resumed* when its stage, parameters and inputs are
    the same (finished shards are kept, the rest are redone) and *refused* when they differ,
    naming what differs, unless `overwrite=True`;
  * one process at a time writes an output (a lock file; a second run gets a clear error);
  * a whole-corpus stage's `prepare` pass (dedup: signatures, buckets, components) runs first
    when any shard is unfinished, its result kept in the manifest as `global`;
  * the runner (`local`: processes over shards; `beam`: an Apache Beam pipeline) processes the
    unfinished shards; then the manifest is completed from the shard markers, a stage's log rows
    are gathered into one file (`Stage.log_name`) and the `.work/` scratch directory is removed.
The output may be in a bucket (gs://...): the same files are published object by object in the
same order (shard, its log, its marker; the manifest last), so a resume, on any machine, trusts
exactly what a local run would. A bucket has no file locks: one run per output is then up to you.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator, Sequence

from phi_jax import fileio
from phi_jax.curation.core.stage import MARKERS, PlannedInputs, Prepare, Stage, finished, log_path, work_dir
from phi_jax.data import records
from phi_jax.errors import InputError, RunError

RUNNERS = ("local", "beam")
_LOCK = ".lock"


def run_stage(stage: Stage, inputs: str | Sequence[str] | PlannedInputs, output: str | os.PathLike, *,
              runner: str = "local", workers: int = 1, shard_size: int = 1000,
              output_format: str = "jsonl", text_field: str = "text", max_records: int = 0,
              overwrite: bool = False, beam_options: str | Sequence[str] = (), progress: bool = True) -> dict:
    """Run `stage` over `inputs` into `output`; returns the completed manifest.

    Args:
      stage: the step and its parameters (`phi_jax.curation.stage.Stage`).
      inputs: comma-separated string or list: files, globs, stage output dirs, "default"; or
        `PlannedInputs` (a generator stage's plan, e.g. synthesis prompts).
      output: the output directory (created; resumed if it holds this stage's unfinished run).
      runner: "local" or "beam".
      workers: local worker processes (1 = in this process); Beam DirectRunner workers.
      shard_size: records per shard (plain-text inputs: files per shard).
      output_format: "jsonl" or "arrayrecord".
      text_field: the text key of foreign JSON records.
      max_records: process only the first that many input records (0 = all).
      overwrite: replace an output written with other parameters or inputs.
      beam_options: Beam pipeline options (e.g. "--runner=DataflowRunner --project=p ...").
      progress: show a progress bar with ETA on stderr.
    """
    if runner not in RUNNERS:
        raise InputError(f"--runner={runner!r}; choose one of {', '.join(RUNNERS)}")
    if workers < 1:
        raise InputError(f"--workers={workers}: must be >= 1")
    fmt = records.output_format(output_format)
    fileio.check_bucket(output, "--output")
    output = fileio.as_path(output)
    shards, fingerprints, parameters = _plan(stage, inputs, shard_size=shard_size, fmt=fmt,
                                             text_field=text_field, max_records=max_records)
    started, clock = records.now(), time.perf_counter()
    with _locked(output):
        manifest = _prepare(output, stage, parameters, fingerprints, overwrite)
        manifest["status"] = "running"
        manifest["settings"] = {**stage.settings, "runner": runner, "workers": workers}
        if isinstance(inputs, (str, list, tuple)):
            manifest["upstream"] = records.upstream_manifests(inputs)
        records.write_manifest(output, manifest)
        todo = [s for s in shards if finished(output, s, fmt) is None]
        _clean_partial(output)
        if todo and stage.prepare is not None:
            manifest["global"] = stage.prepare(Prepare(tuple(shards), output, runner, workers,
                                                       beam_options, progress))
            records.write_manifest(output, manifest)
        bar = progress_bar(stage.name, sum(s.size for s in shards), sum(s.size for s in todo),
                            enabled=progress)
        try:
            if runner == "local":
                from phi_jax.curation.core.runners.local import run_local

                run_local(stage, todo, output, fmt, workers=workers, on_progress=bar.update)
            else:
                from phi_jax.curation.core.runners.beam import run_beam

                run_beam(stage, todo, output, fmt, options=beam_options, workers=workers)
                bar.update(sum(s.size for s in todo))
        finally:
            bar.close()
        markers = [finished(output, s, fmt) for s in shards]
        missing = [s.name for s, m in zip(shards, markers) if m is None]
        if missing:
            raise RunError(f"{len(missing)} shard(s) of {output} did not finish ({', '.join(missing[:5])}); "
                           "rerun the same command to resume")
        seconds = time.perf_counter() - clock
        manifest["runs"].append({"started": started, "seconds": round(seconds, 3), "runner": runner,
                                 "workers": workers, "shards_processed": len(todo),
                                 "shards_resumed": len(shards) - len(todo),
                                 "records_processed": sum(s.size for s in todo)})
        _complete(manifest, markers)
        if stage.log_name:
            _gather_log(output, shards, stage.log_name)
            manifest["log"] = stage.log_name
        records.write_manifest(output, manifest)
        shutil.rmtree(work_dir(output), ignore_errors=True)
    return manifest


def _plan(stage: Stage, inputs, *, shard_size: int, fmt: str, text_field: str, max_records: int):
    """(shards, input fingerprints, the parameters the output depends on) of a run."""
    if isinstance(inputs, (str, list, tuple)):
        shards = records.plan_shards(inputs, shard_size, text_field=text_field, max_records=max_records)
        if not shards:
            raise InputError(f"--input={inputs}: no records to process")
        fingerprints = records.input_fingerprints(shards)
    else:
        if shard_size < 1:
            raise InputError(f"--shard-size={shard_size}: must be >= 1")
        if max_records:
            raise InputError("--max-records applies to record inputs; a plan has its own count")
        shards, fingerprints = inputs.plan_shards(shard_size), inputs.fingerprints()
        if not shards:
            raise InputError(f"stage {stage.name!r}: its plan is empty; nothing to generate")
    parameters = {**stage.parameters, "shard_size": shard_size, "output_format": fmt,
                  "text_field": text_field, "max_records": max_records}
    return shards, fingerprints, parameters


def completed_run(stage: Stage, inputs: str | Sequence[str] | PlannedInputs, output: str | os.PathLike, *,
                  shard_size: int = 1000, output_format: str = "jsonl", text_field: str = "text",
                  max_records: int = 0) -> tuple[dict | None, list[str]]:
    """(manifest, differences) of what `output` holds for this run, without writing anything.

    The manifest is returned when the output is complete with the same stage, parameters and inputs
    (a rerun would do nothing: a chain of stages skips it); otherwise None, with what differs
    (empty when the output is new or unfinished, which `run_stage` starts or resumes).
    """
    fmt = records.output_format(output_format)
    _, fingerprints, parameters = _plan(stage, inputs, shard_size=shard_size, fmt=fmt,
                                        text_field=text_field, max_records=max_records)
    old = records.read_manifest(output) if fileio.as_path(output).is_dir() else None
    if old is None:
        return None, []
    problems = _differences(old, stage, parameters, fingerprints)
    return (old if not problems and old.get("status") == "complete" else None), problems


def _differences(old: dict, stage: Stage, parameters: dict, inputs: list[dict]) -> list[str]:
    problems = []
    if old.get("stage") != stage.name:
        problems.append(f"stage: {old.get('stage')!r} -> {stage.name!r}")
    problems += records.parameter_differences(old.get("parameters", {}), parameters)
    old_inputs = {i["path"]: i.get("sha256") for i in old.get("inputs", [])}
    new_inputs = {i["path"]: i.get("sha256") for i in inputs}
    if old_inputs != new_inputs:
        changed = sorted(p for p in set(old_inputs) | set(new_inputs) if old_inputs.get(p) != new_inputs.get(p))
        problems.append(f"inputs changed: {', '.join(changed[:4])}")
    return problems


def _prepare(output, stage: Stage, parameters: dict, inputs: list[dict], overwrite: bool) -> dict:
    """The manifest to continue (same stage, parameters and inputs) or a new one."""
    new = records.new_manifest(stage.name, parameters, inputs)
    old = records.read_manifest(output) if output.is_dir() else None
    if old is None:
        ours = {_LOCK, records.MANIFEST, "teacher_cache.sqlite"}
        strangers = sorted(p.name for p in output.iterdir() if p.name not in ours
                           and not p.name.startswith("teacher_cache.sqlite")) if output.is_dir() else []
        if strangers:
            raise InputError(f"--output={output} holds files that are not a phi-jax data output "
                             f"({', '.join(strangers[:4])}); choose a new or empty directory")
        return new
    problems = _differences(old, stage, parameters, inputs)
    if not problems:
        return old  # Same run: resume it.
    if not overwrite:
        raise InputError(f"--output={output} holds a {old.get('stage')} run with other settings "
                         f"({'; '.join(problems)[:400]}); rerun with its settings to resume, choose "
                         "another --output, or pass --overwrite to replace it")
    _remove_outputs(output, old)
    return new


def _remove_outputs(output, old: dict) -> None:
    """What run_stage wrote before (a teacher cache is kept: its answers are keyed by prompt).
    The manifest goes first: from then on nothing takes the output for a finished one."""
    (output / records.MANIFEST).unlink(missing_ok=True)
    for path in output.glob("part-*"):
        path.unlink()
    for name in [old.get("log")] + list(old.get("global", {}).get("files", [])):
        if name and "/" not in name:
            (output / name).unlink(missing_ok=True)
    fileio.rmtree(output / MARKERS)
    shutil.rmtree(work_dir(output), ignore_errors=True)


def _gather_log(output, shards, name: str) -> None:
    """Every shard's log rows, in shard order, into one file published atomically."""
    remote = fileio.is_remote(output)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.tmp-", dir=None if remote else output)
    try:
        with os.fdopen(fd, "wb") as out:
            for shard in shards:
                with log_path(output, shard).open("rb") as f:
                    shutil.copyfileobj(f, out)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, 0o644)
        if remote:
            fileio.upload_file(tmp, output / name)
            os.unlink(tmp)
        else:
            os.replace(tmp, output / name)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _clean_partial(output) -> None:
    """Temporary shard files and error notes of a killed or failed run."""
    if not fileio.is_remote(output):  # in a bucket, temporary files are never there
        for path in output.glob(".part-*.tmp-*"):
            path.unlink(missing_ok=True)
    if (output / MARKERS).is_dir():
        for path in (output / MARKERS).glob("*.error.json"):
            path.unlink(missing_ok=True)


def _complete(manifest: dict, markers: list[dict]) -> None:
    counts = {"records_in": 0, "records_out": 0, "dropped": {}, "stage": {}}
    for m in markers:
        counts["records_in"] += m["records_in"]
        counts["records_out"] += m["records_out"]
        for key in ("dropped", "stage"):
            for name, n in m[key].items():
                counts[key][name] = counts[key].get(name, 0) + n
    manifest.update(status="complete", counts=counts, outputs=[m["output"] for m in markers],
                    wall_seconds=round(sum(r["seconds"] for r in manifest["runs"]), 3),
                    updated=records.now(), versions=records.versions())


@contextlib.contextmanager
def _locked(output) -> Iterator[None]:
    if output.exists() and not output.is_dir():
        raise InputError(f"--output={output} is a file; give a directory")
    output.mkdir(parents=True, exist_ok=True)
    if fileio.is_remote(output):  # no locks on a bucket (see the module docstring)
        yield
        return
    with open(output / _LOCK, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InputError(f"another phi-jax run is writing {output}; wait for it to finish, or "
                             "choose another --output") from None
        yield


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(name: str, total: int, todo: int, *, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, initial=total - todo, desc=name, unit="doc", file=sys.stderr,
                mininterval=1.0, dynamic_ncols=True)


def summary(manifest: dict, output: str | os.PathLike = "") -> str:
    """One screen: what ran, records in/out, dropped by reason, stage counters, time and rate."""
    counts, run = manifest["counts"], manifest["runs"][-1]
    lines = [f"{manifest['stage']} -> {output or '(output)'}: {manifest['status']}",
             f"  shards      {run['shards_processed']} processed, {run['shards_resumed']} already done "
             f"({len(manifest['outputs'])} in all, runner {run['runner']})",
             f"  records     {counts['records_in']:,} in, {counts['records_out']:,} out"]
    for reason, n in sorted(counts["dropped"].items(), key=lambda kv: -kv[1]):
        lines.append(f"  dropped     {n:>10,}  {reason}")
    whole = manifest.get("global", {}).get("counts", {})  # a whole-corpus stage's own counters
    width = max((len(name) for name in [*counts["stage"], *whole]), default=0)
    for name, n in sorted(counts["stage"].items()):
        lines.append(f"  {name:<{width}}  {n:>12,}" if isinstance(n, int) else f"  {name:<{width}}  {n}")
    for name, n in whole.items():
        lines.append(f"  {name:<{width}}  {n:>12,}")
    rate = run["records_processed"] / run["seconds"] if run["seconds"] > 0 else 0.0
    per = f"{rate:,.1f} docs/s" if rate >= 1 or rate == 0 else f"{1 / rate:,.1f} s/doc"  # a slow teacher
    lines.append(f"  time        {run['seconds']:.1f} s this run ({per}), "
                 f"{manifest.get('wall_seconds', 0):.1f} s in all")
    return "\n".join(lines)
