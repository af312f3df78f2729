"""Your own training loop over phi_jax's model and train step, with your own data and loss.

    python examples/custom_training_loop.py            # a few seconds on a CPU

Part 1 uses `make_train_step` (masked next-token loss, gradient accumulation, the non-finite guard)
on batches you build yourself; part 2 writes the step by hand around `model.apply` with a loss of
your own (here: label-smoothed cross-entropy), which is all a step is: value_and_grad + optax.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import phi_jax
from phi_jax.training.step import init_state, make_train_step

# A small model; any preset or a loaded one works the same (phi_jax.load(...).model / .variables).
config = phi_jax.preset("tiny", vocab_size=256, d_model=64, n_layers=2, n_heads=4, mlp_dim=128,
                        max_len=64)
model = phi_jax.Phi(config)
variables = phi_jax.init_params(config, jax.random.PRNGKey(0))

# Data: bytes of this file as tokens (vocab 256), cut into rows of T+1 tokens. B rows, T positions.
data = np.frombuffer(open(__file__, "rb").read(), dtype=np.uint8).astype(np.int32)
B, T = 8, 32


def batch_at(i: int) -> dict:
    """One packed batch in the train step's format: tokens, targets, positions, segment_ids, loss_mask."""
    starts = (np.arange(B) * 97 + i * B * 31) % (len(data) - T - 1)
    rows = np.stack([data[s:s + T + 1] for s in starts])  # [B, T+1]
    return {"tokens": rows[:, :-1], "targets": rows[:, 1:],
            "positions": np.tile(np.arange(T, dtype=np.int32), (B, 1)),
            "segment_ids": np.ones((B, T), np.int32), "loss_mask": np.ones((B, T), np.float32)}


# Part 1: phi_jax's step, your loop.
optimizer = optax.adamw(3e-3)
step = jax.jit(make_train_step(model, optimizer), donate_argnums=0)
state = init_state(variables["params"], optimizer, seed=0)
for i in range(20):
    state, metrics = step(state, batch_at(i))
    if i % 5 == 0 or i == 19:
        print(f"make_train_step  step {i:2d}  loss {float(metrics['loss']):.3f}")


# Part 2: your own loss around model.apply.
def smoothed_loss(params, batch, smoothing=0.1):
    logits, _ = model.apply({"params": params}, batch["tokens"], batch["positions"],
                            batch["segment_ids"])  # [B,T,V]
    labels = optax.smooth_labels(jax.nn.one_hot(batch["targets"], config.vocab_size), smoothing)
    per_token = optax.softmax_cross_entropy(logits, labels)  # [B,T]
    return jnp.sum(per_token * batch["loss_mask"]) / jnp.sum(batch["loss_mask"])


@jax.jit
def my_step(params, opt_state, batch):
    loss, grads = jax.value_and_grad(smoothed_loss)(params, batch)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


params = state["params"]
opt_state = optimizer.init(params)
for i in range(20, 30):
    params, opt_state, loss = my_step(params, opt_state, batch_at(i))
print(f"own loss         step 29  loss {float(loss):.3f}")

# The trained weights generate through the one decoder (ids in, ids out at this level).
prompt = [list(data[:16])]
new = phi_jax.generate(model, {"params": params}, prompt, max_new_tokens=16, temperature=0.0)
print("greedy continuation:", bytes(np.asarray(new[0], dtype=np.uint8)).decode("latin-1"))
