"""The local runner: shards in this process (`workers=1`) or in spawned worker processes.

Each worker builds the step once (`stage.make_step()`: a teacher client, a loaded model) and then
takes shards one at a time; every shard's output is published atomically by `process_shard`, so a
killed run loses at most the shards that were in flight. Workers are spawned, never forked: a
forked child of a process running XLA's or httpx's threads can deadlock.
"""

from __future__ import annotations

import concurrent.futures
import functools
import multiprocessing
import queue as queue_lib
from pathlib import Path
from typing import Any, Callable, Sequence

from phi_jax.curation.core.stage import Stage, close_step, process_shard
from phi_jax.data.records import InputShard
from phi_jax.errors import RunError

_WORKER: dict = {}


def run_local(stage: Stage, shards: Sequence[InputShard], output: Path, fmt: str, *, workers: int = 1,
              on_progress: Callable[[int], None] | None = None,
              on_shard: Callable[[dict], None] | None = None) -> None:
    """Process `shards` (the unfinished ones) with `workers` processes (1 = this process).

    on_progress(records) is called as records are processed; on_shard(marker) as shards finish.
    """
    map_shards(functools.partial(_StageWorker, stage, str(output), fmt), shards, workers=workers,
               on_progress=on_progress, on_result=on_shard)


def map_shards(make_worker: Callable[[], Callable[[InputShard, Callable[[int], None]], Any]],
               shards: Sequence[InputShard], *, workers: int = 1,
               on_progress: Callable[[int], None] | None = None,
               on_result: Callable[[Any], None] | None = None) -> None:
    """`worker(shard, on_progress)` for every shard, `worker = make_worker()` built once per process.

    The one process pool of the local runner: stages run `process_shard` through it, and
    whole-corpus stages their per-shard passes (dedup's signatures). `make_worker` must pickle.
    """
    if not shards:
        return
    if workers <= 1 or len(shards) == 1:
        worker = make_worker()
        try:
            for shard in shards:
                result = worker(shard, on_progress or _ignore)
                if on_result:
                    on_result(result)
        finally:
            close_step(worker)
        return
    ctx = multiprocessing.get_context("spawn")
    progress = ctx.SimpleQueue()
    pool = concurrent.futures.ProcessPoolExecutor(min(workers, len(shards)), mp_context=ctx,
                                                  initializer=_init_worker, initargs=(make_worker, progress))
    pending: dict = {}
    try:
        pending = {pool.submit(_run_shard, shard): shard for shard in shards}
        while pending:
            done, _ = concurrent.futures.wait(pending, timeout=0.5,
                                              return_when=concurrent.futures.FIRST_COMPLETED)
            _drain(progress, on_progress)
            for future in done:
                shard = pending.pop(future)
                try:
                    result = future.result()
                except concurrent.futures.process.BrokenProcessPool:
                    raise RunError(f"a worker process died while processing {shard.describe()} (out of "
                                   "memory or killed?); rerun the same command to resume: finished "
                                   "shards are kept") from None
                if on_result:
                    on_result(result)
        _drain(progress, on_progress)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


class _StageWorker:
    """A stage's step, built once per process, run over one shard at a time."""

    def __init__(self, stage: Stage, output: str, fmt: str):
        self._stage, self._output, self._fmt = stage, output, fmt
        self._step = stage.make_step()

    def __call__(self, shard: InputShard, on_progress: Callable[[int], None]) -> dict:
        return process_shard(self._step, self._stage, shard, self._output, self._fmt, on_batch=on_progress)

    def close(self) -> None:
        close_step(self._step)


def _ignore(n: int) -> None:
    pass


def _drain(progress, on_progress) -> None:
    while not progress.empty():
        try:
            n = progress.get()
        except (queue_lib.Empty, EOFError, OSError):
            return
        if on_progress:
            on_progress(n)


def _init_worker(make_worker, progress) -> None:
    import atexit
    import logging

    logging.basicConfig(level=logging.WARNING)
    _WORKER.update(worker=make_worker(), progress=progress)
    atexit.register(close_step, _WORKER["worker"])


def _run_shard(shard: InputShard):
    return _WORKER["worker"](shard, _WORKER["progress"].put)
