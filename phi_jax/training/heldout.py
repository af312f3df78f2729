"""The held-out loss: the number a run is judged by, rather than one lucky training batch.

`data.heldout_fraction` of the documents (a fixed hash of their index, see
`pipeline.heldout_mask`) never reach training; `train.eval_batches` batches of them are packed once,
kept in memory, and scored with the training loss (every target token, deterministic, no
dropout) at each checkpoint, every `train.eval_every` steps if set, and at the end. The same
batches every time, so the curve is comparable across steps and across resumes.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

import jax
import numpy as np

from phi_jax.training.loss import loss_sums

log = logging.getLogger(__name__)


class HeldOut:
    """Materialised held-out batches and a jitted scorer; `evaluate(params)` -> mean loss or None."""

    def __init__(self, batches: list[dict[str, np.ndarray]], score: Callable | None,
                 batch_sharding, tokens: int):
        self._batches, self._score, self._sharding = batches, score, batch_sharding
        self.tokens = tokens
        self.seconds = 0.0  # spent evaluating, over every call

    @property
    def enabled(self) -> bool:
        return bool(self._batches)

    def evaluate(self, params) -> float | None:
        if not self._batches:
            return None
        from phi_jax.data import pipeline

        start = time.perf_counter()
        total = count = 0.0
        for batch in self._batches:
            loss_sum, n = jax.device_get(self._score(params, pipeline.to_global_batch(batch, self._sharding)))
            total, count = total + float(loss_sum), count + float(n)
        self.seconds += time.perf_counter() - start
        return total / count if count else None


def build(config, tokenizer, model, *, param_shardings, batch_sharding) -> HeldOut:
    """The held-out batches for this run (empty when eval is off or no document is held out)."""
    from phi_jax.data import pipeline

    tc = config.train
    hosts = jax.process_count()
    if tc.eval_batches <= 0 or config.data.heldout_fraction <= 0:
        return HeldOut([], None, batch_sharding, 0)
    data_cfg = config.data.to_dict()
    data_cfg.update(shuffle=False, num_epochs=1, drop_remainder=False, num_workers=0)
    try:  # every host reads the whole (small) held-out split: the same rows on each host keep
        # the global mean exact and every host's batch count equal, whatever the split's size
        data = pipeline.build_dataset(data_cfg, tokenizer, seq_len=tc.seq_len,
                                      batch_size=tc.batch_size // hosts, seed=tc.seed,
                                      split="heldout")
    except ValueError as e:  # e.g. a corpus too small to hold anything out
        log.warning("no held-out loss for this run: %s", e)
        return HeldOut([], None, batch_sharding, 0)
    batches: list[dict[str, Any]] = []
    for batch in data:
        batches.append(batch)
        if len(batches) == tc.eval_batches:
            break
    tokens = int(sum(b["loss_mask"].sum() for b in batches))
    score = jax.jit(lambda params, batch: loss_sums(params, batch, model, None, True),
                    in_shardings=(param_shardings, batch_sharding))
    return HeldOut(batches, score, batch_sharding, tokens)
