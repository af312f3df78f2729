"""Experiment configs: load `configs/<recipe>.py[:arg]`, apply `--config.a.b=value`, validate.

The one way a training (or planning, fine-tuning, recipe) config is read, so every command gives the
same messages: a missing file, a config whose `get_config` fails, a key that does not exist (named
by its full dotted path, with one "did you mean"), a value of the wrong type or out of range — each
a `ConfigError` naming `--config.<key>` and the fix, raised before anything is written to disk.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import math
import os
from pathlib import Path
from typing import Any, Iterable

import ml_collections

from phi_jax.errors import ConfigError, MissingFileError

_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")


# ------------------------------------------------------------------------------------ loading
def load_config(spec: str | os.PathLike) -> ml_collections.ConfigDict:
    """`path/to/config.py[:arg]` -> the ConfigDict its `get_config(arg)` returns (locked)."""
    spec = str(spec)
    path, _, arg = spec.partition(":") if not os.path.exists(spec) else (spec, "", "")
    file = Path(path)
    if not file.is_file():
        raise MissingFileError(f"config file {path!r} does not exist; pass --config=configs/tiny.py "
                               "(a Python file whose get_config(arg) returns a ConfigDict)")
    module_spec = importlib.util.spec_from_file_location(f"phi_jax_config_{file.stem}", file)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 - a user's file: report it as theirs, not ours
        raise ConfigError(f"config file {path} failed to load ({type(e).__name__}: {e}); fix the "
                          "file (rerun with --debug for the traceback)") from e
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file {path} has no get_config(arg) function; define one that "
                          "returns an ml_collections.ConfigDict")
    try:
        config = module.get_config(arg or None)
    except Exception as e:  # noqa: BLE001
        raise ConfigError(f"{path}: get_config({arg or None!r}) failed ({type(e).__name__}: {e}); "
                          f"check the argument after ':' in --config={spec}") from e
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(f"{path}: get_config returned {type(config).__name__}, not a ConfigDict")
    config.lock()
    return config


# ---------------------------------------------------------------------------------- overrides
def flat_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    """Every leaf key as a dotted path ("train.steps", "mesh.shape.data", ...)."""
    keys = []
    for name in sorted(config.keys()):
        value = config[name]
        if isinstance(value, ml_collections.ConfigDict):
            keys += flat_keys(value, f"{prefix}{name}.")
        else:
            keys.append(f"{prefix}{name}")
    return keys


def _unknown_key(config: ml_collections.ConfigDict, key: str) -> ConfigError:
    known = flat_keys(config)
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    if not close:  # a section name typed without its key: mesh.data -> mesh.shape.data
        last = key.rsplit(".", 1)[-1]
        close = [k for k in known if k.endswith("." + last)][:1]
    hint = f'; did you mean --config.{close[0]}?' if close else \
        "; run `phi-jax train --config=FILE --show-config` to list every key"
    return ConfigError(f"config key {key} does not exist{hint}")


def _parse_value(key: str, text: str, kind: type, current: Any) -> Any:
    def bad(why: str) -> ConfigError:
        return ConfigError(f"--config.{key}={text}: {why}")

    if kind is bool:
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        raise bad("expected true or false")
    if kind is int:
        try:
            return int(text)
        except ValueError:
            raise bad("expected an integer") from None
    if kind is float:
        try:
            return float(text)
        except ValueError:
            raise bad("expected a number") from None
    if kind in (tuple, list):
        text_s = text.strip()
        if text_s[:1] in "([":
            try:
                items = ast.literal_eval(text_s)
            except (ValueError, SyntaxError):
                raise bad("expected a list such as 1,2,3 or (1, 2, 3)") from None
            items = items if isinstance(items, (tuple, list)) else (items,)
        else:
            items = [p.strip() for p in text_s.split(",") if p.strip()]
            element = type(current[0]) if current else str
            items = [_parse_value(key, p, element, None) for p in items]
        return kind(items)
    if kind is str or kind is type(None):
        return text
    raise bad(f"cannot set a value of type {kind.__name__} from the command line")


def _split_overrides(items: Iterable[str]) -> list[tuple[str, str]]:
    """["--config.a.b=1", "--config.c", "2"] -> [("a.b", "1"), ("c", "2")]."""
    items = list(items)
    pairs, i = [], 0
    while i < len(items):
        item = items[i]
        if not item.startswith("--config."):
            raise ConfigError(f"unrecognized argument {item!r}; config values are set as "
                              "--config.<key>=<value>, e.g. --config.train.steps=100")
        body = item[len("--config."):]
        if "=" in body:
            key, value = body.split("=", 1)
        elif i + 1 < len(items) and not items[i + 1].startswith("--"):
            key, value = body, items[i + 1]
            i += 1
        else:
            raise ConfigError(f"{item} has no value; write {item}=VALUE")
        pairs.append((key, value))
        i += 1
    return pairs


def apply_overrides(config: ml_collections.ConfigDict, items: Iterable[str]) -> ml_collections.ConfigDict:
    """Apply `--config.a.b=value` strings in order; values are parsed by the key's current type."""
    for key, text in _split_overrides(items):
        parts = key.split(".")
        node = config
        for depth, part in enumerate(parts[:-1]):
            if part not in node or not isinstance(node[part], ml_collections.ConfigDict):
                raise _unknown_key(config, key)
            node = node[part]
        leaf = parts[-1]
        if leaf not in node:
            raise _unknown_key(config, key)
        if isinstance(node[leaf], ml_collections.ConfigDict):
            example = flat_keys(node[leaf], f"{key}.")[:1]
            raise ConfigError(f"--config.{key} is a section, not a value; set its keys instead"
                              + (f", e.g. --config.{example[0]}=..." if example else ""))
        kind = node.get_type(leaf)
        value = None if text.lower() in ("none", "null") and node[leaf] is None else \
            _parse_value(key, text, kind, node[leaf])
        try:
            setattr(node, leaf, value)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"--config.{key}={text}: {e}") from None
    return config


# --------------------------------------------------------------------------------- validation
def _check(ok: bool, key: str, value: Any, need: str) -> None:
    if not ok:
        raise ConfigError(f"--config.{key}={value!r} is invalid: {need}")


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def validate_training(config: ml_collections.ConfigDict) -> None:
    """Ranges and types of every train/optimizer/mesh value, and the model config, in one place.

    Called before a workdir is created, so a bad value never leaves a half-made run behind.
    """
    from phi_jax.config import ModelConfig

    t = config.train
    for key in ("steps", "batch_size", "accum_steps", "checkpoint_every", "log_every",
                "max_nonfinite_streak"):
        _check(isinstance(t[key], int) and t[key] >= 1, f"train.{key}", t[key], "must be an integer >= 1")
    _check(t.seq_len >= 2, "train.seq_len", t.seq_len, "must be >= 2")
    _check(t.max_to_keep is None or t.max_to_keep >= 1, "train.max_to_keep", t.max_to_keep,
           "must be >= 1 (or None to keep every checkpoint)")
    _check(t.stop_at_step >= 0, "train.stop_at_step", t.stop_at_step, "must be >= 0 (0 = off)")
    _check(t.seed >= 0, "train.seed", t.seed, "must be >= 0")
    _check(t.loss_chunk >= 0, "train.loss_chunk", t.loss_chunk, "must be >= 0 (0 = no chunking)")
    if "eval_batches" in t:
        _check(t.eval_batches >= 0, "train.eval_batches", t.eval_batches, "must be >= 0 (0 = no eval)")

    o = config.optimizer
    float32_max = 3.4028234663852886e38
    _check(_finite(o.lr) and 0 < o.lr < float32_max, "optimizer.lr", o.lr,
           "the learning rate must be a positive, finite float32 number (e.g. 1e-3)")
    _check(o.warmup_steps >= 0, "optimizer.warmup_steps", o.warmup_steps, "must be >= 0")
    _check(_finite(o.min_lr_ratio) and 0 <= o.min_lr_ratio <= 1, "optimizer.min_lr_ratio",
           o.min_lr_ratio, "must be in [0, 1]")
    _check(_finite(o.weight_decay) and o.weight_decay >= 0, "optimizer.weight_decay", o.weight_decay,
           "must be finite and >= 0")
    for key in ("b1", "b2"):
        _check(_finite(o[key]) and 0 <= o[key] < 1, f"optimizer.{key}", o[key], "must be in [0, 1)")
    _check(_finite(o.eps) and o.eps > 0, "optimizer.eps", o.eps, "must be finite and > 0")
    _check(_finite(o.grad_clip) and o.grad_clip >= 0, "optimizer.grad_clip", o.grad_clip,
           "must be finite and >= 0 (0 = no clipping)")
    from phi_jax.training.optimizer import SCHEDULES
    _check(o.schedule in SCHEDULES, "optimizer.schedule", o.schedule, f"must be one of {SCHEDULES}")

    for axis, size in config.mesh.shape.items():
        _check(isinstance(size, int) and (size == -1 or size >= 1), f"mesh.shape.{axis}", size,
               "must be a positive integer or -1 (the remaining devices)")
    try:
        model_config = ModelConfig.from_dict(config.model.to_dict())
    except ValueError as e:
        message = str(e).replace("ModelConfig.", "--config.model.")
        raise ConfigError(message) from None
    if "lora" in config:
        _validate_lora(config.lora, model_config)
    from phi_jax.data.pipeline import validate_data_config
    validate_data_config(config.data)
    if "curation" in config:
        validate_curation(config)


def _validate_lora(lora: ml_collections.ConfigDict, model_config) -> None:
    from phi_jax.lora import with_lora

    _check(isinstance(lora.rank, int) and lora.rank >= 0, "lora.rank", lora.rank,
           "must be an integer >= 0 (0 = full fine-tuning; 8 or 16 are usual LoRA ranks)")
    if not lora.rank:
        return
    try:
        with_lora(model_config, lora.rank, lora.alpha, lora.targets)
    except ValueError as e:
        message = str(e).replace("ModelConfig.lora_targets", f"--config.lora.targets={lora.targets!r}")
        raise ConfigError(message.replace("ModelConfig.lora_alpha", "--config.lora.alpha")) from None


def validate_curation(config: ml_collections.ConfigDict) -> None:
    """The ranges of `curation.*` (the stages themselves check the rest when they are built)."""
    c = config.curation
    if not c.enabled:
        return
    _check(c.runner in ("local", "beam"), "curation.runner", c.runner, "must be local or beam")
    for key in ("workers", "shard_size"):
        _check(isinstance(c[key], int) and c[key] >= 1, f"curation.{key}", c[key], "must be an integer >= 1")
    curable = ("default", "text", "jsonl", "arrayrecord")
    sources = [s.strip() for s in c.sources.split(",") if s.strip()]
    _check(all(s in curable for s in sources), "curation.sources", c.sources,
           f"list data sources among {', '.join(curable)} (tfds data is curated with `phi-jax data`)")
    a, f, d, x = c.annotate, c.filter, c.dedup, c.decontaminate
    if a.enabled:
        _check(bool(a.rubric), "curation.annotate.rubric", a.rubric, "name a rubric: code, edu or a file")
        _check(a.max_chars >= 1, "curation.annotate.max_chars", a.max_chars, "must be >= 1")
        _check(a.concurrency >= 1, "curation.annotate.concurrency", a.concurrency, "must be >= 1")
        _check(a.teacher == "heuristic" or a.teacher.startswith(("http://", "https://")),
               "curation.annotate.teacher", a.teacher, "must be heuristic or an http(s):// endpoint URL")
    if f.enabled:
        _check(_finite(f.min_score) and 0 <= f.min_score <= 5, "curation.filter.min_score", f.min_score,
               "must be a score in [0, 5]")
        _check(bool(f.field.strip(".")), "curation.filter.field", f.field,
               "name a meta field such as annotation.score")
        _check(a.enabled or f.field != "annotation.score", "curation.filter.enabled", True,
               "the filter reads annotation.score, which curation.annotate writes; turn annotate on "
               "(--config.curation.annotate.enabled=True) or the filter off")
    if d.enabled:
        _check(_finite(d.threshold) and 0 < d.threshold <= 1, "curation.dedup.threshold", d.threshold,
               "must be a Jaccard similarity in (0, 1]")
        _check(isinstance(d.ngram, int) and 1 <= d.ngram <= 1000, "curation.dedup.ngram", d.ngram,
               "must be 1..1000 words per shingle")
    if x.enabled:
        _check(bool(x.against.strip(", ")), "curation.decontaminate.against", x.against,
               "name evaluation sets, e.g. humaneval or evals/mmlu.jsonl")
        _check(isinstance(x.ngram, int) and x.ngram >= 1, "curation.decontaminate.ngram", x.ngram,
               "must be >= 1")
