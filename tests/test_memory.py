"""What fine-tuning holds: the LoRA step differentiates the adapter alone (no gradient, update or
optimizer state of the frozen base), layer remat changes no loss or gradient, and the retaining
allocator's bounding settings reach the re-executed process. (Sizes and peaks are measured in
benchmarks/memory.py, never asserted here.)"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from phi_jax import allocator, lora
from phi_jax.config import preset
from phi_jax.model import Phi, init_params
from phi_jax.training.loss import loss_sums
from phi_jax.training.optimizer import make_optimizer
from phi_jax.training.step import init_state, make_train_step

OPT = ml_collections.ConfigDict({"lr": 1e-2, "b1": 0.9, "b2": 0.98, "eps": 1e-7, "weight_decay": 0.1,
                                 "grad_clip": 1.0, "schedule": "constant", "warmup_steps": 0,
                                 "min_lr_ratio": 1.0})


def _batch(b: int = 2, t: int = 16, vocab: int = 128, seed: int = 0):
    tokens = np.random.default_rng(seed).integers(0, vocab, (b, t + 1)).astype(np.int32)
    return {"tokens": tokens[:, :-1], "targets": tokens[:, 1:],
            "positions": np.tile(np.arange(t, dtype=np.int32), (b, 1)),
            "segment_ids": np.ones((b, t), np.int32), "loss_mask": np.ones((b, t), np.float32)}


def _lora_setup(remat: str = "none"):
    base = preset("test").replace(remat_policy=remat)
    config = lora.with_lora(base, 4, 8.0, ["q_proj", "fc2"])
    variables = lora.add_lora_params(config, init_params(base, jax.random.key(0)), jax.random.key(1))
    # B starts at zero (PEFT's init); move it so that the adapter's gradients are all non-zero
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: x + 0.01 if p[-1].key == "lora_b" else x, variables["params"])
    return config, params


def test_split_and_join_adapter_round_trip():
    _, params = _lora_setup()
    adapter, frozen = lora.split_adapter(params)
    assert {p[-1].key for p, _ in jax.tree_util.tree_leaves_with_path(adapter)} == set(lora.LORA_LEAVES)
    assert not any(p[-1].key in lora.LORA_LEAVES for p, _ in jax.tree_util.tree_leaves_with_path(frozen))
    joined = lora.join_adapter(frozen, adapter)
    assert jax.tree.structure(joined) == jax.tree.structure(params)
    assert all(a is b for a, b in zip(jax.tree.leaves(joined), jax.tree.leaves(params)))


def test_lora_step_differentiates_only_the_adapter():
    """The optimizer state is the adapter's alone, and in the step's program every base weight
    goes out exactly as it came in: no gradient, update or `where` of the base exists to hold."""
    config, params = _lora_setup()
    optimizer = make_optimizer(OPT, 10, freeze_base=True)
    state = init_state(params, optimizer, 0)
    adapter, frozen = lora.split_adapter(params)
    mu = optax.tree_utils.tree_get(state["opt_state"], "mu")
    assert jax.tree.structure(mu) == jax.tree.structure(adapter)
    opt_elems = sum(x.size for x in jax.tree.leaves(state["opt_state"]) if x.ndim)  # not the counts
    assert opt_elems == 2 * sum(x.size for x in jax.tree.leaves(adapter))  # mu and nu

    step_fn = make_train_step(Phi(config), optimizer, freeze_base=True)
    batch = _batch()
    closed = jax.make_jaxpr(step_fn)(state, batch)
    in_paths = [p for p, _ in jax.tree_util.tree_leaves_with_path((state, batch))]
    out_shape = jax.eval_shape(step_fn, state, batch)
    out_paths = [p for p, _ in jax.tree_util.tree_leaves_with_path(out_shape)]
    invars, outvars = closed.jaxpr.invars, closed.jaxpr.outvars
    base_paths = [p for p, _ in jax.tree_util.tree_leaves_with_path(frozen)]
    for path in base_paths:
        i = in_paths.index((jax.tree_util.SequenceKey(0), jax.tree_util.DictKey("params"), *path))
        o = out_paths.index((jax.tree_util.SequenceKey(0), jax.tree_util.DictKey("params"), *path))
        assert outvars[o] is invars[i], f"base leaf {jax.tree_util.keystr(path)} is recomputed"
    # and the gradient really reaches every adapter leaf
    new, metrics = jax.jit(step_fn)(state, batch)
    moved = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), lora.split_adapter(new["params"])[0], adapter)
    assert all(jax.tree.leaves(moved)) and bool(metrics["finite"])


@pytest.mark.slow
def test_lora_step_equals_the_masked_full_gradient():
    """Differentiating the adapter alone gives the adapter's part of the whole gradient."""
    config, params = _lora_setup()
    model, batch = Phi(config), _batch()
    whole = jax.grad(lambda p: loss_sums(p, batch, model, None, True)[0])(params)
    _, frozen = lora.split_adapter(params)
    adapter_only = jax.grad(lambda a: loss_sums(lora.join_adapter(frozen, a), batch, model, None,
                                                True)[0])(lora.split_adapter(params)[0])
    expected = lora.split_adapter(whole)[0]
    for a, b in zip(jax.tree.leaves(adapter_only), jax.tree.leaves(expected)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.slow
@pytest.mark.parametrize("freeze", [False, True], ids=["full", "lora"])
def test_remat_changes_no_loss_or_gradient(freeze):
    """Layer remat recomputes activations in the backward pass: the same numbers (float32,
    reassociation only), whole-head and chunked loss alike."""
    results = {}
    for remat in ("none", "full"):
        if freeze:
            config, params = _lora_setup(remat)
        else:
            config = preset("test").replace(remat_policy=remat)
            params = init_params(config, jax.random.key(0))["params"]
        optimizer = make_optimizer(OPT, 10, freeze_base=freeze)
        state = init_state(params, optimizer, 0)
        step = jax.jit(make_train_step(Phi(config), optimizer, freeze_base=freeze, loss_chunk=8))
        new, metrics = step(state, _batch())
        results[remat] = (float(metrics["loss"]), float(metrics["grad_norm"]), new["params"])
    loss0, norm0, params0 = results["none"]
    for remat in ("full",):
        loss, norm, new = results[remat]
        np.testing.assert_allclose(loss, loss0, rtol=1e-6)
        np.testing.assert_allclose(norm, norm0, rtol=1e-5)
        for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(params0)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_finetune_config_rematerialises_and_chunks_the_head():
    """The fine-tuning config turns on what benchmarks/memory.py measured to lower the peak."""
    from phi_jax.training.config_file import load_config
    from train_helpers import ROOT

    config = load_config(str(ROOT / "configs" / "finetune_smollm2_lora.py"))
    assert config.model.remat_policy == "full"
    assert config.train.loss_chunk > 0


# ------------------------------------------------------------------------------------ allocator
def _reexec_env(monkeypatch, tmp_path, **env) -> dict:
    """The environment `reexec_with_retaining_allocator` would start the new process with."""
    library = tmp_path / "libtcmalloc_minimal.so.4"
    library.write_bytes(b"")
    for key in [k for k in os.environ if k.startswith("TCMALLOC_") or k.startswith("PHI_JAX_ALLOC")]:
        monkeypatch.delenv(key)
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.setenv(allocator.PATH_ENV, str(tmp_path))
    monkeypatch.setenv(allocator.ENV, "tcmalloc")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    seen = {}

    def execve(path, argv, new_env):
        seen.update(argv=argv, env=new_env)

    monkeypatch.setattr(os, "execve", execve)
    allocator.reexec_with_retaining_allocator(["--version"])
    return seen


def test_reexec_applies_the_bounding_settings(monkeypatch, tmp_path):
    seen = _reexec_env(monkeypatch, tmp_path)
    assert seen["env"]["LD_PRELOAD"] == str(tmp_path / "libtcmalloc_minimal.so.4")
    for key, value in allocator.settings("tcmalloc").items():
        assert seen["env"][key] == value
    assert seen["argv"][-3:] == ["-m", "phi_jax.cli", "--version"]


def test_a_users_own_allocator_setting_wins(monkeypatch, tmp_path):
    seen = _reexec_env(monkeypatch, tmp_path, TCMALLOC_RELEASE_RATE="7")
    assert seen["env"]["TCMALLOC_RELEASE_RATE"] == "7"


def test_the_cli_runs_under_an_allocator_found_on_the_extra_path(tmp_path):
    """Through the real entry point, when tcmalloc is installed somewhere we can point at."""
    import subprocess
    import sys

    found = allocator.find("tcmalloc")
    if found is None:
        pytest.skip("tcmalloc is not installed here")
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", allocator.ENV)}
    env[allocator.PATH_ENV] = os.path.dirname(found)
    out = subprocess.run([sys.executable, "-m", "phi_jax.cli", "--version"], env=env, text=True,
                         capture_output=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("allocator tcmalloc)")
