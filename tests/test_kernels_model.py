"""The model with the Pallas kernels (interpret mode on CPU) equals the model with the XLA
references: logits and parameter gradients on packed rows with padding, and greedy generation
(prefill and decode through the cached-attention kernel).

Tolerances (float32 model): logits 1e-4 absolute, gradients 1e-4 * max|grad| per leaf; the only
differences are summation orders inside attention.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from phi_jax.config import preset
from phi_jax.inference.decode import generate
from phi_jax.model import Phi, init_params


def packed_batch(vocab: int, length: int):
    """Two rows: three documents + padding, and one document + padding; positions restart per
    document as the packer emits them."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, vocab, (2, length)).astype(np.int32)
    seg = np.zeros((2, length), np.int32)
    seg[0, :7], seg[0, 7:15], seg[0, 15:length - 3] = 1, 2, 3
    seg[1, :length - 9] = 1
    positions = np.zeros_like(seg)
    for r in range(2):
        for s in np.unique(seg[r][seg[r] > 0]):
            idx = np.flatnonzero(seg[r] == s)
            positions[r, idx] = np.arange(len(idx))
    return tokens, positions, seg


@pytest.mark.slow
def test_model_pallas_matches_xla_logits_and_grads():
    """phi-2's head dim 80 and rotary factor 0.4 (GQA: see the generate test)."""
    config = preset("test-phi-2")
    params = init_params(config, jax.random.key(0))
    tokens, positions, seg = packed_batch(config.vocab_size, 24)
    weights = jnp.asarray(seg != 0, jnp.float32)

    def loss_and_logits(cfg):
        model = Phi(cfg)

        def loss(p):
            logits, _ = model.apply(p, tokens, positions=positions, segment_ids=seg)
            logp = jax.nn.log_softmax(logits)
            nll = -jnp.take_along_axis(logp[:, :-1], tokens[:, 1:, None], -1)[..., 0]
            return jnp.sum(nll * weights[:, 1:]) / jnp.sum(weights[:, 1:]), logits

        return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)

    (loss_x, logits_x), grads_x = loss_and_logits(config)
    (loss_p, logits_p), grads_p = loss_and_logits(
        config.replace(attention_impl="pallas", rotary_impl="pallas"))
    np.testing.assert_allclose(np.asarray(logits_p), np.asarray(logits_x), atol=1e-4)
    np.testing.assert_allclose(float(loss_p), float(loss_x), rtol=1e-5)
    for path, gp, gx in zip(jax.tree_util.tree_leaves_with_path(grads_p),
                            jax.tree.leaves(grads_p), jax.tree.leaves(grads_x)):
        scale = max(float(jnp.max(jnp.abs(gx))), 1e-6)
        err = float(jnp.max(jnp.abs(gp - gx)))
        assert err <= 1e-4 * scale, f"{jax.tree_util.keystr(path[0])}: {err} > 1e-4 * {scale}"


@pytest.mark.slow
def test_generate_with_decode_kernel_gives_the_same_greedy_tokens():
    """Bucketed prefill (T = 32) and decode steps (T = 1) through the cached kernel, with GQA."""
    config = preset("test-gqa")
    params = init_params(config, jax.random.key(3))
    prompts = [[5, 9, 11], list(range(3, 22)), [7] * 9]
    want = generate(Phi(config), params, prompts, max_new_tokens=6, stop_tokens=[])
    got = generate(Phi(config.replace(attention_impl="pallas", rotary_impl="pallas")),
                           params, prompts, max_new_tokens=6, stop_tokens=[])
    assert got == want
    assert [len(x) for x in got] == [6, 6, 6]
