"""Dedup's buckets as a Beam pipeline: the keyed transform beside the per-shard one.

    shards | Reshuffle | ParDo(sketch: (band key, doc) per band) | GroupByKey
           | FlatMap(bucket -> edges doc -> smallest doc) | BatchElements | ParDo(write edge file)

Each shard is sketched by the very function the local runner uses (`index.sketch_shard`,
published under OUTPUT/.work/dedup/sketch/, so a rerun does not sketch it again); Beam's shuffle
then does what the local runner's sorted key ranges do. The edge files hold the same links, so the
driver's components pass (`index.cluster`) decides the same documents, and the outputs of
the two runners are byte-identical. The driver keeps one int64 per document there.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Sequence

import numpy as np

from phi_jax.curation.core.runners.beam import beam, run_pipeline
from phi_jax.curation.core.stage import record_shard_error
from phi_jax.curation.dedup import index
from phi_jax.data.records import InputShard
from phi_jax.errors import PhiJaxError
from phi_jax.fileio import atomic_write_json


class _SketchShard(beam.DoFn):
    """A shard -> its bucket entries as (key, doc); keys as signed int64 (Beam's int coder)."""

    def __init__(self, config, work: str, starts: dict[int, int], output: str):
        super().__init__()
        self._config, self._work, self._starts, self._output = config, work, starts, output

    def process(self, shard: InputShard):
        try:
            directory = index.sketch_shard(shard, self._starts[shard.index], Path(self._work), self._config)
        except PhiJaxError as e:
            record_shard_error(Path(self._output), shard, e)
            raise
        keys, docs = index.shard_entries(directory)
        yield from zip(np.asarray(keys).view(np.int64).tolist(), np.asarray(docs).tolist())


def _bucket_edges(item):
    _, docs = item
    docs = sorted(set(docs))
    for doc in docs[1:]:
        yield doc, docs[0]


class _WriteEdges(beam.DoFn):
    def __init__(self, work: str):
        super().__init__()
        self._work = work

    def process(self, batch):
        edges = np.asarray(batch, np.int64).reshape(-1, 2)
        index.save_npy(index.edges_dir(Path(self._work)) / f"beam-{uuid.uuid4().hex}.npy", edges)
        yield len(edges)


def beam_edges(config, shards: Sequence[InputShard], starts: np.ndarray, work: Path, *,
               options: str | Sequence[str] = (), workers: int = 1) -> None:
    """Passes 1-2 as one Beam pipeline; then marks the edges done (a failed run leaves no mark)."""
    output = Path(work).parents[1]
    index.edges_dir(work).mkdir(parents=True, exist_ok=True)
    offsets = {s.index: int(starts[i]) for i, s in enumerate(shards)}
    run_pipeline(lambda p: (p | "Shards" >> beam.Create(list(shards), reshuffle=False)
                            | "Spread" >> beam.Reshuffle()
                            | "Sketch" >> beam.ParDo(_SketchShard(config, str(work), offsets, str(output)))
                            | "Buckets" >> beam.GroupByKey()
                            | "Edges" >> beam.FlatMap(_bucket_edges)
                            | "Batch" >> beam.BatchElements(min_batch_size=1, max_batch_size=1 << 16)
                            | "Write" >> beam.ParDo(_WriteEdges(str(work)))),
                 shards, output, options=options, workers=workers)
    atomic_write_json(index.edges_dir(work) / "done.json", {"runner": "beam",
                                                           "files": len(index.edge_files(work))})
