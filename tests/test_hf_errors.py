"""Bad checkpoints get errors that name the tensor/file and the fix; nothing is unpickled."""

import json

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import phi_jax
from phi_jax.config import preset
from phi_jax.model import init_params


@pytest.fixture
def checkpoint(tmp_path):
    config = preset("test")
    phi_jax.save_pretrained(tmp_path / "ckpt", config, init_params(config, jax.random.key(0)))
    return tmp_path / "ckpt"


def _edit_tensors(path, fn):
    tensors = load_file(path / "model.safetensors")
    fn(tensors)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})


def test_missing_tensor_is_named(checkpoint):
    _edit_tensors(checkpoint, lambda t: t.pop("model.layers.1.mlp.fc2.bias"))
    with pytest.raises(ValueError, match=r"missing tensors \['model.layers.1.mlp.fc2.bias'\]"):
        phi_jax.from_pretrained(checkpoint)


def test_unexpected_tensor_is_named(checkpoint):
    _edit_tensors(checkpoint, lambda t: t.update({"model.extra.weight": np.zeros(3, np.float32)}))
    with pytest.raises(ValueError, match="model.extra.weight"):
        phi_jax.from_pretrained(checkpoint)


def test_wrong_shape_is_named(checkpoint):
    _edit_tensors(checkpoint, lambda t: t.update(
        {"lm_head.bias": np.zeros(7, np.float32)}))
    with pytest.raises(ValueError, match=r"'lm_head.bias' has shape \(7,\)"):
        phi_jax.from_pretrained(checkpoint)


def test_config_with_wrong_layer_count(checkpoint):
    cfg = json.loads((checkpoint / "config.json").read_text())
    cfg["num_hidden_layers"] = 3
    (checkpoint / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="checkpoint has 2 layers but the config has 3"):
        phi_jax.from_pretrained(checkpoint)


def test_pickle_checkpoints_are_refused_unopened(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "phi"}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04this would be a pickle")
    with pytest.raises(ValueError, match="never unpickles.*safe_serialization=True"):
        phi_jax.from_pretrained(tmp_path)


def test_corrupt_safetensors_file(checkpoint):
    data = (checkpoint / "model.safetensors").read_bytes()
    (checkpoint / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        phi_jax.from_pretrained(checkpoint)


def test_missing_shard_listed_in_index(tmp_path):
    config = preset("test")
    phi_jax.save_pretrained(tmp_path, config, init_params(config, jax.random.key(0)),
                            max_shard_size=20_000)
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 1
    shards[-1].unlink()
    with pytest.raises(FileNotFoundError, match=shards[-1].name):
        phi_jax.from_pretrained(tmp_path)


def test_save_is_atomic_over_an_existing_checkpoint(checkpoint, monkeypatch):
    """A failure mid-save leaves the previous checkpoint loadable and no temp dirs behind."""
    from phi_jax import hf

    before = (checkpoint / "model.safetensors").read_bytes()
    config = preset("test")

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(hf, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        phi_jax.save_pretrained(checkpoint, config, init_params(config, jax.random.key(1)))
    assert (checkpoint / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in checkpoint.parent.iterdir()) == ["ckpt"]
