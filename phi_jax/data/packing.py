"""Tokenized documents -> packed, fixed-shape batches with segment ids, positions, targets, mask.

Order of work (all in the main process, after the Grain workers tokenized):
  1. `SegmentsIterDataset` drops and counts skip markers, applies the long-document policy
     (split into seq_len chunks / skip and count / error) and refuses to spin forever on a shard in
     which every document is skipped. Its counters (`DataStats`) are part of its checkpoint state.
     A document longer than data.max_document_chars arrives untokenized ({"long_text": ...}) and
     is tokenized here one piece (`PIECE_CHARS`) at a time, each call doing at most one piece, so
     a 10 MB minified line or base64 blob costs what its tokens cost, never a stall, and memory
     holds one piece's tokens rather than the whole record's.
  2. `grain.experimental.FirstFitPackIterDataset` packs documents into rows of seq_len; it emits
     `tokens_segment_ids` (1, 2, ... per row, 0 = padding) and `tokens_positions` (restarting at 0).
  3. `batch` stacks rows with `make_batch`, which adds next-token `targets` and the `loss_mask`.

Batch layout (b = per-host batch, L = seq_len):
  tokens [b, L] int32, segment_ids [b, L] int32 (0 = padding), positions [b, L] int32,
  targets [b, L] int32, loss_mask [b, L] float32.
`targets[i, t]` is `tokens[i, t + 1]` when that token is in the same segment, else 0, and
`loss_mask[i, t]` is 1 exactly when that target is valid *and* trainable (not an instruction prompt
token). So the trainer needs no shifting: loss = sum(CE(logits, targets) * loss_mask) / sum(loss_mask).
"""

from __future__ import annotations

import logging
from typing import Any

import grain
import numpy as np

from phi_jax.data.documents import BadDataError, DataStats

_LOG = logging.getLogger(__name__)
_MAX_SKIP_WARNINGS = 10
PIECE_CHARS = 65_536


class SegmentsIterDataset(grain.IterDataset):
    """Skip counting and the long-document policy between tokenization and packing.

    Args:
      parent: tokenized documents (see `documents.DocumentTokenizer`).
      seq_len: packed row length L; documents (EOS included) longer than L are "long".
      long_documents: "split" (chunks of L tokens, each its own segment), "skip" or "error".
      docs_per_epoch: documents in this host's shard; that many skips in a row means nothing usable.
      initial_stats: counts known before iteration (e.g. empty input files).
      tokenizer: tokenizes the pieces of over-long documents (see the module docstring).
    """

    def __init__(self, parent: grain.IterDataset, *, seq_len: int, long_documents: str,
                 docs_per_epoch: int, initial_stats: dict[str, int] | None = None, tokenizer=None):
        super().__init__(parent)
        self._seq_len = seq_len
        self._long_documents = long_documents
        self._docs_per_epoch = docs_per_epoch
        self._initial_stats = dict(initial_stats or {})
        self._tokenizer = tokenizer

    def __iter__(self) -> grain.DatasetIterator:
        stats = DataStats(**self._initial_stats)
        return _SegmentsIterator(self._parent.__iter__(), seq_len=self._seq_len,
                                 long_documents=self._long_documents,
                                 docs_per_epoch=self._docs_per_epoch, stats=stats,
                                 tokenizer=self._tokenizer)

    def __str__(self) -> str:
        return f"SegmentsIterDataset(seq_len={self._seq_len}, long_documents={self._long_documents})"


class _SegmentsIterator(grain.DatasetIterator):
    """State: the parent state before the current document, where in it the next chunk is (piece
    offset for a long text, chunk index), and the counters."""

    def __init__(self, parent: grain.DatasetIterator, *, seq_len: int, long_documents: str,
                 docs_per_epoch: int, stats: DataStats, tokenizer=None):
        super().__init__(parent)
        self.stats = stats
        self._seq_len = seq_len
        self._long_documents = long_documents
        self._docs_per_epoch = docs_per_epoch
        self._tokenizer = tokenizer
        self._doc_state = None  # Parent state before the document being split.
        self._chunks: list[dict[str, np.ndarray]] | None = None
        self._next_chunk = 0
        self._consecutive_skips = 0
        self._long: dict[str, Any] | None = None  # {"text", "prefix", "offset", "end"} of a long text

    def __next__(self) -> dict[str, np.ndarray]:
        while True:
            if self._chunks is not None:
                if self._next_chunk < len(self._chunks):
                    self._next_chunk += 1
                    return self._chunks[self._next_chunk - 1]
                if self._long is not None and self._long["end"] < len(self._long["text"]):
                    self._load_piece(self._long["end"])
                    continue
                self._chunks, self._next_chunk, self._long = None, 0, None
            doc_state = self._parent.get_state()
            doc = next(self._parent)
            if doc["skip"]:
                self._count_skip(doc["skip"], doc["origin"])
                continue
            if "long_text" in doc:
                self._start_long(doc, doc_state)
                continue
            tokens, mask = doc["tokens"], doc["token_mask"]
            if len(tokens) > self._seq_len:
                if self._long_documents == "error":
                    raise BadDataError(f"{doc['origin']}: document has {len(tokens)} tokens (EOS included), "
                                       f"more than seq_len={self._seq_len}; set data.long_documents='split' "
                                       "to cut it into chunks or 'skip' to skip and count it")
                if self._long_documents == "skip":
                    self._count_skip("too_long", doc["origin"])
                    continue
                self.stats.split_documents += 1
                self._doc_state = doc_state
                self._chunks = _split(tokens, mask, self._seq_len)
            else:
                self._chunks = [{"tokens": tokens, "token_mask": mask}]
            self._consecutive_skips = 0
            self.stats.documents += 1
            self.stats.tokens += len(tokens)

    def _start_long(self, doc: dict[str, Any], doc_state) -> None:
        if self._tokenizer is None:
            raise ValueError("a document over data.max_document_chars reached the packer, which was "
                             "built without a tokenizer")
        self.stats.long_documents += 1
        self.stats.split_documents += 1
        self.stats.documents += 1
        self._consecutive_skips = 0
        if self.stats.long_documents <= _MAX_SKIP_WARNINGS:
            _LOG.warning("%s: %d characters, more than data.max_document_chars; tokenizing and "
                         "training on it in pieces", doc["origin"], len(doc["long_text"]))
        self._doc_state = doc_state
        self._long = {"text": doc["long_text"], "prefix": doc["tokens"].tolist()}
        self._load_piece(0)

    def _load_piece(self, offset: int, count: bool = True) -> None:
        """Tokenize the piece of the long text that starts at `offset` into seq_len chunks."""
        text = self._long["text"]
        end = min(len(text), offset + PIECE_CHARS)
        if end < len(text):  # cut after a line break or space near the end, if there is one
            cut = max(text.rfind("\n", offset + PIECE_CHARS // 2, end),
                      text.rfind(" ", offset + PIECE_CHARS // 2, end))
            end = cut + 1 if cut > 0 else end
        ids = self._tokenizer.encode(text[offset:end])
        if offset == 0:
            ids = self._long["prefix"] + ids
        if end == len(text):
            ids.append(self._tokenizer.eos_id)
        tokens = np.asarray(ids, np.int32)
        self._long.update(offset=offset, end=end)
        self._chunks, self._next_chunk = _split(tokens, np.ones_like(tokens), self._seq_len), 0
        if count:
            self.stats.tokens += len(tokens)

    def _count_skip(self, reason: str, origin: str) -> None:
        setattr(self.stats, reason, getattr(self.stats, reason) + 1)
        if self.stats.skipped <= _MAX_SKIP_WARNINGS:
            _LOG.warning("skipped %s (%s)%s", origin, reason,
                         "; further skips are only counted" if self.stats.skipped == _MAX_SKIP_WARNINGS
                         else "")
        self._consecutive_skips += 1
        if self._consecutive_skips >= self._docs_per_epoch:
            raise BadDataError(f"no usable document: all {self._docs_per_epoch} documents of this host's "
                             f"shard were skipped ({self.stats.as_dict()}); check data.paths, "
                             "data.jsonl_field and data.long_documents")

    def get_state(self) -> dict[str, Any]:
        state = {"consecutive_skips": self._consecutive_skips, "stats": self.stats.as_dict(),
                 "parent": self._parent.get_state(), "next_chunk": 0, "long_offset": -1}
        if self._chunks is None or self._doc_state is None:
            return state
        if self._long is not None:
            if self._next_chunk < len(self._chunks):
                state.update(long_offset=self._long["offset"], next_chunk=self._next_chunk)
            elif self._long["end"] < len(self._long["text"]):
                state.update(long_offset=self._long["end"])
            else:
                return state
        elif 0 < self._next_chunk < len(self._chunks):
            state["next_chunk"] = self._next_chunk
        else:
            return state
        state["parent"] = self._doc_state
        return state

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self.stats.load(state["stats"])
        self._consecutive_skips = state["consecutive_skips"]
        self._chunks, self._next_chunk, self._doc_state, self._long = None, 0, None, None
        long_offset = state.get("long_offset", -1)
        if state["next_chunk"] or long_offset >= 0:  # Re-read the document being split; resume in it.
            self._doc_state = state["parent"]
            doc = next(self._parent)
            if long_offset >= 0:
                self._long = {"text": doc["long_text"], "prefix": doc["tokens"].tolist()}
                self._load_piece(long_offset, count=False)
            else:
                self._chunks = _split(doc["tokens"], doc["token_mask"], self._seq_len)
            self._next_chunk = state["next_chunk"]


def _split(tokens: np.ndarray, mask: np.ndarray, seq_len: int) -> list[dict[str, np.ndarray]]:
    return [{"tokens": tokens[i:i + seq_len], "token_mask": mask[i:i + seq_len]}
            for i in range(0, len(tokens), seq_len)]


def pack(segments: grain.IterDataset, *, seq_len: int, num_packing_bins: int, seed: int,
         pad_id: int) -> grain.IterDataset:
    """First-fit packing into rows of seq_len (Grain's packer; bins shuffled with `seed`)."""
    return grain.experimental.FirstFitPackIterDataset(
        segments, length_struct={"tokens": seq_len, "token_mask": seq_len},
        num_packing_bins=num_packing_bins, seed=seed, shuffle_bins=True,
        meta_features=("token_mask",), padding_struct={"tokens": pad_id, "token_mask": 0})


def make_batch(rows: list[dict[str, np.ndarray]], batch_size: int, pad_id: int = 0
               ) -> dict[str, np.ndarray]:
    """Stacks packed rows, pads a short final batch with empty rows, adds targets and loss_mask."""
    tokens = np.stack([r["tokens"] for r in rows]).astype(np.int32)
    segment_ids = np.stack([r["tokens_segment_ids"] for r in rows]).astype(np.int32)
    positions = np.stack([r["tokens_positions"] for r in rows]).astype(np.int32)
    token_mask = np.stack([r["token_mask"] for r in rows])
    missing = batch_size - len(rows)
    if missing > 0:  # Empty rows keep shapes static: segment 0, nothing to learn.
        pad = lambda x, v: np.concatenate([x, np.full((missing,) + x.shape[1:], v, x.dtype)])
        tokens, segment_ids = pad(tokens, pad_id), pad(segment_ids, 0)
        positions, token_mask = pad(positions, 0), pad(token_mask, 0)
    same_segment = (segment_ids[:, 1:] == segment_ids[:, :-1]) & (segment_ids[:, :-1] > 0)
    valid = np.zeros(tokens.shape, bool)
    valid[:, :-1] = same_segment & (token_mask[:, 1:] > 0)
    targets = np.zeros_like(tokens)
    targets[:, :-1] = np.where(valid[:, :-1], tokens[:, 1:], 0)
    return {"tokens": tokens, "segment_ids": segment_ids, "positions": positions,
            "targets": targets, "loss_mask": valid.astype(np.float32)}


def find_stats(iterator: Any) -> DataStats:
    """The `DataStats` of a pipeline iterator (searches through wrapping iterators)."""
    queue = [iterator]
    while queue:
        node = queue.pop(0)
        if isinstance(node, _SegmentsIterator):
            return node.stats
        queue.extend(getattr(node, "_parents", ()) or ())
        if getattr(node, "_iterator", None) is not None:
            queue.append(node._iterator)  # pylint: disable=protected-access
    raise ValueError(f"{type(iterator).__name__} is not an iterator of pipeline.build_dataset")
