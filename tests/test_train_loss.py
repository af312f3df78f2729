"""The chunked LM loss equals the whole-sequence one (value and gradients), for untied and tied
heads, with a length that does not divide into chunks; and the head function equals the model's."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from phi_jax.config import preset
from phi_jax.model import Phi, init_params, lm_head_logits
from phi_jax.training.loss import loss_sums


def _batch(config, b=2, t=13, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, config.vocab_size, (b, t)).astype(np.int32)
    segment_ids = np.ones((b, t), np.int32)
    segment_ids[1, 9:] = 0  # padding
    mask = (segment_ids > 0).astype(np.float32)
    mask[0, 4] = 0.0  # an untrained position
    return {"tokens": tokens, "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)),
            "segment_ids": segment_ids, "targets": np.roll(tokens, -1, axis=1), "loss_mask": mask}


@pytest.mark.parametrize("name", ["test", "test-llama"])
def test_chunked_loss_equals_whole(name):
    config = preset(name)
    model, params = Phi(config), init_params(config, jax.random.key(1))["params"]
    batch = _batch(config)
    whole = jax.value_and_grad(lambda p: loss_sums(p, batch, model, None, True)[0])
    chunked = jax.value_and_grad(lambda p: loss_sums(p, batch, model, None, True, chunk=4)[0])
    (v0, g0), (v1, g1) = whole(params), chunked(params)
    np.testing.assert_allclose(v1, v0, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
    assert loss_sums(params, batch, model, None, True, chunk=4)[1] == batch["loss_mask"].sum()


@pytest.mark.parametrize("name", ["test", "test-llama"])
def test_head_function_is_the_models_head(name):
    config = preset(name)
    model, variables = Phi(config), init_params(config, jax.random.key(2))
    tokens = jnp.asarray(_batch(config)["tokens"])
    logits, _ = model.apply(variables, tokens)
    hidden, _ = model.apply(variables, tokens, return_hidden=True)
    np.testing.assert_array_equal(lm_head_logits(config, variables["params"], hidden), logits)
