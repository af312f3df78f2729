"""Sharded training equals single-device training; parameters are split as the rules say;
checkpoints move between meshes.

Every run is the real trainer (`train(config, workdir)`, configs/tiny.py:runlocal, batch 8, ten
steps) on 8 fake CPU devices; only `config.mesh.shape` changes. The reference runs the same
config on one device. Sharding changes the order of floating-point sums (all-reduces, split
matmuls), so equality is up to float32 rounding carried through ten Adam steps: losses agree to
3e-6 relative and parameters to 4e-6 absolute: ten times the largest deviations measured over
the four meshes (3.3e-7 and 4.1e-7; the parameters are O(0.02-1), the losses ~6).
"""

from __future__ import annotations

import shutil

import jax
import numpy as np
import pytest

from phi_jax import sharding
from phi_jax import checkpoint
from phi_jax.training import loop

from train_helpers import runlocal_config

STEPS = 10
MESHES = [(8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 2, 4)]
LOSS_RTOL = 3e-6
PARAM_ATOL = 4e-6

# What the default rules must do to a few named parameters, written out by hand (logical names
# as model.py gives them; batch -> (data, fsdp), embed -> fsdp, heads/kv_heads/mlp/vocab ->
# tensor, the rest replicated).
EXPECTED_SPECS = {
    ("embed_tokens", "embedding"): ("tensor", "fsdp"),  # [V, D]
    ("layers", "block", "self_attn", "q_proj", "kernel"): (None, "fsdp", "tensor", None),  # [L,D,N,H]
    ("layers", "block", "self_attn", "dense", "kernel"): (None, "tensor", None, "fsdp"),  # [L,N,H,D]
    ("layers", "block", "mlp", "fc1", "kernel"): (None, "fsdp", "tensor"),  # [L, D, F]
    ("layers", "block", "mlp", "fc2", "kernel"): (None, "tensor", "fsdp"),  # [L, F, D]
    ("layers", "block", "mlp", "fc1", "bias"): (None, "tensor"),  # [L, F]
    ("layers", "block", "input_layernorm", "scale"): (None, None),  # [L, D]
    ("lm_head", "kernel"): ("fsdp", "tensor"),  # [D, V]
    ("lm_head", "bias"): ("tensor",),  # [V]
}


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from phi_jax.data import corpus

    workdir = tmp_path_factory.mktemp("tok")
    corpus.get_or_train_tokenizer(workdir, vocab_size=512)
    return workdir / "tokenizer"


def _config(tokenizer_dir, shape):
    config = runlocal_config(tokenizer_dir, steps=STEPS, checkpoint_every=5, async_checkpoint=False)
    config.mesh.shape.update(dict(zip(sharding.MESH_AXES, shape)))
    # Scanned layers, as multi-device training runs them: the stacked [L, ...] weights are what these
    # tests shard and check (configs/tiny.py itself trains unrolled, the faster layout on one CPU).
    config.model.scan_layers = True
    return config


def _train_and_capture(config, workdir, devices=None):
    """train(), recording the parameters (arrays, as saved) of every checkpoint it writes."""
    saved = {}
    real_save, real_make_mesh = checkpoint.save, sharding.make_mesh

    def spy_save(manager, step, *, params, **kwargs):
        # the arrays themselves (for their shardings) and their values now, before the next step
        # donates their buffers
        saved[step] = {"arrays": params, "values": jax.device_get(params)}
        return real_save(manager, step, params=params, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(checkpoint, "save", spy_save)
        if devices is not None:
            mp.setattr(sharding, "make_mesh", lambda sizes, _=None: real_make_mesh(sizes, devices))
        summary = loop.train(config, workdir)
    return summary, saved


@pytest.fixture(scope="module")
def runs(tokenizer_dir, tmp_path_factory):
    """Lazily computed runs, keyed by mesh shape ("single" = one device), shared by the tests."""
    cache = {}

    def get(shape):
        if shape not in cache:
            workdir = tmp_path_factory.mktemp("run")
            if shape == "single":
                config = _config(tokenizer_dir, (1, 1, 1))
                cache[shape] = (workdir, *_train_and_capture(config, workdir, jax.devices()[:1]))
            else:
                cache[shape] = (workdir, *_train_and_capture(_config(tokenizer_dir, shape), workdir))
        return cache[shape]

    return get


def _leaf(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def _assert_close_params(a, b):
    worst = max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
                for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    assert worst <= PARAM_ATOL, f"parameters differ by up to {worst:.2e}"


@pytest.mark.slow
@pytest.mark.parametrize("shape", MESHES, ids=lambda s: "x".join(map(str, s)))
def test_sharded_training_matches_single_device(runs, shape):
    _, ref_summary, ref_saved = runs("single")
    _, summary, saved = runs(shape)
    assert len(summary["losses"]) == STEPS
    np.testing.assert_allclose(summary["losses"], ref_summary["losses"], rtol=LOSS_RTOL, atol=0)
    assert summary["losses"][-1] < summary["losses"][0] - 0.3  # it trained
    _assert_close_params(saved[STEPS]["values"], ref_saved[STEPS]["values"])

    mesh_sizes = dict(zip(sharding.MESH_AXES, shape))
    for path, expected in EXPECTED_SPECS.items():
        array = _leaf(saved[STEPS]["arrays"], path)
        spec = tuple(array.sharding.spec) + (None,) * (array.ndim - len(array.sharding.spec))
        assert spec == expected, f"{'/'.join(path)}: {spec} != {expected}"
        shard = tuple(d // (mesh_sizes[a] if a else 1) for d, a in zip(array.shape, expected))
        assert {s.data.shape for s in array.addressable_shards} == {shard}, "/".join(path)
        assert len(array.addressable_shards) == 8


@pytest.mark.slow
def test_checkpoint_from_one_mesh_restores_onto_another_and_training_continues(runs, tokenizer_dir,
                                                                                 tmp_path):
    from phi_jax.model import Phi
    import jax.numpy as jnp

    src_dir, src_summary, src_saved = runs((2, 2, 2))
    run = tmp_path / "run"
    shutil.copytree(src_dir, run)
    shutil.rmtree(run / "checkpoints" / str(STEPS))  # as if (2,2,2) had stopped at step 5

    # The restore itself is exact, and lands with the new mesh's shardings.
    config = _config(tokenizer_dir, (1, 2, 4))
    mesh = sharding.make_mesh(dict(config.mesh.shape))
    rules = sharding.rules_from_config({})
    model = Phi(loop.model_config_from(config))
    target, _ = sharding.abstract_and_shardings(
        lambda r: model.init(r, jnp.zeros((1, 1), jnp.int32))["params"], jax.random.PRNGKey(0),
        mesh=mesh, rules=rules)
    manager = checkpoint.make_manager(run, read_only=True, async_save=False)
    step, restored = checkpoint.restore_latest(manager, params_target=target)
    assert step == 5
    kernel = restored["params"]["layers"]["block"]["mlp"]["fc1"]["kernel"]
    assert kernel.sharding.mesh.shape == dict(data=1, fsdp=2, tensor=4)
    assert {s.data.shape for s in kernel.addressable_shards} == {(2, 32, 32)}  # [L, D/2, F/4]
    for a, b in zip(jax.tree.leaves(restored["params"]), jax.tree.leaves(src_saved[5]["values"])):
        np.testing.assert_array_equal(np.asarray(a), b)

    # Training resumes on the new mesh from step 5 with the same data and continues as before.
    summary, saved = _train_and_capture(config, run)
    assert summary["start_step"] == 5 and summary["end_step"] == STEPS
    np.testing.assert_allclose(summary["losses"], src_summary["losses"][5:], rtol=LOSS_RTOL, atol=0)
    _assert_close_params(saved[STEPS]["values"], src_saved[STEPS]["values"])


def test_mesh_that_does_not_divide_the_model_names_axis_and_sizes():
    from phi_jax.config import preset

    mesh = sharding.make_mesh({"data": -1, "tensor": 3}, jax.devices()[:6])
    assert dict(mesh.shape) == {"data": 2, "fsdp": 1, "tensor": 3}
    with pytest.raises(ValueError, match=r"mesh axis 'tensor' of size 3 .*'heads' dimension \(32\).*"
                                         r"one of \[1, 2\]"):
        sharding.check_divisibility(preset("phi-2"), mesh, sharding.rules_from_config({}))
    # fsdp=8 splits embed (64) fine but the runlocal model's 4 heads cannot take tensor=8
    mesh = sharding.make_mesh({"tensor": 8})
    with pytest.raises(ValueError, match=r"'tensor' of size 8 .*'heads' dimension \(4\).*\[1, 2, 4\]"):
        sharding.check_divisibility(preset("test"), mesh, sharding.rules_from_config({}))
    # and a mesh that divides every dimension passes
    sharding.check_divisibility(preset("phi-2"), sharding.make_mesh({"fsdp": 8}),
                                sharding.rules_from_config({}))


def test_mesh_shape_errors_name_the_fix():
    with pytest.raises(ValueError, match="at most one axis"):
        sharding.resolve_mesh_shape({"data": -1, "fsdp": -1}, 8)
    with pytest.raises(ValueError, match="multiply to the device count"):
        sharding.resolve_mesh_shape({"data": 2, "fsdp": 2}, 8)
    with pytest.raises(ValueError, match="does not divide the 8 devices"):
        sharding.resolve_mesh_shape({"data": -1, "tensor": 3}, 8)
    with pytest.raises(ValueError, match=r"unknown mesh axes \['model'\]"):
        sharding.resolve_mesh_shape({"model": 2}, 8)
    assert sharding.resolve_mesh_shape({"fsdp": -1, "tensor": 2}, 8) == {"data": 1, "fsdp": 4, "tensor": 2}
    with pytest.raises(ValueError, match="unknown logical axis 'embedding'"):
        sharding.rules_from_config({"embedding": "fsdp"})
    with pytest.raises(ValueError, match=r"unknown mesh axes \['model'\]"):
        sharding.rules_from_config({"embed": "fsdp,model"})


def test_rules_override_changes_the_parameter_shardings():
    from phi_jax.config import preset
    from phi_jax.model import param_logical_axes

    mesh = sharding.make_mesh({"fsdp": 2, "tensor": 4})
    logical = param_logical_axes(preset("test"))
    default = sharding.spec_table(sharding.logical_to_sharding(logical, mesh,
                                                               sharding.rules_from_config({})))
    # ZeRO-style: no tensor parallelism, everything big split over both axes on its embed dim
    zero = sharding.spec_table(sharding.logical_to_sharding(
        logical, mesh, sharding.rules_from_config({"embed": ["fsdp", "tensor"], "heads": None,
                                                   "kv_heads": None, "mlp": None, "vocab": None})))
    key = "params/layers/block/mlp/fc1/kernel"
    assert default[key] == "P(None, 'fsdp', 'tensor')"
    assert zero[key] == "P(None, ('fsdp', 'tensor'), None)"
    # the same overrides spelled as command-line strings
    as_strings = sharding.rules_from_config({"embed": "fsdp,tensor", "heads": "none", "kv_heads": "None",
                                             "mlp": "", "vocab": "none", "batch": "default"})
    assert as_strings == sharding.rules_from_config({"embed": ("fsdp", "tensor"), "heads": None,
                                                     "kv_heads": None, "mlp": None, "vocab": None})
    assert dict(sharding.rules_from_config({"embed": "tensor"}))["embed"] == "tensor"
