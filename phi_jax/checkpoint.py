"""Whole, atomic, exact checkpoints of a training run (Orbax CheckpointManager).

One step directory holds everything a resume needs, saved together:
  params       model parameters                      (StandardSave: sharded arrays, any mesh)
  train_state  optimizer state, step, RNG key data   (StandardSave)
  data         the Grain iterator's position          (grain.checkpoint.CheckpointSave)
  config       the run's full ConfigDict as JSON      (JsonSave)
  meta         corpus hash, versions, ModelConfig     (JsonSave)
Orbax writes each step into a temporary directory and renames it when complete (on a bucket,
which has no rename: into the step's directory, then `commit_success.txt` last, and a step without
it is neither listed nor restored), so a kill mid-save leaves only finished steps visible. A
checkpoint that still fails to restore (disk corruption, a deleted file) is reported with its step
and path, and the previous one is used.

Inference needs only `params` and `meta`, so `load_params_for_inference` restores just those.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp

from phi_jax import fileio
from phi_jax.config import ModelConfig
from phi_jax.errors import MissingFileError, RunError

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
ITEMS = ("params", "train_state", "data", "config", "meta")


class CheckpointError(RunError):
    """No usable checkpoint could be restored."""


def _grain_handler():
    import grain

    return grain.checkpoint.CheckpointHandler


def make_manager(workdir: str | os.PathLike, *, max_to_keep: int | None = 3,
                 async_save: bool = True, read_only: bool = False) -> ocp.CheckpointManager:
    root = fileio.as_path(workdir)
    directory = (root.absolute() if isinstance(root, Path) else root) / CHECKPOINT_DIR
    if read_only:
        options = ocp.CheckpointManagerOptions(read_only=True, create=False, max_to_keep=None,
                                               save_interval_steps=0, enable_async_checkpointing=False)
    else:
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                               cleanup_tmp_directories=True,
                                               enable_async_checkpointing=async_save)
    handlers = {"params": ocp.StandardCheckpointHandler(), "train_state": ocp.StandardCheckpointHandler(),
                "config": ocp.JsonCheckpointHandler(), "meta": ocp.JsonCheckpointHandler(),
                "data": _grain_handler()()}
    return ocp.CheckpointManager(directory, item_names=ITEMS, item_handlers=handlers, options=options)


def save(manager: ocp.CheckpointManager, step: int, *, params, train_state=None, data_iterator=None,
         config: dict | None = None, meta: dict | None = None, force: bool = False) -> bool:
    """Start saving `step` (asynchronously when the manager is async). Items left None are skipped."""
    import grain

    items: dict[str, Any] = {"params": ocp.args.StandardSave(params)}
    if train_state is not None:
        items["train_state"] = ocp.args.StandardSave(train_state)
    if data_iterator is not None:
        items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    if config is not None:
        items["config"] = ocp.args.JsonSave(config)
    if meta is not None:
        items["meta"] = ocp.args.JsonSave(meta)
    return manager.save(step, args=ocp.args.Composite(**items), force=force)


def _abstract(tree):
    """ShapeDtypeStructs (with shardings, when the leaves have them) to restore onto."""
    def one(x):
        sharding = getattr(x, "sharding", None)
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

    return jax.tree.map(one, tree)


def restore_latest(manager: ocp.CheckpointManager, *, params_target, train_state_target=None,
                   data_iterator=None, on_skip: Callable[[int, Exception], None] | None = None):
    """Restore the newest step that restores cleanly, newest first.

    `*_target` are pytrees of arrays or ShapeDtypeStructs (with the shardings wanted now, which
    may differ from the mesh the checkpoint was written on). Returns (step, items dict) or
    (None, None) when the run has no checkpoint yet. Raises CheckpointError if steps exist but
    none restores.
    """
    import grain

    steps = sorted(manager.all_steps(), reverse=True)
    errors = []
    for step in steps:
        present = set(_items_on_disk(manager, step))
        items: dict[str, Any] = {"params": ocp.args.StandardRestore(_abstract(params_target))}
        if train_state_target is not None and "train_state" in present:
            items["train_state"] = ocp.args.StandardRestore(_abstract(train_state_target))
        if data_iterator is not None and "data" in present:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        for name in ("config", "meta"):
            if name in present:
                items[name] = ocp.args.JsonRestore()
        try:
            restored = manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # noqa: BLE001 - any failure means this step is unusable
            path = fileio.as_path(str(manager.directory)) / str(step)
            log.error("checkpoint step %d at %s does not restore (%s: %s); trying the previous one",
                      step, path, type(e).__name__, e)
            errors.append((step, e))
            if on_skip is not None:
                on_skip(step, e)
            continue
        if errors:
            _quarantine(manager, [s for s, _ in errors])
        return step, {name: restored[name] for name in items}
    if errors:
        detail = "; ".join(f"step {s}: {type(e).__name__}: {e}" for s, e in errors)
        raise CheckpointError(f"no checkpoint in {manager.directory} restores ({detail}); "
                              "remove the broken step directories or start a new workdir")
    return None, None


def _quarantine(manager: ocp.CheckpointManager, steps: list[int]) -> None:
    """Move broken steps out of the way (never delete: they may be recoverable by hand).

    Newer broken steps would otherwise block saving those step numbers again on the resumed run.
    """
    root = fileio.as_path(str(manager.directory))
    if jax.process_index() == 0:
        aside = root.parent / f"{root.name}_broken"
        aside.mkdir(exist_ok=True)
        for step in steps:
            target = aside / f"{step}-{os.getpid()}"
            fileio.move(root / str(step), target)
            log.error("moved unrestorable checkpoint step %d to %s", step, target)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("phi_jax_checkpoint_quarantine")
    manager.reload()


def _items_on_disk(manager: ocp.CheckpointManager, step: int) -> list[str]:
    step_dir = fileio.as_path(str(manager.directory)) / str(step)
    return [p.name for p in step_dir.iterdir() if p.is_dir()] if step_dir.exists() else []


def read_meta(manager: ocp.CheckpointManager, step: int) -> dict | None:
    """The JSON `meta` item of a step, read directly (cheap; no arrays touched), or None."""
    import json

    file = fileio.as_path(str(manager.directory)) / str(step) / "meta" / "metadata"
    try:
        return json.loads(file.read_text())
    except (OSError, ValueError):
        return None


def model_config_from_meta(meta: dict) -> ModelConfig:
    if not meta or "model_config" not in meta:
        raise CheckpointError("checkpoint has no model config in its meta item; it was not written "
                              "by phi_jax")
    return ModelConfig.from_dict(meta["model_config"])


def load_params_for_inference(workdir: str | os.PathLike, *, step: int | None = None,
                              dtype: Any = None) -> tuple[ModelConfig, dict, int]:
    """(ModelConfig, variables {"params": ...}, step) from a training workdir, params only.

    The optimizer state is not read, so this works on a machine with a fraction of the memory
    the run needed.
    """
    if not (fileio.as_path(workdir) / CHECKPOINT_DIR).is_dir():
        fileio.check_bucket(workdir)
        raise MissingFileError(f"{workdir} is not a phi_jax workdir (no {CHECKPOINT_DIR}/ in it); "
                               "train first or convert an HF checkpoint with `phi-jax convert`")
    manager = make_manager(workdir, read_only=True, async_save=False)
    available = sorted(manager.all_steps(), reverse=True)
    if step is not None and step not in available:
        raise MissingFileError(f"{workdir} has no checkpoint step {step}; it has steps "
                               f"{sorted(available)}")
    steps = available if step is None else [step]
    if not steps:
        raise CheckpointError(f"no checkpoint in {fileio.as_path(workdir) / CHECKPOINT_DIR}; train first or "
                              "convert an HF checkpoint with `phi-jax convert`")
    errors = []
    for s in steps:
        try:
            meta = read_meta(manager, s)
            config = model_config_from_meta(meta)
            if dtype is not None:
                from phi_jax.config import dtype_name

                config = config.replace(dtype=dtype_name(dtype), param_dtype=dtype_name(dtype))
            from phi_jax.model import abstract_params

            target = abstract_params(config.replace(param_dtype=meta["model_config"]["param_dtype"]))
            # An explicit sharding: without one Orbax reuses the saved one and refuses a
            # checkpoint written by more processes than read it ("Topology mismatch").
            device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
            target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                                  target["params"])
            restored = manager.restore(s, args=ocp.args.Composite(
                params=ocp.args.StandardRestore(target)))
            params = restored["params"]
            if dtype is not None:
                params = jax.tree.map(lambda x: x.astype(config.jnp_param_dtype), params)
            return config, {"params": params}, s
        except Exception as e:  # noqa: BLE001
            log.error("checkpoint step %d in %s does not restore: %s", s, manager.directory, e)
            errors.append((s, e))
    raise CheckpointError(f"no checkpoint in {manager.directory} restores: "
                          + "; ".join(f"step {s}: {e}" for s, e in errors))
