"""AdamW with warmup + cosine/linear decay, decoupled weight decay on matrices only, clipping.

Weight decay is masked off LayerNorm parameters and biases (the usual GPT/Phi recipe): only
leaves named `kernel` or `embedding` decay.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import optax

DECAYED_LEAVES = ("kernel", "embedding")
SCHEDULES = ("cosine", "linear", "constant")


def learning_rate_schedule(cfg: Mapping[str, Any], total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to cfg.lr, then cosine or linear decay to cfg.lr * cfg.min_lr_ratio."""
    if cfg.schedule not in SCHEDULES:
        raise ValueError(f"optimizer.schedule={cfg.schedule!r}; use one of {SCHEDULES}")
    warmup = min(int(cfg.warmup_steps), total_steps)
    decay_steps = max(total_steps - warmup, 1)
    end = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "cosine":
        decay = optax.cosine_decay_schedule(cfg.lr, decay_steps, alpha=cfg.min_lr_ratio)
    elif cfg.schedule == "linear":
        decay = optax.linear_schedule(cfg.lr, end, decay_steps)
    else:
        decay = optax.constant_schedule(cfg.lr)
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warmup), decay], [warmup])


def _last_dict_key(path) -> str | None:
    for entry in reversed(path):
        if isinstance(entry, jax.tree_util.DictKey):
            return str(entry.key)
    return None


def decay_mask(params):
    """True for the leaves that get weight decay (matrices), False for LayerNorm and biases."""
    return jax.tree_util.tree_map_with_path(lambda path, _: _last_dict_key(path) in DECAYED_LEAVES,
                                            params)


def make_optimizer(cfg: Mapping[str, Any], total_steps: int) -> optax.GradientTransformation:
    """The full update rule; the returned transformation expects already-averaged gradients."""
    schedule = learning_rate_schedule(cfg, total_steps)
    parts = []
    if cfg.grad_clip and cfg.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(cfg.grad_clip))
    parts.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                             weight_decay=cfg.weight_decay, mask=decay_mask))
    return optax.chain(*parts)
