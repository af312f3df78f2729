"""Training: loss falls, resume is bit-exact (also after SIGKILL mid-save), NaN guard, bad checkpoints."""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from phi_jax import checkpoint
from phi_jax.training.loop import NonFiniteError, train

from train_helpers import ROOT, params_equal, runlocal_config


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from phi_jax.data import corpus

    workdir = tmp_path_factory.mktemp("tok")
    corpus.get_or_train_tokenizer(workdir, vocab_size=512)
    return workdir / "tokenizer"


@pytest.fixture(scope="module")
def straight_run(tokenizer_dir, tmp_path_factory):
    """The reference: 6 steps without interruption."""
    workdir = tmp_path_factory.mktemp("straight")
    summary = train(runlocal_config(tokenizer_dir), workdir)
    return workdir, summary


def test_loss_falls_and_metrics_are_written(straight_run):
    workdir, summary = straight_run
    assert summary["end_step"] == 6 and len(summary["losses"]) == 6
    assert summary["losses"][-1] < summary["losses"][0] - 0.5
    lines = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
    evals = [l for l in lines if "heldout_loss" in l]
    lines = [l for l in lines if "loss" in l]
    assert [l["step"] for l in lines] == list(range(6))
    # the held-out loss at each checkpoint and the end, falling as the training loss does
    assert [e["step"] for e in evals] == [2, 4, 6] == [h["step"] for h in summary["heldout"]]
    assert evals[-1]["heldout_loss"] < evals[0]["heldout_loss"]
    assert {"loss", "grad_norm", "lr", "tokens_per_s", "tflops_per_device"} <= set(lines[0])
    assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
    assert checkpoint.make_manager(workdir, read_only=True).all_steps() == [2, 4, 6]


def test_resume_is_bit_exact(straight_run, tokenizer_dir, tmp_path):
    workdir, summary = straight_run
    first = train(runlocal_config(tokenizer_dir, stop_at_step=3), tmp_path)
    assert first["end_step"] == 3
    second = train(runlocal_config(tokenizer_dir), tmp_path)
    assert second["start_step"] == 3
    assert first["losses"] + second["losses"] == summary["losses"]
    assert params_equal(checkpoint.load_params_for_inference(tmp_path)[1],
                        checkpoint.load_params_for_inference(workdir)[1])


def _train_subprocess(workdir, *overrides, faults=None):
    cmd = [sys.executable, "-m", "phi_jax.cli", "train", f"--config={ROOT / 'configs/tiny.py'}:runlocal",
           f"--workdir={workdir}", "--config.curation.enabled=False", *overrides]  # as train() reads data
    env = dict(os.environ, **({"PHI_JAX_FAULTS": json.dumps(faults)} if faults else {}))
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_sigkill_right_after_a_save_started_still_resumes_exactly(straight_run, tokenizer_dir, tmp_path):
    workdir, summary = straight_run
    tok = f"--config.tokenizer.path={tokenizer_dir}"
    killed = _train_subprocess(tmp_path, tok, faults={"kill_after_save_start": 4})
    assert killed.returncode == -9, killed.stderr[-3000:]
    resumed = _train_subprocess(tmp_path, tok)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    result = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert result["start_step"] in (2, 4) and result["end_step"] == 6
    assert params_equal(checkpoint.load_params_for_inference(tmp_path)[1],
                        checkpoint.load_params_for_inference(workdir)[1])
    losses = [json.loads(l)["loss"] for l in (tmp_path / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(l)]
    # the killed run logged steps 0-3; the resumed one re-logs from its checkpoint on
    assert losses[-(6 - result["start_step"]):] == summary["losses"][result["start_step"]:]


def test_corrupt_latest_checkpoint_falls_back_to_previous(straight_run, tokenizer_dir, tmp_path, caplog):
    workdir, summary = straight_run
    run = tmp_path / "run"
    shutil.copytree(workdir, run)
    step6 = run / "checkpoints" / "6" / "params"
    for f in step6.rglob("*"):
        if f.is_file():
            f.write_bytes(b"garbage")  # bit rot / a half-copied directory
    shutil.rmtree(run / "checkpoints" / "6" / "train_state")
    (run / "checkpoints" / "6" / "train_state").mkdir()
    resumed = train(runlocal_config(tokenizer_dir), run)
    assert resumed["start_step"] == 4
    assert "step 6" in caplog.text and str(run / "checkpoints" / "6") in caplog.text
    assert resumed["losses"] == summary["losses"][4:]


def test_every_checkpoint_broken_is_a_clear_error(straight_run, tokenizer_dir, tmp_path):
    workdir, _ = straight_run
    run = tmp_path / "run"
    shutil.copytree(workdir, run)
    for step in (2, 4, 6):
        shutil.rmtree(run / "checkpoints" / str(step) / "params")
        (run / "checkpoints" / str(step) / "params").mkdir()
    with pytest.raises(checkpoint.CheckpointError, match="no checkpoint .* restores"):
        train(runlocal_config(tokenizer_dir), run)


def test_nan_step_is_skipped_and_counted(tokenizer_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("PHI_JAX_FAULTS", json.dumps({"nan_at": [2]}))
    summary = train(runlocal_config(tokenizer_dir), tmp_path)
    assert np.isnan(summary["losses"][2]) and np.isfinite(np.delete(summary["losses"], 2)).all()
    assert summary["nonfinite_total"] == 1 and summary["end_step"] == 6
    params = checkpoint.load_params_for_inference(tmp_path)[1]
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))


def test_nan_streak_stops_the_run_and_never_reaches_a_checkpoint(tokenizer_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("PHI_JAX_FAULTS", json.dumps({"nan_at": [3, 4, 5]}))
    config = runlocal_config(tokenizer_dir, max_nonfinite_streak=3)
    with pytest.raises(NonFiniteError, match=r"3 steps in a row.*step 5.*Last good checkpoint: step 2"):
        train(config, tmp_path)
    manager = checkpoint.make_manager(tmp_path, read_only=True)
    assert manager.all_steps() == [2]  # no checkpoint is written during a run of skipped steps
    for step in manager.all_steps():
        params = checkpoint.load_params_for_inference(tmp_path, step=step)[1]
        assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))


def test_unknown_config_key_is_an_error_naming_it(tmp_path):
    result = _train_subprocess(tmp_path, "--config.train.stepz=3")
    assert result.returncode != 0
    assert "stepz" in result.stderr + result.stdout


def test_changed_model_shape_refuses_to_resume(straight_run, tokenizer_dir, tmp_path):
    workdir, _ = straight_run
    run = tmp_path / "run"
    shutil.copytree(workdir, run)
    config = runlocal_config(tokenizer_dir)
    config.model.n_layers = 3
    with pytest.raises(Exception, match="n_layers"):
        train(config, run)
