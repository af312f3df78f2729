"""The Beam runner: the same stage, as an Apache Beam pipeline over shards.

    shards | Reshuffle | ParDo(process_shard)      (each DoFn instance builds the step in setup())

Beam distributes the shards over its workers (DirectRunner here and in tests; Dataflow, Flink or
Spark by passing their pipeline options) and retries failed bundles. Each element is a whole
shard, processed by the very function the local runner calls, so the outputs are byte-identical
and resume works the same way (finished shards are never sent to the pipeline). Whole-corpus
stages (dedup: band keys -> GroupByKey -> components) add a keyed transform beside this one.

Import this module only when the Beam runner is asked for: it imports apache_beam (seconds).
The output directory must be one every worker reaches (local disk, NFS, or a gs:// bucket):
shards are published with a rename (in a bucket: one object upload each).
"""

from __future__ import annotations

import logging
import shlex
from pathlib import Path
from typing import Callable, Sequence

from phi_jax.curation.core.stage import (Stage, close_step, process_shard, record_shard_error,
                                    shard_error)
from phi_jax.data.records import InputShard
from phi_jax.errors import PhiJaxError, RunError, require


def _import_beam():
    """apache_beam, without the warnings it logs on import about cloud clients it does not need."""
    root, level = logging.getLogger(), logging.getLogger().level
    logging.getLogger("apache_beam").setLevel(logging.ERROR)
    root.setLevel(logging.ERROR)
    try:
        return require("apache_beam", extra="data", purpose="--runner=beam")
    finally:
        root.setLevel(level)


beam = _import_beam()

DEFAULT_OPTIONS = ("--runner=DirectRunner", "--direct_running_mode=in_memory")


def pipeline_options(options: str | Sequence[str], workers: int) -> list[str]:
    """The user's Beam options (a string is split as a shell would), or a quiet DirectRunner."""
    options = shlex.split(options) if isinstance(options, str) else list(options)
    if not options:
        options = [*DEFAULT_OPTIONS, f"--direct_num_workers={max(1, workers)}"]
    return options


class _ProcessShards(beam.DoFn):
    """`process_shard` as a DoFn. A user-facing error is also written beside the shard's marker,
    because Beam re-raises a worker's exception wrapped in its own types (or on another machine)."""

    def __init__(self, stage: Stage, output: str, fmt: str):
        super().__init__()
        self._stage, self._output, self._fmt = stage, output, fmt
        self._step = None

    def setup(self):
        self._step = self._stage.make_step()

    def process(self, shard):
        try:
            yield process_shard(self._step, self._stage, shard, self._output, self._fmt)
        except PhiJaxError as e:
            record_shard_error(self._output, shard, e)
            raise

    def teardown(self):
        if self._step is not None:
            close_step(self._step)


def run_beam(stage: Stage, shards: Sequence[InputShard], output: Path, fmt: str, *,
             options: str | Sequence[str] = (), workers: int = 1) -> None:
    if not shards:
        return
    run_pipeline(lambda p: (p | "Shards" >> beam.Create(list(shards), reshuffle=False)
                            | "Spread" >> beam.Reshuffle()
                            | stage.name >> beam.ParDo(_ProcessShards(stage, str(output), fmt))),
                 shards, output, options=options, workers=workers)


def run_pipeline(build: Callable, shards: Sequence[InputShard], output: Path, *,
                 options: str | Sequence[str] = (), workers: int = 1) -> None:
    """Run the pipeline `build(p)` lays out; a shard's recorded error (or a Beam failure) is
    raised as one phi_jax error."""
    from apache_beam.options.pipeline_options import PipelineOptions

    # Beam logs a failing DoFn's traceback at ERROR; the error reaches the user once, from here.
    logging.getLogger("apache_beam").setLevel(logging.CRITICAL)
    try:
        with beam.Pipeline(options=PipelineOptions(pipeline_options(options, workers))) as p:
            build(p)
    except Exception as e:  # noqa: BLE001 - Beam wraps a DoFn's error in its own exception types
        recorded = shard_error(output, shards)
        if recorded is not None:
            raise recorded from None
        if isinstance(e, PhiJaxError):
            raise
        text = " ".join(str(e).split())
        raise RunError(f"the Beam pipeline failed: {text[:500]}; finished shards are kept, rerun the "
                       "same command to resume") from e
