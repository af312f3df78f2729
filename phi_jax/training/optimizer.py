"""AdamW with warmup + cosine/linear decay, decoupled weight decay on matrices only, clipping.

Weight decay is masked off LayerNorm parameters and biases (the usual GPT/Phi recipe): only
leaves named `kernel` or `embedding` decay.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
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


def make_optimizer(cfg: Mapping[str, Any], total_steps: int, *,
                   freeze_base: bool = False) -> optax.GradientTransformation:
    """The full update rule; the returned transformation expects already-averaged gradients.

    `freeze_base` (LoRA): only the adapter's leaves (`lora_a`, `lora_b`) are updated and have Adam
    state; every other parameter gets a zero update (`adapter_only`).
    """
    schedule = learning_rate_schedule(cfg, total_steps)
    parts = []
    if cfg.grad_clip and cfg.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(cfg.grad_clip))
    parts.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                             weight_decay=cfg.weight_decay, mask=decay_mask))
    update = optax.chain(*parts)
    return adapter_only(update) if freeze_base else update


def _adapter_subtree(tree: Mapping) -> dict:
    """The branches of a parameter-shaped dict tree that lead to LoRA leaves, nothing else."""
    from phi_jax.lora import split_adapter

    return split_adapter(tree)[0]


def _graft(full: Mapping, sub: Mapping) -> dict:
    return {k: (_graft(v, sub[k]) if isinstance(v, Mapping) else sub[k]) if k in sub else v
            for k, v in full.items()}


def adapter_only(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """`inner` applied to the LoRA leaves alone (its state holds only theirs); every other
    parameter gets a zero update. (optax.multi_transform does the same with MaskedNode
    placeholders in its state, which the logical-sharding and Orbax trees do not carry.)"""
    def init(params):
        return inner.init(_adapter_subtree(params))

    def update(updates, state, params=None):
        sub, state = inner.update(_adapter_subtree(updates), state,
                                  None if params is None else _adapter_subtree(params))
        return _graft(jax.tree.map(jnp.zeros_like, updates), sub), state

    return optax.GradientTransformation(init, update)
