"""Dedup's whole-corpus passes as arrays and files: sketches, band buckets, components, decisions.

Documents are numbered in input order (`doc` = the shard's offset + the row in the shard). The
passes, each resumable and bounded in memory, under OUTPUT/.work/dedup/:

  1. sketch/part-NNNNN/   per input shard, published by one directory rename: sig.npy [n, P]
     uint32 signatures, exact.npy [n] uint64 normalised-text digests, keys.npy / docs.npy the
     shard's bucket entries sorted by key (one per band, plus the exact digest), ids.json.
  2. edges/               for each range of keys (the top bits), every shard's entries in it are
     merged and sorted; each bucket of 2+ documents gives edges member -> smallest member
     (local: range-RRRRR-of-PPPPP.npy; Beam: GroupByKey on the keys, beam-*.npy).
  3. components           min-label propagation over the edge files (streamed, several sweeps),
     so every document's label is the smallest document of its cluster: the one kept.
     decisions/part-NNNNN.npz (rows to drop, why) and OUTPUT/clusters.jsonl come from it.

Memory: pass 1 holds one shard; pass 2 one range (at most RANGE_ENTRIES entries); pass 3 one int64
per document (8 MB per million) plus one edge file and GATHER removed documents at a time.
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from phi_jax.curation.core.text import normalize
from phi_jax.curation.dedup import minhash, shingles
from phi_jax.data.records import InputShard, batched
from phi_jax.errors import RunError
from phi_jax import fileio
from phi_jax.fileio import atomic_write_bytes, atomic_write_json

RANGE_ENTRIES = 1 << 21  # bucket entries sorted at once in pass 2 (~80 MB with the sort's copies)
GATHER = 1 << 15  # removed documents whose signatures are compared at once in pass 3 (~32 MB)
EXACT, NEAR = 1, 0
_SKETCH_BATCH = 1024


# ------------------------------------------------------------------------------ arrays (shared)

def sketch(texts: Sequence[str], config) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(signatures [N, P] uint32, exact digests [N] uint64, bucket keys [N, bands + 1] uint64)."""
    normalized = [normalize(t) for t in texts]
    grams = shingles.ngram_hashes(normalized, config.ngram, config.unit)
    sig = minhash.signatures(grams, config.num_perm, config.seed)
    exact = shingles.exact_hashes(normalized)
    keys = np.concatenate([minhash.band_keys(sig, config.lsh), shingles.mix64(exact)[:, None]], axis=1)
    return sig, exact, keys


def bucket_edges(keys: np.ndarray, docs: np.ndarray) -> np.ndarray:
    """[E, 2] int64 edges (doc, smallest doc of its bucket) of every bucket of 2+ documents.

    Entries with equal keys must come in increasing doc order (so they do in documents' order, and
    in key-sorted shard files concatenated in shard order): a stable sort by key then puts each
    bucket's smallest document first."""
    order = np.argsort(keys, kind="stable")
    keys, docs = keys[order], docs[order]
    first = np.concatenate([[True], keys[1:] != keys[:-1]]) if len(keys) else np.zeros(0, bool)
    head = docs[np.flatnonzero(first)][np.cumsum(first) - 1]  # smallest doc of each entry's bucket
    member = ~first & (docs != head)
    edges = np.stack([docs[member], head[member]], axis=1)
    return np.unique(edges, axis=0) if len(edges) else edges.reshape(0, 2).astype(np.int64)


def components(count: int, edge_chunks: Callable[[], Iterable[np.ndarray]]) -> np.ndarray:
    """label[i] = the smallest document connected to i; `edge_chunks()` iterates the edges afresh.

    Min-label propagation: every sweep lowers both ends of each edge to their smaller label, then
    pointer jumping (label = label[label]) flattens chains; it stops after a sweep changes nothing.
    """
    label = np.arange(count, dtype=np.int64)
    while True:
        changed = False
        for edges in edge_chunks():
            if not len(edges):
                continue
            u, v = edges[:, 0], edges[:, 1]
            low = np.minimum(label[u], label[v])
            for side in (u, v):
                if np.any(low < label[side]):
                    changed = True
                    np.minimum.at(label, side, low)
        while True:
            jumped = label[label]
            if np.array_equal(jumped, label):
                break
            label = jumped
        if not changed:
            return label


# ------------------------------------------------------------------------------- pass 1: sketch

def offsets(shards: Sequence[InputShard]) -> np.ndarray:
    """[S + 1] the first document number of each shard (and the total)."""
    return np.concatenate([[0], np.cumsum([s.size for s in shards])]).astype(np.int64)


def sketch_dir(work: Path, shard: InputShard) -> Path:
    return Path(work) / "sketch" / shard.name


def sketch_shard(shard: InputShard, offset: int, work: Path, config,
                 on_progress: Callable[[int], None] | None = None) -> Path:
    """Pass 1 for one shard (skipped if already published); returns its directory."""
    final = sketch_dir(work, shard)
    if (final / "ids.json").is_file():
        return final
    sigs, exacts, keys, ids = [], [], [], []
    for batch in batched(shard.read(), _SKETCH_BATCH):
        sig, exact, key = sketch([r["text"] for r in batch], config)
        sigs.append(sig), exacts.append(exact), keys.append(key), ids.extend(r["id"] for r in batch)
        if on_progress is not None:
            on_progress(len(batch))
    if len(ids) != shard.size:
        raise RunError(f"{shard.describe()} read {len(ids)} records, planned {shard.size}; the input "
                       "changed during the run: rerun the command")
    width = config.lsh.bands + 1
    sig = np.concatenate(sigs) if sigs else np.zeros((0, config.num_perm), np.uint32)
    key = (np.concatenate(keys) if keys else np.zeros((0, width), np.uint64)).reshape(-1)
    doc = np.repeat(np.arange(offset, offset + len(ids), dtype=np.int64), width)
    order = np.argsort(key, kind="stable")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{shard.name}.tmp-", dir=final.parent))
    try:
        np.save(tmp / "sig.npy", sig)
        np.save(tmp / "exact.npy", np.concatenate(exacts) if exacts else np.zeros(0, np.uint64))
        np.save(tmp / "keys.npy", key[order])
        np.save(tmp / "docs.npy", doc[order])
        (tmp / "ids.json").write_text(json.dumps(ids, ensure_ascii=False))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def shard_entries(directory: Path) -> tuple[np.ndarray, np.ndarray]:
    """(keys, docs) of a sketched shard, memory-mapped."""
    return (np.load(directory / "keys.npy", mmap_mode="r"), np.load(directory / "docs.npy", mmap_mode="r"))


# ------------------------------------------------------------------------------ pass 2: buckets

def edges_dir(work: Path) -> Path:
    return Path(work) / "edges"


def range_bits(total_entries: int) -> int:
    return max(0, math.ceil(math.log2(max(total_entries, 1) / RANGE_ENTRIES)))


def local_edges(work: Path, shards: Sequence[InputShard], on_progress: Callable[[int], None] | None = None
                ) -> None:
    """Pass 2 over key ranges; each range's edge file is published atomically, so a rerun skips it."""
    directories = [sketch_dir(work, s) for s in shards]
    total = sum(os.path.getsize(d / "keys.npy") for d in directories) // 8
    bits = range_bits(total)
    out = edges_dir(work)
    out.mkdir(parents=True, exist_ok=True)
    for r in range(1 << bits):
        path = out / f"range-{r:05d}-of-{1 << bits:05d}.npy"
        if not path.is_file():
            lo, hi = r << (64 - bits) if bits else 0, (r + 1) << (64 - bits) if bits else 1 << 64
            keys, docs = [], []
            for d in directories:
                k, doc = shard_entries(d)
                a = np.searchsorted(k, np.uint64(lo)) if lo else 0
                b = np.searchsorted(k, np.uint64(hi)) if hi < 1 << 64 else len(k)
                keys.append(np.array(k[a:b])), docs.append(np.array(doc[a:b]))  # copies: the maps close
                del k, doc
            save_npy(path, bucket_edges(np.concatenate(keys), np.concatenate(docs)))
        if on_progress is not None:
            on_progress(1)
    atomic_write_json(out / "done.json", {"ranges": 1 << bits, "entries": int(total)})


def save_npy(path: Path, array: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.save(buffer, array)
    atomic_write_bytes(path, buffer.getvalue())


def edge_files(work: Path) -> list[Path]:
    return sorted(edges_dir(work).glob("*.npy"))


def _iter_edges(files: Sequence[Path]) -> Iterator[np.ndarray]:
    for path in files:
        yield np.load(path)


# ---------------------------------------------------------------------------- pass 3: clusters

def decisions_path(work: Path, shard: InputShard) -> Path:
    return Path(work) / "decisions" / f"{shard.name}.npz"


class _ShardRows:
    """Rows of the sketched shards by document number, one shard's memory map at a time."""

    def __init__(self, work: Path, shards: Sequence[InputShard]):
        self._work, self._shards, self._offsets = work, shards, offsets(shards)

    def gather(self, docs: np.ndarray, name: str) -> np.ndarray:
        shard_of = np.searchsorted(self._offsets, docs, side="right") - 1
        out = None
        for s in np.unique(shard_of):
            at = np.flatnonzero(shard_of == s)
            d = sketch_dir(self._work, self._shards[s])
            if name == "ids":
                ids = json.loads((d / "ids.json").read_text())
                rows = np.array([ids[i] for i in (docs[at] - self._offsets[s])], dtype=object)
            else:
                rows = np.load(d / f"{name}.npy", mmap_mode="r")[docs[at] - self._offsets[s]]
            if out is None:
                out = np.empty((len(docs),) + rows.shape[1:], rows.dtype)
            out[at] = rows
        return out if out is not None else np.zeros(0)


def cluster(work: Path, shards: Sequence[InputShard], output: Path, clusters_name: str) -> dict:
    """Pass 3: components, per-shard decisions, OUTPUT/clusters_name; returns the counts.

    Skipped when its marker (components.json) exists: the decisions and clusters file are then
    complete.
    """
    marker = Path(work) / "components.json"
    if marker.is_file():
        return json.loads(marker.read_text())
    starts = offsets(shards)
    files = edge_files(work)
    label = components(int(starts[-1]), lambda: _iter_edges(files))
    removed = np.flatnonzero(label != np.arange(len(label)))
    kept = label[removed]
    rows = _ShardRows(work, shards)
    exact = np.zeros(len(removed), bool)
    jaccard = np.zeros(len(removed), np.float32)
    for a in range(0, len(removed), GATHER):
        part = slice(a, a + GATHER)
        exact[part] = rows.gather(removed[part], "exact") == rows.gather(kept[part], "exact")
        jaccard[part] = minhash.estimate_jaccard(rows.gather(removed[part], "sig"), rows.gather(kept[part], "sig"))
    for i, shard in enumerate(shards):
        a, b = np.searchsorted(removed, [starts[i], starts[i + 1]])
        buffer = io.BytesIO()
        np.savez(buffer, rows=removed[a:b] - starts[i], kept=kept[a:b], exact=exact[a:b])
        atomic_write_bytes(decisions_path(work, shard), buffer.getvalue())
    clusters = _write_clusters(fileio.as_path(output) / clusters_name, removed, kept, exact, jaccard, rows)
    counts = {"clusters": clusters, "documents_in_clusters": clusters + len(removed),
              "exact_duplicates": int(exact.sum()), "near_duplicates": int(len(removed) - exact.sum())}
    atomic_write_json(marker, counts)
    return counts


def cluster_lines(removed: np.ndarray, kept: np.ndarray, exact: np.ndarray, jaccard: np.ndarray,
                  kept_ids: Sequence[str], removed_ids: Sequence[str]) -> Iterator[dict]:
    """One dict per cluster from its removed documents, given sorted by (kept, removed):
    {"kept": {"id", "doc"}, "size", "removed": [{"id", "doc", "reason": exact|near, "jaccard"}]}.

    `jaccard` is the signatures' estimate against the kept document (exact duplicates: 1.0)."""
    heads = np.flatnonzero(np.concatenate([[True], kept[1:] != kept[:-1]])) if len(kept) else []
    for h, t in zip(heads, list(heads[1:]) + [len(kept)]):
        members = [{"id": removed_ids[j], "doc": int(removed[j]), "reason": "exact" if exact[j] else "near",
                    "jaccard": round(float(jaccard[j]), 4)} for j in range(h, t)]
        yield {"kept": {"id": kept_ids[h], "doc": int(kept[h])}, "size": len(members) + 1, "removed": members}


def _write_clusters(path: Path, removed, kept, exact, jaccard, rows: _ShardRows) -> int:
    """clusters.jsonl, in order of the kept document, GATHER removed documents' ids at a time."""
    order = np.lexsort((removed, kept))
    removed, kept, exact, jaccard = removed[order], kept[order], exact[order], jaccard[order]
    remote = fileio.is_remote(path)  # a bucket: written locally, published as one object upload
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=None if remote else path.parent)
    clusters, at = 0, 0
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            while at < len(order):
                end = min(at + GATHER, len(order))
                while end < len(order) and kept[end] == kept[end - 1]:
                    end += 1  # a cluster never straddles two chunks
                part = slice(at, end)
                ids = rows.gather(np.concatenate([kept[part], removed[part]]), "ids")
                for line in cluster_lines(removed[part], kept[part], exact[part], jaccard[part],
                                          ids[:end - at], ids[end - at:]):
                    f.write(json.dumps(line, ensure_ascii=False) + "\n")
                    clusters += 1
                at = end
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        if remote:
            fileio.upload_file(tmp, path)
            os.unlink(tmp)
        else:
            os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return clusters


def load_decisions(work: Path, shard: InputShard) -> dict[int, int]:
    """{row in the shard: EXACT or NEAR} of the shard's documents to drop."""
    path = decisions_path(work, shard)
    try:
        with np.load(path, allow_pickle=False) as data:
            return dict(zip(data["rows"].tolist(), np.where(data["exact"], EXACT, NEAR).tolist()))
    except OSError:
        raise RunError(f"{path}: the dedup decisions of {shard.describe()} are missing; rerun the same "
                       "command (with --overwrite if the output was moved or edited)") from None
