"""Two real processes (jax.distributed over localhost, gloo, 4 CPU devices each) train like one.

`launch/local.sh` starts two `phi-jax train` processes on one 8-device mesh (fsdp=4 x tensor=2,
so parameters and batch rows are split across the processes). Each process reads only its own
half of the documents. The run stops at step 3 (a checkpoint both processes write) and a second
launch resumes it (both restore) to step 6.

The reference is one process with 8 devices fed the same global batches: host 0's rows then
host 1's, built from the two shards exactly as the hosts build them. Losses and final parameters
agree to float32 rounding (the collectives sum in a different order across processes).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys

import grain
import jax
import numpy as np
import pytest

from phi_jax import checkpoint
from phi_jax.training import loop

from train_helpers import ROOT, runlocal_config

STEPS = 6
MESH = {"data": 1, "fsdp": 4, "tensor": 2}
LOSS_RTOL = 3e-6
PARAM_ATOL = 4e-6


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from phi_jax.data import corpus

    workdir = tmp_path_factory.mktemp("tok")
    corpus.get_or_train_tokenizer(workdir, vocab_size=512)
    return workdir / "tokenizer"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_host_batches(real_build):
    """build_dataset for one process that yields what two hosts together would feed the mesh."""

    def build(cfg, tokenizer, *, seq_len, batch_size, seed, process_index=0, process_count=1,
              split="all"):
        assert (process_index, process_count) == (0, 1)
        if split == "heldout":  # every host reads the whole held-out split anyway
            return real_build(cfg, tokenizer, seq_len=seq_len, batch_size=batch_size, seed=seed,
                              split=split)
        hosts = [real_build(cfg, tokenizer, seq_len=seq_len, batch_size=batch_size // 2, seed=seed,
                            process_index=i, process_count=2, split=split) for i in range(2)]
        return grain.experimental.ZipIterDataset(hosts).map(
            lambda pair: {k: np.concatenate([pair[0][k], pair[1][k]]) for k in pair[0]})

    return build


def _launch(workdir, logdir, tokenizer_dir, *overrides):
    cmd = [str(ROOT / "launch" / "local.sh"), "--processes", "2", "--cpu-devices", "4",
           "--port", str(_free_port()), "--logdir", str(logdir), "--",
           "train", f"--config={ROOT / 'configs/tiny.py'}:runlocal", f"--workdir={workdir}",
           f"--config.tokenizer.path={tokenizer_dir}", f"--config.train.steps={STEPS}",
           "--config.curation.enabled=False",  # the reference is train(), which reads data.* as given
           "--config.train.checkpoint_every=3",
           *(f"--config.mesh.shape.{k}={v}" for k, v in MESH.items()), *overrides]
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env.update(PYTHON=sys.executable, PYTHONPATH=str(ROOT))
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    logs = {i: (logdir / f"process_{i}.log").read_text() for i in range(2)}
    assert result.returncode == 0, f"{result.stderr[-2000:]}\n--- process 1 ---\n{logs[1][-3000:]}"
    return [json.loads(logs[i].strip().splitlines()[-1]) for i in range(2)]


def _final_params(workdir):
    """The last checkpoint's params on this process's first device, whichever topology wrote it.

    (An explicit sharding in the target: without one Orbax refuses a checkpoint written by more
    processes than are reading it.)
    """
    from phi_jax.model import abstract_params

    manager = checkpoint.make_manager(workdir, read_only=True, async_save=False)
    config = checkpoint.model_config_from_meta(checkpoint.read_meta(manager, manager.latest_step()))
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                          abstract_params(config)["params"])
    return checkpoint.restore_latest(manager, params_target=target)[1]["params"]


@pytest.mark.slow
def test_two_processes_train_like_one_and_checkpoint_together(tokenizer_dir, tmp_path):
    workdir = tmp_path / "multi"
    workdir.mkdir()
    shutil.copytree(tokenizer_dir, workdir / "tokenizer")  # both processes read, none writes
    first = _launch(workdir, tmp_path / "logs1", tokenizer_dir, "--config.train.stop_at_step=3")
    assert [s["end_step"] for s in first] == [3, 3]
    assert checkpoint.make_manager(workdir, read_only=True).all_steps() == [3]
    second = _launch(workdir, tmp_path / "logs2", tokenizer_dir)
    assert [(s["start_step"], s["end_step"]) for s in second] == [(3, STEPS)] * 2
    # each host packed its own documents: different token counts, none empty
    host_tokens = [s["data_stats"]["tokens"] for s in first]
    assert min(host_tokens) > 0 and host_tokens[0] != host_tokens[1]

    config = runlocal_config(tokenizer_dir, steps=STEPS, checkpoint_every=3, async_checkpoint=False)
    config.mesh.shape.update(MESH)
    from phi_jax.data import pipeline

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pipeline, "build_dataset", _two_host_batches(pipeline.build_dataset))
        reference = loop.train(config, tmp_path / "single")

    lines = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
    lines = [l for l in lines if "loss" in l]  # (held-out eval lines carry heldout_loss instead)
    assert [l["step"] for l in lines] == list(range(STEPS))  # process 0 logs, once per step
    np.testing.assert_allclose([l["loss"] for l in lines], reference["losses"], rtol=LOSS_RTOL)
    multi, single = _final_params(workdir), _final_params(tmp_path / "single")
    worst = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                for a, b in zip(jax.tree.leaves(multi), jax.tree.leaves(single)))
    assert worst <= PARAM_ATOL, f"parameters differ by up to {worst:.2e}"
