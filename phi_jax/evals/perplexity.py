"""Token-level loss and perplexity over any text source, on packed rows.

Letters: B batch rows, L row length, V vocab.

Accounting is exact: a document of n tokens contributes exactly n - 1 predictions (its first token
has no context), whatever the packing. Documents longer than a row are cut into chunks that
overlap by one token, so the token at a cut is the context of the next chunk's first prediction
and no token is predicted twice or skipped. For a document that fits in one row, the loss equals
transformers' `PhiForCausalLM(labels=input_ids).loss`.

Two entry points:
  * `evaluate_texts(model, variables, tokenizer, texts)` — a list of strings, packed here;
  * `evaluate_batches(model, variables, batches)` — batches in the layout of
    `phi_jax.data.pipeline` (tokens, segment_ids, positions, targets, loss_mask), e.g. from
    `dataset_batches(data_cfg, tokenizer, ...)` over any source the pipeline reads. (The pipeline
    splits long documents without overlap, losing one prediction per cut; its loss_mask says so.)
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from phi_jax.errors import InputError


@dataclasses.dataclass(frozen=True)
class PerplexityResult:
    """Summed negative log-likelihood (nats) and the number of predicted tokens."""

    nll: float
    num_tokens: int
    num_documents: int | None = None

    @property
    def loss(self) -> float:
        return self.nll / self.num_tokens if self.num_tokens else float("nan")

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss) if self.num_tokens else float("nan")

    def as_dict(self) -> dict[str, Any]:
        return {"loss": self.loss, "perplexity": self.perplexity, "nll": self.nll,
                "num_tokens": self.num_tokens, "num_documents": self.num_documents}


def _nll_sums(model, variables, tokens, positions, segment_ids, targets, loss_mask):
    """(sum of masked token NLL, number of masked tokens) for one batch [B,L]."""
    logits, _ = model.apply(variables, tokens, positions=positions, segment_ids=segment_ids)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)  # [B,L,V]
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]  # [B,L]
    mask = loss_mask.astype(jnp.float32)
    return jnp.sum(nll * mask), jnp.sum(mask)


@functools.lru_cache(maxsize=16)
def _compiled(model):
    return jax.jit(functools.partial(_nll_sums, model))


def evaluate_batches(model, variables, batches: Iterable[dict[str, np.ndarray]], *,
                     max_batches: int | None = None) -> PerplexityResult:
    """Loss over pipeline-layout batches; every position with loss_mask == 1 counts once."""
    fn = _compiled(model)
    nll, count = 0.0, 0
    for i, b in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        s, n = fn(variables, b["tokens"], b["positions"], b["segment_ids"], b["targets"],
                  b["loss_mask"])
        nll += float(s)
        count += int(round(float(n)))
    return PerplexityResult(nll, count)


def _chunks(ids: Sequence[int], row_len: int) -> list[list[int]]:
    """Cut a document into pieces of <= row_len tokens overlapping by one token."""
    if len(ids) <= row_len:
        return [list(ids)]
    step = row_len - 1
    return [list(ids[s:s + row_len]) for s in range(0, len(ids) - 1, step)]


def pack_documents(docs: Sequence[Sequence[int]], row_len: int, batch_size: int
                   ) -> Iterator[dict[str, np.ndarray]]:
    """First-fit pack token lists into [batch_size, row_len] batches in the pipeline layout.

    Documents of one token predict nothing and are dropped; the last batch is padded with
    empty rows (segment 0, loss_mask 0).
    """
    if row_len < 2:
        raise InputError(f"row_len must be >= 2, got {row_len}")
    pieces = [c for d in docs if len(d) >= 2 for c in _chunks(d, row_len)]
    rows: list[list[list[int]]] = []
    free: list[int] = []
    for piece in sorted(pieces, key=len, reverse=True):
        for r in range(max(0, len(rows) - 64), len(rows)):  # first fit among recent rows
            if len(piece) <= free[r]:
                rows[r].append(piece)
                free[r] -= len(piece)
                break
        else:
            rows.append([piece])
            free.append(row_len - len(piece))
    for start in range(0, len(rows), batch_size):
        batch = {k: np.zeros((batch_size, row_len), np.int32)
                 for k in ("tokens", "segment_ids", "positions", "targets")}
        batch["loss_mask"] = np.zeros((batch_size, row_len), np.float32)
        for r, row in enumerate(rows[start:start + batch_size]):
            at = 0
            for seg, piece in enumerate(row, start=1):
                n = len(piece)
                batch["tokens"][r, at:at + n] = piece
                batch["segment_ids"][r, at:at + n] = seg
                batch["positions"][r, at:at + n] = np.arange(n)
                batch["targets"][r, at:at + n - 1] = piece[1:]
                batch["loss_mask"][r, at:at + n - 1] = 1.0
                at += n
        yield batch


def evaluate_token_lists(model, variables, docs: Sequence[Sequence[int]], *,
                         row_len: int | None = None, batch_size: int = 8) -> PerplexityResult:
    """Loss over tokenized documents, packed here (see `pack_documents`)."""
    row_len = row_len or int(model.config.max_len)
    if row_len > model.config.max_len:
        raise InputError(f"row_len {row_len} exceeds the model's max_len {model.config.max_len}")
    res = evaluate_batches(model, variables, pack_documents(docs, row_len, batch_size))
    expected = sum(len(d) - 1 for d in docs if len(d) >= 2)
    if res.num_tokens != expected:  # the accounting promise of this module, checked every run
        raise AssertionError(f"counted {res.num_tokens} predictions, expected {expected}")
    return dataclasses.replace(res, num_documents=len(docs))


def evaluate_texts(model, variables, tokenizer, texts: Iterable[str], *, add_bos: bool = False,
                   row_len: int | None = None, batch_size: int = 8) -> PerplexityResult:
    """Loss over raw texts. `add_bos=True` prepends BOS so the first real token is predicted too."""
    docs = [tokenizer.encode(t, add_bos=add_bos) for t in texts]
    return evaluate_token_lists(model, variables, docs, row_len=row_len, batch_size=batch_size)


def dataset_batches(data_cfg, tokenizer, *, seq_len: int, batch_size: int
                    ) -> Iterable[dict[str, np.ndarray]]:
    """One ordered pass over a `phi_jax.data.pipeline` source (no shuffling, last batch kept)."""
    from phi_jax.data import pipeline

    cfg = pipeline.default_data_config()
    cfg.update(dict(data_cfg))
    cfg.shuffle, cfg.num_epochs, cfg.drop_remainder = False, 1, False
    return pipeline.build_dataset(cfg, tokenizer, seq_len=seq_len, batch_size=batch_size)
