"""The local runner: shards in this process (`workers=1`) or in spawned worker processes.

Each worker builds the step once (`stage.make_step()`: a teacher client, a loaded model) and then
takes shards one at a time; every shard's output is published atomically by `process_shard`, so a
killed run loses at most the shards that were in flight. Workers are spawned, never forked: a
forked child of a process running XLA's or httpx's threads can deadlock.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import queue as queue_lib
from pathlib import Path
from typing import Callable, Sequence

from phi_jax.curation.stage import Stage, close_step, process_shard
from phi_jax.data.records import InputShard
from phi_jax.errors import RunError

_WORKER: dict = {}


def run_local(stage: Stage, shards: Sequence[InputShard], output: Path, fmt: str, *, workers: int = 1,
              on_progress: Callable[[int], None] | None = None,
              on_shard: Callable[[dict], None] | None = None) -> None:
    """Process `shards` (the unfinished ones) with `workers` processes (1 = this process).

    on_progress(records) is called as records are processed; on_shard(marker) as shards finish.
    """
    if not shards:
        return
    if workers <= 1 or len(shards) == 1:
        step = stage.make_step()
        try:
            for shard in shards:
                marker = process_shard(step, stage, shard, output, fmt, on_batch=on_progress)
                if on_shard:
                    on_shard(marker)
        finally:
            close_step(step)
        return
    ctx = multiprocessing.get_context("spawn")
    progress = ctx.SimpleQueue()
    pool = concurrent.futures.ProcessPoolExecutor(min(workers, len(shards)), mp_context=ctx,
                                                  initializer=_init_worker, initargs=(stage, progress))
    pending: dict = {}
    try:
        pending = {pool.submit(_run_shard, shard, str(output), fmt): shard for shard in shards}
        while pending:
            done, _ = concurrent.futures.wait(pending, timeout=0.5,
                                              return_when=concurrent.futures.FIRST_COMPLETED)
            _drain(progress, on_progress)
            for future in done:
                shard = pending.pop(future)
                try:
                    marker = future.result()
                except concurrent.futures.process.BrokenProcessPool:
                    raise RunError(f"a worker process died while processing {shard.describe()} (out of "
                                   "memory or killed?); rerun the same command to resume: finished "
                                   "shards are kept") from None
                if on_shard:
                    on_shard(marker)
        _drain(progress, on_progress)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _drain(progress, on_progress) -> None:
    while not progress.empty():
        try:
            n = progress.get()
        except (queue_lib.Empty, EOFError, OSError):
            return
        if on_progress:
            on_progress(n)


def _init_worker(stage: Stage, progress) -> None:
    import atexit
    import logging

    logging.basicConfig(level=logging.WARNING)
    _WORKER.update(stage=stage, step=stage.make_step(), progress=progress)
    atexit.register(close_step, _WORKER["step"])


def _run_shard(shard: InputShard, output: str, fmt: str) -> dict:
    return process_shard(_WORKER["step"], _WORKER["stage"], shard, Path(output), fmt,
                         on_batch=_WORKER["progress"].put)
