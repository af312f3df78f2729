"""The jit-compiled train step: masked next-token loss, gradient accumulation, guarded update.

Letters: A accumulation steps, B micro-batch, T sequence length, V vocab.

The state is a plain dict pytree {"step", "params", "opt_state", "rng", "nonfinite_streak",
"nonfinite_total"} so Orbax saves it as it is. A step is skipped — params and optimizer state stay
as they were and the counters go up — when its loss or gradient norm is not finite, *or* when the
update it would apply is: a finite gradient times a huge learning rate (1e39 overflows float32)
gives infinite parameters, which a loss-only guard would save as the "last good" checkpoint. The
loop stops the run after too many skips in a row, so a NaN never reaches parameters or a checkpoint.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from phi_jax.model import Phi
from phi_jax.training.loss import loss_sums

State = dict[str, Any]
Batch = dict[str, jax.Array]


def _split_micro(batch: Batch, accum_steps: int) -> Batch:
    """[A*B, T] -> [A, B, T], with micro-batch a taking rows a, a+A, ... (keeps data sharding)."""
    return jax.tree.map(lambda x: x.reshape(x.shape[0] // accum_steps, accum_steps, *x.shape[1:])
                        .swapaxes(0, 1), batch)


def _where_tree(pred, new, old):
    return jax.tree.map(lambda a, b: jnp.where(pred, a, b), new, old)


def all_finite(tree) -> jax.Array:
    """True when every element of every leaf is finite: one fused reduction (an overflowing
    global norm would call a tree of large but finite values non-finite)."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
              if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def make_train_step(model: Phi, optimizer: optax.GradientTransformation, *, accum_steps: int = 1,
                    schedule: Callable | None = None, nan_steps: tuple[int, ...] = (),
                    loss_chunk: int = 0, freeze_base: bool = False):
    """The un-jitted step function (state, batch) -> (state, metrics); the caller jits it.

    `freeze_base` (LoRA): the step differentiates the adapter's leaves alone (`lora.split_adapter`);
    the frozen base enters the loss as a plain argument, so it has no gradient, no accumulator and
    no update, and XLA never computes its weight-gradient matmuls. `optimizer` must then hold
    state for the adapter only (`make_optimizer(freeze_base=True)`).

    `loss_chunk` > 0 computes the LM head and loss over chunks of that many positions (see
    train/loss.py). `nan_steps` is fault injection for tests of the non-finite guard
    (`phi_jax._faults`): the loss and gradients of those steps are multiplied by NaN.
    """
    deterministic = model.config.resid_pdrop == 0.0 and model.config.embd_pdrop == 0.0
    if freeze_base:
        from phi_jax.lora import join_adapter, split_adapter

    def loss_fn(trainable, frozen, *args):
        params = trainable if frozen is None else join_adapter(frozen, trainable)
        return loss_sums(params, *args, chunk=loss_chunk)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)  # d/d(trainable) only

    def step_fn(state: State, batch: Batch):
        # LoRA: the base is an argument the gradient is not taken in, so no gradient, accumulator,
        # update or finiteness check of its size exists; it passes through the step unchanged.
        trainable, frozen = split_adapter(state["params"]) if freeze_base else (state["params"], None)
        rng, step_rng = jax.random.split(state["rng"])
        micro = _split_micro(batch, accum_steps)

        def accumulate(carry, inputs):
            index, mb = inputs
            (loss_sum, count), grads = grad_fn(trainable, frozen, mb, model,
                                               jax.random.fold_in(step_rng, index), deterministic)
            g_acc, l_acc, c_acc = carry
            return (jax.tree.map(jnp.add, g_acc, grads), l_acc + loss_sum, c_acc + count), None

        zeros = jax.tree.map(jnp.zeros_like, trainable)
        (grads, loss_sum, count), _ = jax.lax.scan(
            accumulate, (zeros, jnp.float32(0), jnp.float32(0)), (jnp.arange(accum_steps), micro))
        denom = jnp.maximum(count, 1.0)
        loss = loss_sum / denom
        if nan_steps:
            poison = jnp.where(jnp.isin(state["step"], jnp.asarray(nan_steps)), jnp.nan, 1.0)
            loss = loss * poison
            grads = jax.tree.map(lambda g: g * poison, grads)
        grads = jax.tree.map(lambda g: g / denom, grads)
        grad_norm = optax.global_norm(grads)
        updates, opt_state = optimizer.update(grads, state["opt_state"], trainable)
        new_params = optax.apply_updates(trainable, updates)
        finite = (jnp.isfinite(loss) & jnp.isfinite(grad_norm) & all_finite(new_params)
                  & all_finite(opt_state))
        new_state = {
            "step": state["step"] + 1,
            "params": (_where_tree(finite, new_params, trainable) if frozen is None
                       else join_adapter(frozen, _where_tree(finite, new_params, trainable))),
            "opt_state": _where_tree(finite, opt_state, state["opt_state"]),
            "rng": rng,
            "nonfinite_streak": jnp.where(finite, 0, state["nonfinite_streak"] + 1),
            "nonfinite_total": state["nonfinite_total"] + jnp.where(finite, 0, 1),
        }
        metrics = {"loss": loss, "grad_norm": grad_norm, "tokens": count, "finite": finite,
                   "nonfinite_streak": new_state["nonfinite_streak"]}
        if schedule is not None:
            metrics["lr"] = schedule(state["step"])
        return new_state, metrics

    return step_fn


def init_state(params, optimizer: optax.GradientTransformation, seed: int) -> State:
    return {"step": jnp.int32(0), "params": params, "opt_state": optimizer.init(params),
            "rng": jax.random.PRNGKey(seed), "nonfinite_streak": jnp.int32(0),
            "nonfinite_total": jnp.int32(0)}
