"""The Grain input pipeline: source -> shard -> shuffle -> repeat -> tokenize -> pack -> batch.

    cfg = pipeline.default_data_config()
    ds = pipeline.build_dataset(cfg, tokenizer, seq_len=L, batch_size=b, seed=0,
                                process_index=jax.process_index(), process_count=jax.process_count())
    it = iter(ds)                      # checkpointable: it.get_state()/set_state(), or
                                       # grain.checkpoint.CheckpointSave(it) inside orbax
    batch = next(it)                   # dict of numpy arrays, see packing.py for the layout
    global_batch = pipeline.to_global_batch(batch, sharding)
    pipeline.data_stats(it)            # DataStats: documents, tokens, skips by reason

Each host reads a disjoint shard of the documents (`source[process_index::process_count]`, so the
shards cover the data) and shuffles it with `seed`, reshuffling every epoch. Tokenization runs in
`num_workers` Grain worker processes (0 = in the main process, for tests); skip counting, packing
and batching run in the main process so their state and counters are exact and checkpointed.
Everything is deterministic given the seed and the number of workers.
"""

from __future__ import annotations

import functools
from typing import Any

import grain
import ml_collections
import numpy as np
from ml_collections import config_dict

from phi_jax import fileio
from phi_jax.data import corpus, packing, sources
from phi_jax.data.documents import BadDataError, DataStats, DocumentTokenizer, RecordFormat
from phi_jax.errors import ConfigError, InputError

__all__ = ["BadDataError", "DataStats", "build_dataset", "data_stats", "default_data_config",
           "describe", "to_global_batch"]

_CHOICES = {"source": ("default", "text", "jsonl", "arrayrecord", "tfds"),
            "bad_data": ("error", "skip"), "long_documents": ("split", "skip", "error"),
            "record_format": ("auto", "text", "json")}


# Grain's index_shuffle cycle-walks a large domain, costing ms per element on small datasets
# (15 ms at 2 documents, 0.7 ms at 40, 4 us past 4k); below this size a cached permutation is used.
_SMALL_SHUFFLE = 1 << 16


class _PermutedMapDataset(grain.MapDataset):
    """Global shuffle, different every epoch, by an explicit numpy permutation (small datasets)."""

    def __init__(self, parent: grain.MapDataset, seed: int):
        super().__init__(parent)
        self._seed = seed
        self._cached: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self._parent)

    def __str__(self) -> str:
        return f"PermutedMapDataset(seed={self._seed})"

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        n = len(self._parent)
        epoch, index_in_epoch = divmod(int(index), n)
        cached = self._cached  # One read: worker threads may replace it concurrently.
        if cached is None or cached[0] != epoch:
            cached = (epoch, np.random.default_rng([self._seed, epoch]).permutation(n))
            self._cached = cached
        return self._parent[int(cached[1][index_in_epoch]) + epoch * n]


def default_data_config() -> ml_collections.ConfigDict:
    """Every key the pipeline reads, with its default; an unknown key is an error in build_dataset."""
    cfg = ml_collections.ConfigDict()
    cfg.source = "default"           # default (stdlib corpus) | text | jsonl | arrayrecord | tfds
    cfg.paths = ""                   # comma-separated files or globs (text, jsonl, arrayrecord)
    cfg.jsonl_field = "text"         # text field of JSON records (JSONL, ArrayRecord JSON, tfds)
    cfg.prompt_field = "prompt"      # instruction records: loss only on the completion
    cfg.completion_field = "completion"
    cfg.tokens_field = "tokens"      # pre-tokenized records: ids ...
    cfg.mask_field = "loss_mask"     # ... and an optional per-token 0/1 mask
    cfg.messages_field = ""          # chat records: this field (or meta.<field>) holds the messages;
                                     # loss on assistant tokens only ("" = not read; finetune: messages)
    cfg.chat_template = ""           # Jinja chat template file ("" = the tokenizer's own, else ChatML)
    cfg.record_format = "auto"       # ArrayRecord records: auto | text | json
    cfg.tfds_name = ""
    cfg.tfds_split = "train"
    cfg.tfds_data_dir = ""
    cfg.max_documents = 0            # use only the first N documents (0 = all)
    cfg.bad_data = "error"           # error | skip (and count)
    cfg.long_documents = "split"     # split into seq_len chunks | skip (and count) | error
    cfg.shuffle = True
    cfg.num_epochs = config_dict.placeholder(int)  # None = repeat forever
    cfg.num_workers = 0              # Grain worker processes for reading + tokenizing
    cfg.worker_buffer_size = 8       # documents buffered per worker
    cfg.read_threads = 2             # threads per process reading + tokenizing
    cfg.read_buffer_size = 64        # documents read ahead per process
    cfg.num_packing_bins = 0         # first-fit bins (0 = batch_size)
    cfg.add_bos = False              # Phi uses no BOS
    cfg.drop_remainder = True        # finite epochs: drop the short last batch, else pad it
    cfg.heldout_fraction = 0.02      # share of documents held out of training for the eval loss
    cfg.max_document_chars = 1_000_000  # longer documents are cut into pieces before tokenizing
    return cfg


def validate_data_config(cfg: ml_collections.ConfigDict | dict[str, Any]) -> None:
    """Raise ConfigError naming `data.<key>` for a value the pipeline cannot use, and
    MissingFileError for input paths that match nothing — before a run creates anything."""
    cfg = _resolve(cfg)
    if cfg.source in ("text", "jsonl", "arrayrecord"):
        files = sources.expand_paths(cfg.paths)
        empty = [f for f in files if fileio.size(f) == 0]
        if empty and cfg.bad_data == "error":
            raise BadDataError(f"{empty[0]}: empty file (no records); remove it, or set "
                               "data.bad_data='skip' to skip and count empty files")


def _resolve(cfg: ml_collections.ConfigDict | dict[str, Any]) -> ml_collections.ConfigDict:
    full = default_data_config()
    unknown = sorted(set(cfg.keys()) - set(full.keys()))
    if unknown:
        raise ConfigError(f"unknown data config key(s) {unknown}; valid keys: {sorted(full.keys())}")
    for key in cfg.keys():
        value = cfg[key]
        if key == "paths" and isinstance(value, (list, tuple)):
            value = ",".join(value)
        full[key] = value
    for key, choices in _CHOICES.items():
        if full[key] not in choices:
            raise ConfigError(f"--config.data.{key}={full[key]!r} is not one of {choices}")
    if full.num_epochs is not None and full.num_epochs < 1:
        raise ConfigError(f"--config.data.num_epochs={full.num_epochs}; use a positive int, or None "
                          "to repeat forever")
    if not 0 <= full.heldout_fraction < 1:
        raise ConfigError(f"--config.data.heldout_fraction={full.heldout_fraction}: must be in [0, 1)")
    if full.max_document_chars < 1000:
        raise ConfigError(f"--config.data.max_document_chars={full.max_document_chars}: must be >= "
                          "1000 (documents longer than this are cut into pieces before tokenizing)")
    for key in ("max_documents", "num_workers", "num_packing_bins"):
        if full[key] < 0:
            raise ConfigError(f"--config.data.{key}={full[key]}: must be >= 0")
    for key in ("worker_buffer_size", "read_threads", "read_buffer_size"):
        if full[key] < 1:
            raise ConfigError(f"--config.data.{key}={full[key]}: must be >= 1")
    return full


def _make_source(cfg) -> tuple[Any, RecordFormat, list[str]]:
    """The source, its record format, and the input files that held no record."""
    fields = dict(text_field=cfg.jsonl_field, prompt_field=cfg.prompt_field,
                  completion_field=cfg.completion_field, tokens_field=cfg.tokens_field,
                  mask_field=cfg.mask_field, messages_field=cfg.messages_field)
    if cfg.source == "default":
        return corpus.DefaultCorpusSource(), RecordFormat("text", **fields), []
    if cfg.source == "tfds":
        if not cfg.tfds_name:
            raise ConfigError("--config.data.source=tfds needs --config.data.tfds_name")
        return (sources.TfdsSource(cfg.tfds_name, cfg.tfds_split, cfg.tfds_data_dir),
                RecordFormat("features", **fields), [])
    files = sources.expand_paths(cfg.paths)
    per_file = {"text": sources.TextFileSource, "jsonl": sources.JsonlFileSource,
                "arrayrecord": sources.ArrayRecordFileSource}[cfg.source]
    payload = {"text": "text", "jsonl": "json", "arrayrecord": cfg.record_format}[cfg.source]
    parts = [per_file(f) for f in files]
    empty = [f for f, part in zip(files, parts) if len(part) == 0]
    if empty and cfg.bad_data == "error":
        raise BadDataError(f"{empty[0]}: empty file (no records); remove it, or set "
                           "data.bad_data='skip' to skip and count empty files")
    return sources.ConcatSource(parts), RecordFormat(payload, **fields), empty


SPLITS = ("all", "train", "heldout")


def heldout_mask(num_documents: int, fraction: float) -> np.ndarray:
    """[n] bool: which documents the held-out split takes, by a fixed hash of the index.

    A hash (splitmix64 of the index), not a prefix or a random draw, so the split is the same on
    every host and run, independent of shuffling, and spread evenly over the source's order. If
    holding out would leave no training document, nothing is held out.
    """
    x = np.arange(num_documents, dtype=np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    mask = (x % np.uint64(1_000_000)) < np.uint64(round(fraction * 1_000_000))
    return mask if not mask.all() else np.zeros(num_documents, bool)


class _IndexedSource:
    """The documents of `source` at `indices`, in that order (a split of a source)."""

    def __init__(self, source, indices: np.ndarray):
        self._source, self._indices = source, indices

    def __len__(self) -> int:
        return len(self._indices)

    def __getitem__(self, index: int):
        return self._source[int(self._indices[int(index)])]


def build_dataset(cfg, tokenizer, *, seq_len: int, batch_size: int, seed: int = 0,
                  process_index: int = 0, process_count: int = 1,
                  split: str = "all") -> grain.IterDataset:
    """This host's stream of packed batches (see packing.py for the batch layout).

    Args:
      cfg: the data ConfigDict (`default_data_config()`, possibly partial or overridden).
      tokenizer: a `phi_jax.tokenizer.Tokenizer` with an EOS token.
      seq_len: T, the packed row length.
      batch_size: b, rows per batch on this host (the global batch is b * process_count).
      seed: shuffles documents (per epoch) and packed rows.
      process_index, process_count: this host's shard of the documents.
      split: "all" documents, or the "train" / "heldout" split of `cfg.heldout_fraction`.
    """
    cfg = _resolve(cfg)
    if seq_len < 2 or batch_size < 1:
        raise ValueError(f"need seq_len >= 2 and batch_size >= 1, got {seq_len}, {batch_size}")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} is not in [0, process_count={process_count})")
    if split not in SPLITS:
        raise ValueError(f"split={split!r}; use one of {SPLITS}")
    source, fmt, empty_files = _make_source(cfg)
    if cfg.max_documents > 0:
        source = _IndexedSource(source, np.arange(min(cfg.max_documents, len(source))))
    if split != "all":
        held = heldout_mask(len(source), cfg.heldout_fraction)
        source = _IndexedSource(source, np.flatnonzero(held if split == "heldout" else ~held))
        if len(source) == 0:
            raise InputError(f"the {split} split is empty (data.heldout_fraction="
                             f"{cfg.heldout_fraction} of the documents)")
    ds = grain.MapDataset.source(source)
    total = len(ds)
    ds = ds[process_index::process_count]
    if len(ds) == 0:
        raise InputError(f"no documents for host {process_index} of {process_count}: the {cfg.source} "
                         f"source has {total} document(s); add data or use fewer hosts")
    docs_per_epoch = len(ds)
    if cfg.shuffle:
        ds = ds.shuffle(seed) if len(ds) > _SMALL_SHUFFLE else _PermutedMapDataset(ds, seed)
    if cfg.num_epochs != 1:
        ds = ds.repeat(cfg.num_epochs)
    ds = ds.map(DocumentTokenizer(tokenizer, fmt, cfg.bad_data, cfg.add_bos,
                                  max_chars=cfg.max_document_chars,
                                  long_documents=cfg.long_documents,
                                  chat_template=_chat_template(cfg)))
    docs = ds.to_iter_dataset(grain.ReadOptions(num_threads=cfg.read_threads,
                                                prefetch_buffer_size=cfg.read_buffer_size))
    if cfg.num_workers > 0:
        _ensure_absl_flags_parsed()
        docs = docs.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=cfg.num_workers, per_worker_buffer_size=cfg.worker_buffer_size))
    segments = packing.SegmentsIterDataset(
        docs, seq_len=seq_len, long_documents=cfg.long_documents, docs_per_epoch=docs_per_epoch,
        initial_stats={"empty_files": len(empty_files)}, tokenizer=tokenizer)
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    packed = packing.pack(segments, seq_len=seq_len, seed=seed, pad_id=pad_id,
                          num_packing_bins=cfg.num_packing_bins or batch_size)
    return packed.batch(batch_size, drop_remainder=cfg.drop_remainder,
                        batch_fn=functools.partial(packing.make_batch, batch_size=batch_size,
                                                   pad_id=pad_id))


def _chat_template(cfg) -> str | None:
    """The text of data.chat_template (a file), or None for the tokenizer's own."""
    if not cfg.chat_template:
        return None
    try:
        return open(cfg.chat_template, encoding="utf-8").read()
    except OSError as e:
        raise ConfigError(f"--config.data.chat_template={cfg.chat_template}: cannot read it ({e}); "
                          "give a Jinja chat template file, or '' for the tokenizer's own") from None


def _ensure_absl_flags_parsed() -> None:
    """Grain's worker start reads absl flags; outside `absl.app.run` (pytest, argparse CLIs) they are
    unparsed and reading one raises, so accept the defaults, as Grain's own tests do."""
    from absl import flags  # pylint: disable=g-import-not-at-top
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def data_stats(iterator) -> DataStats:
    """Counters (documents, tokens, skips by reason) of an iterator of `build_dataset`."""
    return packing.find_stats(iterator)


def describe(cfg) -> dict[str, Any]:
    """What the run reads, for its metadata; the default corpus is identified by its sha256."""
    cfg = _resolve(cfg)
    info: dict[str, Any] = {"source": cfg.source}
    if cfg.source == "default":
        info["corpus_sha256"] = corpus.corpus_hash()
    elif cfg.source == "tfds":
        info.update(tfds_name=cfg.tfds_name, tfds_split=cfg.tfds_split)
    else:
        info["files"] = sources.expand_paths(cfg.paths)
    return info


def to_global_batch(batch: dict[str, np.ndarray], sharding) -> dict[str, Any]:
    """Host-local batch -> global `jax.Array`s (batch axis spread over all hosts' rows).

    Args:
      batch: this host's batch, leaves [b, L].
      sharding: one `jax.sharding.Sharding` for every leaf, or a dict of them keyed like `batch`.
        The global batch is [b * process_count, L]; with a mesh over `jax.devices()` (process
        order, as `jax.make_mesh` builds it) host i's rows land at [i * b, (i + 1) * b).
    """
    import jax  # pylint: disable=g-import-not-at-top
    if isinstance(sharding, jax.sharding.Sharding):
        sharding = {key: sharding for key in batch}
    return {key: jax.make_array_from_process_local_data(sharding[key], value)
            for key, value in batch.items()}
