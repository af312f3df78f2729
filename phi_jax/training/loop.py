"""The training loop: config -> sharded state -> steps -> checkpoints, resumable bit for bit.

    summary = train(config, workdir)

Order of work, as in big_vision: tokenizer and data -> mesh and rules -> abstract state
(`jax.eval_shape`) -> shardings -> state created already sharded (`jit(init, out_shardings)`) or
restored from the latest good checkpoint -> the jitted, donated step -> loop. Restarting with the
same workdir continues from the last complete checkpoint with the same parameters, optimizer
state, RNG and data position, so the run is identical to one that never stopped.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import math
import signal
import time
from pathlib import Path
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from phi_jax import _faults, allocator, checkpoint, fileio, sharding
from phi_jax.config import ModelConfig
from phi_jax.errors import ConfigError, InputError, RunError
from phi_jax.model import Phi
from phi_jax.model import init_params as init_params_of  # `train` has an init_params argument
from phi_jax.training import heldout
from phi_jax.training.config_file import validate_training
from phi_jax.training.metrics import MetricsWriter, peak_flops_per_device
from phi_jax.training.optimizer import learning_rate_schedule, make_optimizer
from phi_jax.training.step import all_finite, init_state, make_train_step

log = logging.getLogger(__name__)


class NonFiniteError(RunError):
    """Too many consecutive steps with a non-finite loss or gradient."""


def model_config_from(config: ml_collections.ConfigDict) -> ModelConfig:
    """config.model, with the LoRA adapter of config.lora when its rank is > 0."""
    model_config = ModelConfig.from_dict(config.model.to_dict())
    if "lora" in config and config.lora.rank:
        from phi_jax.lora import with_lora

        model_config = with_lora(model_config, config.lora.rank, config.lora.alpha, config.lora.targets)
    return model_config


def run_tokenizer(config, workdir):
    """The run's tokenizer: WORKDIR/tokenizer if there is one, else `tokenizer.path` (copied there)
    or the byte-level BPE trained on the default corpus (cached there)."""
    from phi_jax.data import corpus
    from phi_jax.tokenizer import Tokenizer

    tok_dir = workdir / "tokenizer"
    if any((tok_dir / f).exists() for f in ("tokenizer.json", "tokenizer.model")):
        return Tokenizer.from_pretrained(tok_dir)
    if config.tokenizer.path:
        tokenizer = _load_tokenizer(config.tokenizer.path)
        if jax.process_index() == 0:
            # Published whole (fileio.staged_directory): the other hosts test tok_dir at the same
            # moment and must never read a half-written copy.
            try:
                with fileio.staged_directory(tok_dir) as tmp:
                    tokenizer.save(tmp)
            except InputError:  # a previous run (or a racing process) saved it already
                pass
        return tokenizer
    return corpus.get_or_train_tokenizer(workdir, vocab_size=config.tokenizer.vocab_size)


def _load_tokenizer(path):
    from phi_jax.tokenizer import Tokenizer

    try:
        return Tokenizer.from_pretrained(path)
    except (ValueError, OSError) as e:
        raise ConfigError(f"--config.tokenizer.path={path}: {e}") from e


def _check_vocab(tokenizer_size: int, model_config: ModelConfig) -> None:
    if tokenizer_size > model_config.vocab_size:
        raise ConfigError(f"the tokenizer has {tokenizer_size} tokens but model.vocab_size is "
                          f"{model_config.vocab_size}; set --config.model.vocab_size={tokenizer_size} "
                          "(or larger)")


def _check_same_model(saved: dict | None, current: ModelConfig, path: Path) -> None:
    if not saved or "model_config" not in saved:
        return
    old = ModelConfig.from_dict(saved["model_config"])
    shape_fields = [f.name for f in dataclasses.fields(ModelConfig)
                    if f.name not in ("attention_impl", "rotary_impl", "remat_policy", "dtype",
                                      "resid_pdrop", "embd_pdrop")]
    diff = {f: (getattr(old, f), getattr(current, f)) for f in shape_fields
            if getattr(old, f) != getattr(current, f)}
    if diff:
        changes = ", ".join(f"model.{f}: checkpoint {a!r} vs config {b!r}" for f, (a, b) in diff.items())
        raise ConfigError(f"the checkpoint in {path} was trained with a different model ({changes}); "
                         "use the original config, or start a new --workdir")


def _split_state(state: dict) -> tuple[Any, dict]:
    rest = {k: v for k, v in state.items() if k != "params"}
    return state["params"], rest


class _StopRequest:
    """SIGTERM (preemption) asks the loop to checkpoint and exit at the next step boundary."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: no signal handling
            self._previous = None
        return self

    def _handle(self, signum, frame):
        log.warning("SIGTERM received: checkpointing and stopping at the next step boundary")
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def preflight(config: ml_collections.ConfigDict, workdir: str | Path):
    """Every check of a run that needs no data: (model config, mesh, rules) if the run can start.

    Before anything is written (a bad value leaves no workdir behind), and before the CLI curates.
    """
    validate_training(config)
    fileio.check_bucket(workdir, "--workdir")
    tc = config.train
    model_config = model_config_from(config)
    if tc.seq_len > model_config.max_len:
        raise ConfigError(f"--config.train.seq_len={tc.seq_len} exceeds model.max_len="
                          f"{model_config.max_len}; raise model.max_len or shorten the sequences")
    mesh = sharding.make_mesh(dict(config.mesh.shape))
    rules = sharding.rules_from_config(dict(config.mesh.rules))
    sharding.check_divisibility(model_config, mesh, rules)
    shards, hosts, accum = sharding.batch_divisor(mesh, rules), jax.process_count(), tc.accum_steps
    if tc.batch_size % math.lcm(shards * accum, hosts):
        raise ConfigError(f"--config.train.batch_size={tc.batch_size} must be divisible by the batch shards "
                         f"({shards}) x train.accum_steps ({accum}) and by the hosts ({hosts}); "
                         f"use a multiple of {math.lcm(shards * accum, hosts)}")
    if config.tokenizer.path and not (fileio.as_path(workdir) / "tokenizer").exists():
        _check_vocab(_load_tokenizer(config.tokenizer.path).vocab_size, model_config)
    return model_config, mesh, rules


def train(config: ml_collections.ConfigDict, workdir: str | Path, *,
          init_params: Callable[[], dict] | None = None,
          checked: tuple | None = None) -> dict[str, Any]:
    """Train (or resume) the run in `workdir`. Returns a summary with this invocation's losses.

    `init_params` (fine-tuning): called on a fresh start only, returns the starting parameters
    (the base model's, plus fresh LoRA leaves when config.lora.rank > 0) in the scanned layout; a
    resumed run takes everything from its checkpoint instead.

    `checked`: what `preflight(config, workdir)` returned, when the caller ran it already (the CLI
    does, before curating); preflight only reads config.model / train / mesh / tokenizer, which
    curation leaves alone, so its answer still holds.
    """
    from phi_jax.data import pipeline

    workdir = fileio.as_path(workdir)  # a local directory or a bucket (gs://...)
    tc = config.train
    primary = jax.process_index() == 0
    model_config, mesh, rules = checked or preflight(config, workdir)
    model = Phi(model_config)
    hosts, accum = jax.process_count(), tc.accum_steps
    workdir.mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------- tokenizer and data
    tokenizer = run_tokenizer(config, workdir)
    _check_vocab(tokenizer.vocab_size, model_config)

    schedule = learning_rate_schedule(config.optimizer, tc.steps)
    freeze_base = bool(model_config.lora_rank)
    optimizer = make_optimizer(config.optimizer, tc.steps, freeze_base=freeze_base)

    def init_fn(rng):
        boxed = model.init(rng, jnp.zeros((1, 1), jnp.int32))
        return init_state(boxed["params"], optimizer, tc.seed)

    init_rng = jax.random.PRNGKey(tc.seed + 1)
    abstract = jax.eval_shape(init_fn, init_rng)
    state_shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract), mesh, rules)
    abstract = nn.unbox(abstract)
    batch_sharding = sharding.batch_sharding(mesh, rules)

    # ------------------------------------------------------------------- data and resume
    data = pipeline.build_dataset(config.data, tokenizer, seq_len=tc.seq_len,
                                  batch_size=tc.batch_size // hosts, seed=tc.seed,
                                  process_index=jax.process_index(), process_count=hosts,
                                  split="train")
    data_iter = iter(data)
    manager = checkpoint.make_manager(workdir, max_to_keep=tc.max_to_keep,
                                      async_save=tc.async_checkpoint)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, state_shardings)
    params_target, rest_target = _split_state(target)
    if manager.latest_step() is not None:
        _check_same_model(checkpoint.read_meta(manager, manager.latest_step()), model_config,
                          manager.directory)
    step0, restored = checkpoint.restore_latest(manager, params_target=params_target,
                                                train_state_target=rest_target,
                                                data_iterator=data_iter)
    if restored is not None:
        _check_same_model(restored.get("meta"), model_config, manager.directory)
        if "train_state" not in restored:  # a converted checkpoint: fine-tune from its params
            state = jax.jit(lambda p: init_state(p, optimizer, tc.seed),
                            out_shardings=state_shardings)(restored["params"])
            step0 = 0
        else:
            state = {"params": restored["params"], **restored["train_state"]}
        log.info("resumed from step %d in %s", step0, manager.directory)
    else:
        if init_params is not None:
            params = jax.device_put(init_params(), state_shardings["params"])
            state = jax.jit(lambda p: init_state(p, optimizer, tc.seed),
                            out_shardings=state_shardings)(params)
        elif tc.init_from_hf:
            from phi_jax import hf

            _, variables = hf.load_hf(tc.init_from_hf, dtype=model_config.param_dtype,
                                      scan_layers=model_config.scan_layers)
            params = jax.device_put(variables["params"], state_shardings["params"])
            state = jax.jit(lambda p: init_state(p, optimizer, tc.seed),
                            out_shardings=state_shardings)(params)
        else:
            # init_params, not init_fn: the same weights whether the layers are scanned or not
            state = jax.jit(lambda r: init_state(init_params_of(model_config, r)["params"], optimizer,
                                                 tc.seed), out_shardings=state_shardings)(init_rng)
        step0 = 0
    start = int(jax.device_get(state["step"]))

    # ------------------------------------------------------------------------ the step
    step_fn = make_train_step(model, optimizer, accum_steps=accum, schedule=schedule,
                              nan_steps=_faults.nan_steps(), loss_chunk=tc.loss_chunk,
                              freeze_base=freeze_base)
    train_step = jax.jit(step_fn, in_shardings=(state_shardings, batch_sharding),
                         out_shardings=(state_shardings, None), donate_argnums=(0,))
    meta = {"model_config": model_config.to_dict(), "data": pipeline.describe(config.data),
            "versions": {"jax": jax.__version__, "flax": _version("flax"), "optax": _version("optax")},
            "mesh": dict(mesh.shape), "devices": jax.device_count(), "allocator": allocator.current(),
            "device_kind": jax.devices()[0].device_kind}
    config_json = config.to_dict()

    state_finite = jax.jit(all_finite)

    def save(step: int, force: bool = False) -> bool:
        """Save `step` unless the state is not finite (then nothing is written; returns False)."""
        if not bool(state_finite(state)):  # the step guard should make this impossible; a poisoned
            log.error("step %d: parameters or optimizer state are not finite; not saving", step)
            return False  # checkpoint must never become the "last good" one
        params, rest = _split_state(state)
        checkpoint.save(manager, step, params=params, train_state=rest, data_iterator=data_iter,
                        config=config_json, meta=meta, force=force)
        return True

    held = heldout.build(config, tokenizer, model, param_shardings=state_shardings["params"],
                         batch_sharding=batch_sharding)
    eval_every = tc.eval_every or tc.checkpoint_every
    heldout_losses: list[tuple[int, float]] = []

    def evaluate(step: int) -> None:
        loss = held.evaluate(state["params"])
        if loss is not None:
            heldout_losses.append((step, loss))
            writer.write(step, {"heldout_loss": loss}, name="eval")

    tokens_per_step = tc.batch_size * tc.seq_len
    flops_per_step = model_config.flops_per_token(tc.seq_len) * tokens_per_step
    peak = peak_flops_per_device(override=tc.peak_flops_per_device)
    writer = MetricsWriter(workdir, total_steps=tc.steps, start_step=start,
                           enabled=primary, progress=tc.progress_bar)
    losses: list[float] = []
    last_saved = step0 if restored is not None else None
    try:
        with _StopRequest() as stop, jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            for step in range(start, tc.steps):
                batch = pipeline.to_global_batch(next(data_iter), batch_sharding)
                t0 = time.perf_counter()
                state, metrics = train_step(state, batch)
                metrics = jax.device_get(metrics)
                dt = time.perf_counter() - t0
                losses.append(float(metrics["loss"]))
                if not metrics["finite"]:
                    log.warning("step %d: non-finite loss, gradient or update; update skipped (%d in "
                                "a row)", step, metrics["nonfinite_streak"])
                    if metrics["nonfinite_streak"] >= tc.max_nonfinite_streak:
                        where = (f"step {last_saved} in {manager.directory}" if last_saved is not None
                                 else "none (no checkpoint was written yet)")
                        raise NonFiniteError(
                            f"{metrics['nonfinite_streak']} steps in a row had a non-finite loss, "
                            f"gradient or update, the last at step {step}; the parameters were not updated by "
                            f"them. Last good checkpoint: {where}. Lower optimizer.lr, check the "
                            "data, then rerun with the same --workdir to resume from it.")
                if step % tc.log_every == 0 or step == tc.steps - 1:
                    achieved = flops_per_step / dt / jax.device_count()
                    scalars = {"loss": metrics["loss"], "grad_norm": metrics["grad_norm"],
                               "lr": metrics["lr"], "tokens_per_s": tokens_per_step / dt,
                               "tflops_per_device": achieved / 1e12, "step_time_s": dt,
                               "nonfinite_total": int(jax.device_get(state["nonfinite_total"]))}
                    if peak:
                        scalars["mfu"] = achieved / peak
                    writer.write(step, scalars)
                writer.advance()
                done = step + 1
                stopping = stop.requested or done == tc.stop_at_step
                due = done % tc.checkpoint_every == 0 or done == tc.steps or stopping
                if due and metrics["nonfinite_streak"] > 0 and done != tc.steps:
                    log.warning("step %d: not checkpointing during a run of skipped steps", done)
                elif due and save(done, force=True):
                    writer.sync()  # a bucket workdir's metrics, up to this checkpoint
                    _faults.after_save_started(done)
                    last_saved = done
                if held.enabled and (done % eval_every == 0 or done == tc.steps or stopping):
                    evaluate(done)
                if stopping:
                    break
            if start >= tc.steps and held.enabled:  # already finished: still report where it stands
                evaluate(start)
    finally:
        manager.wait_until_finished()
        writer.close()
    summary = {"start_step": start, "end_step": int(jax.device_get(state["step"])),
               "total_steps": tc.steps, "losses": losses,
               "heldout": [{"step": s, "loss": l} for s, l in heldout_losses],
               "heldout_tokens": held.tokens, "heldout_seconds": round(held.seconds, 3),
               "nonfinite_total": int(jax.device_get(state["nonfinite_total"])),
               "data_stats": pipeline.data_stats(data_iter).as_dict(),
               "checkpoints": sorted(manager.all_steps()), "workdir": str(workdir),
               "allocator": allocator.current(),
               "finished": datetime.datetime.now().isoformat(timespec="seconds")}
    return summary


def final_state_params(workdir: str | Path):
    """The params of the latest checkpoint (tests compare runs with this)."""
    return checkpoint.load_params_for_inference(workdir)[1]


def _version(module: str) -> str:
    try:
        return __import__(module).__version__
    except (ImportError, AttributeError):
        return "unknown"
