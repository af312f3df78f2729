"""Pod-scale planning: the AOT-compiled step's memory, FLOPs and traffic against known answers.

Small models (configs/phi-2.py:runlocal: phi-2's head dim 80 and rotary 0.4, 160 wide) so the
compiles take seconds; the phi-2 table itself is `benchmarks/plan.py`. Known answers used:
  * arguments per device = the state's bytes divided by its shardings (from jax's shard shapes)
    plus this device's batch rows;
  * data parallelism all-reduces the whole float32 gradient: 2 (n-1)/n x 4 x parameters bytes;
  * FSDP never all-reduces the gradient: it reduce-scatters it;
  * the 1-and-2-layer extrapolation equals a direct compile of the deeper model;
  * remat trades memory for FLOPs (none > dots_saveable > full in memory, the reverse in FLOPs)
    without changing the gradients.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from phi_jax import sharding
from phi_jax.training import plan
from phi_jax.config import ModelConfig

from train_helpers import ROOT

SEQ = 64


@pytest.fixture(scope="module")
def small():
    from phi_jax.training.config_file import load_config

    config = load_config(f"{ROOT / 'configs/phi-2.py'}:runlocal")
    return ModelConfig.from_dict(config.model.to_dict()), config.optimizer.to_dict()


def _state_bytes_per_device(model_config, optimizer_cfg, setting, devices):
    """Σ over state leaves of the bytes of one shard, from the shardings the trainer uses."""
    import ml_collections

    from phi_jax.model import Phi
    from phi_jax.training.optimizer import make_optimizer
    from phi_jax.training.step import init_state

    model, opt = Phi(model_config), make_optimizer(ml_collections.ConfigDict(optimizer_cfg), 1000)
    mesh = sharding.make_mesh(dict(setting.mesh), devices)
    rules = sharding.rules_from_config({})
    state, shardings = sharding.abstract_and_shardings(
        lambda r: init_state(model.init(r, jnp.zeros((1, 1), jnp.int32))["params"], opt, 0),
        jax.random.PRNGKey(0), mesh=mesh, rules=rules)
    total = sum(math.prod(s.shard_shape(a.shape)) * a.dtype.itemsize
                for a, s in zip(jax.tree.leaves(state), jax.tree.leaves(shardings)))
    rows = setting.rows_per_device * len(devices) // sharding.batch_divisor(mesh, rules)
    return total + 5 * rows * SEQ * 4  # tokens, segment_ids, positions, targets, loss_mask


@pytest.mark.slow
def test_plan_in_a_subprocess_with_its_own_device_count_matches_direct_compiles(small):
    model_config, opt = small
    deep = model_config.replace(n_layers=3)
    setting = plan.Setting("fsdp", {"fsdp": -1}, "full")
    (result,) = plan.plan(deep, opt, SEQ, num_devices=4, settings=[setting])
    assert result["devices"] == 4 and result["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}

    devices = jax.devices()[:4]  # the same mesh, compiled here directly at full depth, unrolled
    assert result["argument_bytes"] == _state_bytes_per_device(deep, opt, setting, devices)
    compiled, _ = plan.compile_train_step(deep.replace(scan_layers=False, remat_policy="full"), opt,
                                          SEQ, setting, devices)
    direct_flops = compiled.cost_analysis()["flops"]
    assert result["flops"] == pytest.approx(direct_flops, rel=1e-5)
    direct = plan.collective_traffic(compiled.as_text(), 4)
    for kind in ("all-gather", "reduce-scatter", "all-reduce", "total"):
        assert result["collectives"][kind] == pytest.approx(direct[kind], rel=1e-6), kind
    param_bytes = 4 * deep.param_count()
    assert result["collectives"]["all-reduce"] < 0.02 * param_bytes  # FSDP: no gradient all-reduce
    assert 0.8 * 3 / 4 * param_bytes < result["collectives"]["reduce-scatter"] <= 3 / 4 * param_bytes
    assert result["model_flops_per_device"] == pytest.approx(deep.flops_per_token(SEQ) * SEQ)
    assert result["model_flops_per_device"] < result["flops"] < 2 * result["model_flops_per_device"]


@pytest.mark.slow
def test_data_parallel_all_reduces_the_whole_gradient_and_replicates_the_state(small):
    model_config, opt = small
    one_layer = model_config.replace(n_layers=1, scan_layers=False, remat_policy="none")
    setting = plan.Setting("dp", {"data": -1}, "none")
    compiled, mesh = plan.compile_train_step(one_layer, opt, SEQ, setting)
    traffic = plan.collective_traffic(compiled.as_text(), 8)
    expected = 2 * 7 / 8 * 4 * one_layer.param_count()
    assert traffic["all-reduce"] == pytest.approx(expected, rel=1e-3)
    assert traffic["all-gather"] == traffic["reduce-scatter"] == 0
    memory = compiled.memory_analysis()
    assert memory.argument_size_in_bytes == _state_bytes_per_device(one_layer, opt, setting,
                                                                    jax.devices())
    assert memory.argument_size_in_bytes > 3 * 4 * one_layer.param_count()  # params + 2 Adam moments


@pytest.mark.slow
def test_remat_policies_keep_gradients_and_trade_memory_for_flops(small):
    from phi_jax.model import Phi, init_params

    model_config = small[0].replace(n_layers=2, scan_layers=True)
    params = init_params(model_config, jax.random.PRNGKey(0))["params"]
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, SEQ), 0, model_config.vocab_size)
    stats, grads = {}, {}
    for policy in ("none", "dots_saveable", "full"):
        model = Phi(model_config.replace(remat_policy=policy))

        def loss(p):
            return jnp.mean(jax.nn.logsumexp(model.apply({"params": p}, tokens)[0], axis=-1))

        compiled = jax.jit(jax.grad(loss)).lower(params).compile()
        stats[policy] = (compiled.memory_analysis().temp_size_in_bytes,
                         compiled.cost_analysis()["flops"])
        grads[policy] = compiled(params)
    for policy in ("dots_saveable", "full"):
        for a, b in zip(jax.tree.leaves(grads[policy]), jax.tree.leaves(grads["none"])):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    (mem_none, fl_none), (mem_dots, fl_dots), (mem_full, fl_full) = (
        stats[p] for p in ("none", "dots_saveable", "full"))
    assert mem_none > mem_dots > mem_full
    assert fl_none < fl_dots < fl_full


def test_projection_known_answers():
    acc = plan.Accelerator("toy", peak_flops=100.0, hbm_bytes=10 * plan.GIB, hbm_bandwidth=1.0,
                           link_bandwidth=10.0, node_size=4, network_bandwidth=1.0)
    result = {"devices": 4, "flops": 200.0, "model_flops_per_device": 100.0, "bytes_accessed": 7.0,
              "tokens_per_step": 80, "peak_bytes": 9.5 * plan.GIB,
              "collectives": {"intra_node": 30.0, "inter_node": 20.0}}
    p = plan.project(result, acc)
    # one node: all 50 bytes over the 10 B/s links -> 5 s; compute 200/100 = 2 s
    assert p["compute_s"] == 2.0 and p["comm_s"] == 5.0 and p["step_s"] == 7.0
    assert p["mfu"] == pytest.approx(100 / 700) and p["mfu_overlapped"] == pytest.approx(100 / 500)
    assert p["tokens_per_s_per_device"] == pytest.approx(80 / 4 / 7)
    assert p["hbm_s"] == 7.0 and p["fits"] is False  # 9.5 GiB > 90% of 10 GiB
    p = plan.project({**result, "devices": 8, "peak_bytes": 8 * plan.GIB}, acc)
    assert p["comm_s"] == 30 / 10 + 20 / 1 and p["fits"] is True  # two nodes: 20 B over the network


HLO = """
  %pid = u32[] partition-id()
  %offset = s32[] multiply(%pid, %eight)
  %ag = f32[64,32]{1,0} all-gather(%p0), channel_id=1, replica_groups=[2,4]<=[8], dimensions={0}
  %ar = (f32[], f32[16,8]{1,0}) all-reduce(%a, %b), channel_id=2, replica_groups={{0,1},{2,3},{4,5},{6,7}}, to_apply=%add
  %gte0 = f32[] get-tuple-element(%ar), index=0
  %gte1 = f32[16,8]{1,0} get-tuple-element(%ar), index=1
  %cast = bf16[16,8]{1,0} convert(%gte1)
  %slice = bf16[8,8]{1,0} fusion(%cast, %offset), kind=kLoop, calls=%ds
  %use = f32[] add(%gte0, %gte0)
  %ar2 = bf16[1024]{0} all-reduce(%c), channel_id=3, replica_groups=mesh['axis_0'=2,'axis_1'=8], device_ids=([8,2]T(1,0)) {'axis_1'}, to_apply=%add
  %cp = f32[10]{0} collective-permute(%d), channel_id=4, source_target_pairs={{0,8},{8,0}}
"""


def test_collective_traffic_parses_xla_spellings_and_sees_reduce_scatters():
    t = plan.collective_traffic(HLO, num_devices=16, node_size=8)
    assert t["all-gather"] == 64 * 32 * 4 * 3 / 4  # groups of 4: (n-1)/n of the result
    # a cast and then a slice at a partition-id offset: a reduce-scatter, (n-1) x the shard
    assert t["reduce-scatter"] == 16 * 8 * 4 / 2 * 1
    # the scalar (n=2), then the bf16 vector over devices {0,2,..,14} and {1,3,..,15} (n=8)
    assert t["all-reduce"] == 4 * 2 * 1 / 2 + 1024 * 2 * 2 * 7 / 8
    assert t["collective-permute"] == 40
    assert t["count"] == 4
    # the groups {0,2,..,14} and the permute 0 <-> 8 cross the 8-device node boundary
    assert t["inter_node"] == 1024 * 2 * 2 * 7 / 8 + 40
    assert t["total"] == pytest.approx(t["all-gather"] + t["reduce-scatter"] + t["all-reduce"] + 40)


def test_plan_registers_as_a_phi_jax_subcommand():
    from phi_jax import cli
    from phi_jax.cli import plan as plan_cli

    args = cli.build_parser().parse_args(["plan", "--config=configs/phi-1.5.py", "--devices", "8",
                                          "64", "--remat", "full"])
    assert args.func is plan_cli.run and args.devices == [8, 64] and args.remat == "full"
