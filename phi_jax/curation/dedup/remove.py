"""Near-duplicate removal: exact (normalised text) and MinHash-LSH near duplicates, one kept per cluster.

    result = near_duplicates(records, threshold=0.8)       # in memory: a list of records
    result.kept, result.clusters                            # records kept; what was removed for what
    run_stage(dedup_stage(threshold=0.8), "data/*.jsonl", "out/dedup", runner="local" | "beam")

Documents are normalised (`core.text.normalize`: curation's one word rule, as in decontamination), cut
into word 5-grams (or `unit="char"` n-grams), and MinHashed (`minhash.signatures`, rensa). Two
documents are linked when their normalised texts are equal (exact duplicates) or when they share
one of the LSH bands chosen from the threshold (`minhash.LshParams.choose`, the S-curve); clusters
are the connected components of these links, and the document kept in each is the *first in input
order* (the smallest document number), so adding data at the end never changes what was kept
before. A removed document is `exact` when its normalised text equals the kept one's, else `near`.

On a corpus (`dedup_stage` under `run_stage`) the whole-corpus passes of `index` run first
(locally in worker processes, or with `runner="beam"` as a Beam pipeline: band keys ->
GroupByKey -> edges), then the usual per-shard pass drops what they decided and writes the kept
records unchanged. OUTPUT/clusters.jsonl says what was removed in favour of what.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import json
import shutil
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from phi_jax.curation.core.stage import Counts, Prepare, Stage
from phi_jax.curation.dedup import index
from phi_jax.curation.dedup.minhash import LshParams
from phi_jax.curation.dedup.shingles import UNITS
from phi_jax.data.records import InputShard
from phi_jax.errors import InputError

CLUSTERS = "clusters.jsonl"
_REASON = {index.EXACT: "exact_duplicate", index.NEAR: "near_duplicate"}


@dataclasses.dataclass(frozen=True)
class DedupConfig:
    """What decides the output: the threshold and how documents are sketched.

    Attributes:
      threshold: Jaccard similarity of n-gram sets above which documents are near duplicates.
      ngram: units per shingle (datatrove: 5 words; NeMo Curator: 24 characters).
      unit: "word" or "char".
      num_perm: MinHash permutations (signature length); bands x rows <= num_perm.
      seed: the MinHash permutations' seed.
      fp_weight, fn_weight: weights of the S-curve's false positive / negative areas.
    """

    threshold: float = 0.8
    ngram: int = 5
    unit: str = "word"
    num_perm: int = 256
    seed: int = 0
    fp_weight: float = 0.2
    fn_weight: float = 0.8
    lsh: LshParams = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self):
        if self.unit not in UNITS:
            raise InputError(f"--unit={self.unit!r}; choose one of {', '.join(UNITS)}")
        if not 1 <= self.ngram <= 1000:
            raise InputError(f"--ngram={self.ngram}: give 1..1000 {self.unit}s per shingle (e.g. 5 words)")
        object.__setattr__(self, "lsh", LshParams.choose(self.threshold, self.num_perm, self.fp_weight,
                                                         self.fn_weight))

    def parameters(self) -> dict[str, Any]:
        return {"threshold": self.threshold, "ngram": self.ngram, "unit": self.unit,
                "num_perm": self.num_perm, "seed": self.seed, "fp_weight": self.fp_weight,
                "fn_weight": self.fn_weight, "bands": self.lsh.bands, "rows": self.lsh.rows,
                "keep": "first in input order"}


# ------------------------------------------------------------------------------ library, in memory

@dataclasses.dataclass
class DedupResult:
    """kept: the records kept, in input order; clusters: one dict per cluster of 2+ documents
    (the lines of clusters.jsonl; `doc` is the position in the input); lsh: the banding used."""

    kept: list[dict]
    clusters: list[dict]
    lsh: LshParams

    @property
    def removed(self) -> int:
        return sum(len(c["removed"]) for c in self.clusters)


def near_duplicates(records: Sequence[dict], threshold: float = 0.8, **options) -> DedupResult:
    """Deduplicate records held in memory (e.g. a batch of generated ones); `options` are the
    other `DedupConfig` fields. The same sketches, buckets and components as the corpus stage."""
    config = DedupConfig(threshold, **options)
    texts = [r["text"] for r in records]
    parts = [index.sketch(texts[a:a + 1024], config) for a in range(0, len(texts), 1024)] or \
        [index.sketch([], config)]
    sig, exact, keys = (np.concatenate([p[i] for p in parts]) for i in range(3))
    docs = np.repeat(np.arange(len(texts), dtype=np.int64), keys.shape[1])
    edges = index.bucket_edges(keys.reshape(-1), docs)
    label = index.components(len(texts), lambda: [edges])
    removed = np.flatnonzero(label != np.arange(len(texts)))
    kept = label[removed]
    order = np.lexsort((removed, kept))
    removed, kept = removed[order], kept[order]
    same = exact[removed] == exact[kept]
    jaccard = np.mean(sig[removed] == sig[kept], axis=1) if len(removed) else np.zeros(0)
    ids = [str(r.get("id", i)) for i, r in enumerate(records)]
    clusters = list(index.cluster_lines(removed, kept, same, jaccard, [ids[k] for k in kept],
                                        [ids[r] for r in removed]))
    dropped = set(removed.tolist())
    return DedupResult([r for i, r in enumerate(records) if i not in dropped], clusters, config.lsh)


# ------------------------------------------------------------------------------ the corpus stage

def dedup_stage(threshold: float = 0.8, **options) -> Stage:
    """The dedup stage for `run_stage`: whole-corpus passes (`prepare`), then a per-shard drop."""
    config = DedupConfig(threshold, **options)
    return Stage("dedup", _DedupStep, config.parameters(), batch_size=1024,
                 prepare=functools.partial(prepare, config))


def prepare(config: DedupConfig, ctx: Prepare) -> dict:
    """Passes 1-3 of `index` (each resumable); returns the manifest's `global` entry."""
    from phi_jax.curation.core.runners import progress_bar

    work = _work(ctx.work, config, ctx.shards)
    starts = index.offsets(ctx.shards)
    done = (index.edges_dir(work) / "done.json").is_file()
    if not done and ctx.runner == "beam":
        from phi_jax.curation.dedup.beam_buckets import beam_edges

        _clear_edges(work)
        beam_edges(config, ctx.shards, starts, work, options=ctx.beam_options, workers=ctx.workers)
    elif not done:
        from phi_jax.curation.core.runners.local import map_shards

        for path in index.edges_dir(work).glob("beam-*.npy"):
            path.unlink()
        todo = [s for s in ctx.shards if not (index.sketch_dir(work, s) / "ids.json").is_file()]
        bar = progress_bar("dedup: sketch", int(starts[-1]), sum(s.size for s in todo), enabled=ctx.progress)
        try:
            map_shards(functools.partial(_SketchWorker, str(work), config,
                                         {s.index: int(starts[i]) for i, s in enumerate(ctx.shards)}),
                       todo, workers=ctx.workers, on_progress=bar.update)
        finally:
            bar.close()
        index.local_edges(work, ctx.shards)
    counts = index.cluster(work, ctx.shards, ctx.output, CLUSTERS)
    return {"lsh": config.lsh.to_json(), "counts": counts, "files": [CLUSTERS],
            "minhash": f"rensa {importlib.metadata.version('rensa')} RMinHash"}


def _work(root: Path, config: DedupConfig, shards: Sequence[InputShard]) -> Path:
    """OUTPUT/.work/dedup, emptied if it holds the passes of another plan."""
    work = Path(root) / "dedup"
    plan = {"parameters": config.parameters(), "shards": [[s.name, s.describe(), s.size] for s in shards]}
    path = work / "plan.json"
    try:
        if json.loads(path.read_text()) != json.loads(json.dumps(plan)):
            shutil.rmtree(work)
    except (OSError, ValueError):
        shutil.rmtree(work, ignore_errors=True)
    if not path.is_file():
        from phi_jax.fileio import atomic_write_json

        atomic_write_json(path, plan)
    return work


def _clear_edges(work: Path) -> None:
    for path in index.edges_dir(work).glob("*.npy"):
        path.unlink()


class _SketchWorker:
    def __init__(self, work: str, config: DedupConfig, starts: dict[int, int]):
        self._work, self._config, self._starts = Path(work), config, starts

    def __call__(self, shard: InputShard, on_progress) -> str:
        return str(index.sketch_shard(shard, self._starts[shard.index], self._work, self._config, on_progress))


class _DedupStep:
    """Drops the rows the components pass decided, counting each as exact or near duplicate."""

    def __init__(self):
        self._drop: dict[int, int] = {}
        self._row = 0

    def begin_shard(self, shard: InputShard, output: Path) -> None:
        from phi_jax.curation.core.stage import work_dir

        self._drop, self._row = index.load_decisions(work_dir(output) / "dedup", shard), 0

    def __call__(self, records: list[dict], counts: Counts) -> list[dict]:
        kept = []
        for record in records:
            why = self._drop.get(self._row)
            self._row += 1
            if why is None:
                kept.append(record)
            else:
                counts.drop(_REASON[why])
        counts.add("kept", len(kept))
        return kept
