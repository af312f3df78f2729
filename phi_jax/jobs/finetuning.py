"""Fine-tuning as a function: chat data + a base model -> a LoRA adapter (or fully tuned weights).

    result = finetune("configs/finetune_smollm2_lora.py:runlocal", model="smollm2",
                      data=[{"messages": [{"role": "user", "content": "Hi"},
                                          {"role": "assistant", "content": "Hello!"}]}],
                      workdir="runs/ft", overrides={"train.steps": 3})
    result.adapter                     # WORKDIR/adapter, PEFT's format
    result.loaded.chat([{"role": "user", "content": "Hi"}])

What `phi-jax finetune` runs. The model's shape comes from the base; the config sets the training
(train.*, optimizer.*, lora.*, data.*) and the compute settings (COMPUTE_FIELDS). The run is the
trainer's (`phi_jax.training.loop.train`): the same checkpoints in the workdir and the same exact
resume (call it again). Every path under the workdir goes through `phi_jax.fileio` (gs:// works).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
from typing import Any, Mapping, Sequence

from phi_jax import fileio
from phi_jax.errors import InputError, MissingFileError
from phi_jax.jobs.config import ConfigLike, resolve

log = logging.getLogger(__name__)

# ModelConfig fields the fine-tuning config decides; every other field is the base model's.
COMPUTE_FIELDS = ("dtype", "attention_impl", "rotary_impl", "remat_policy", "resid_pdrop", "embd_pdrop")
DATA_DIR = "data"  # WORKDIR/data/part-00000.jsonl: conversations given in memory


@dataclasses.dataclass
class FinetuneResult:
    """What a fine-tuning run wrote: the adapter (LoRA) or tuned workdir, the merged model, metrics.

    `loaded` (loaded on first use) is the tuned model as a `phi_jax.inference.loader.Loaded`: the
    base with the adapter applied (LoRA), or the workdir's final weights (full fine-tuning).
    """

    workdir: str
    model: str
    adapter: str | None
    merged: str | None
    start_step: int
    end_step: int
    total_steps: int
    losses: list[float]
    heldout: list[dict]
    summary: dict[str, Any]
    dtype: str = "float32"
    tokenizer: str | None = None
    checkpoint_step: int | None = None  # the step the adapter / merged model were written from

    @property
    def finished(self) -> bool:
        return self.end_step >= self.total_steps

    @property
    def final_loss(self) -> float | None:
        return self.losses[-1] if self.losses else None

    @functools.cached_property
    def loaded(self):
        """The tuned model, ready for `generate` / `chat` (through the one loader)."""
        from phi_jax.inference import loader

        if not self.finished:
            raise InputError(f"the run in {self.workdir} stopped at step {self.end_step} of "
                             f"{self.total_steps}; call finetune again with the same workdir to finish it")
        if self.adapter:
            return loader.load(self.model, dtype=self.dtype, adapter=self.adapter, tokenizer=self.tokenizer)
        return loader.load(self.workdir, dtype=self.dtype)

    def to_json(self) -> dict[str, Any]:
        """The JSON line `phi-jax finetune` prints last."""
        out = {k: v for k, v in self.summary.items() if k != "losses"}
        if self.losses:
            out.update(first_loss=self.losses[0], last_loss=self.losses[-1])
        return out


def finetune(config: ConfigLike, *, model: str, data: str | Sequence[Mapping], workdir: str,
             merge: str | None = None, overrides: Mapping[str, Any] | None = None,
             step: int | None = None, tokenizer: str | None = None) -> FinetuneResult:
    """Instruction-tune `model` on chat `data`, fully or with a LoRA adapter; a rerun resumes.

    A function, so a notebook fine-tunes without building argv; `phi-jax finetune` calls it.

    Args:
      config: a fine-tuning config file (`"configs/finetune_smollm2_lora.py:runlocal"`) or ConfigDict.
      model: the base: an HF directory, a phi_jax workdir, a .gguf file or `"smollm2"`.
      data: chat data: the output of `phi-jax data instruct`, JSONL / ArrayRecord files of records
        with meta.messages (comma-separated, globs), or an in-memory list of
        `{"messages": [{"role": ..., "content": ...}, ...]}` (written to WORKDIR/data first).
      workdir: the run directory (checkpoints, metrics, adapter), local or gs://.
      merge: also write the tuned model (adapter folded in) here as an HF directory.
      overrides: `{"lora.rank": 8, "train.steps": 3, ...}`, checked as `--config.k=v` is.
      step, tokenizer: a workdir base's checkpoint step; a tokenizer other than the base's.
    """
    config = resolve(config, overrides)
    config, base = prepare(config, model=model, data=data, workdir=workdir, step=step, tokenizer=tokenizer)
    return run_prepared(config, base, model=model, workdir=workdir, merge=merge, tokenizer=tokenizer)


def prepare(config, *, model: str, data, workdir: str, step: int | None = None,
            tokenizer: str | None = None):
    """(the validated training config, the loaded base): everything checked before a step runs."""
    import ml_collections

    from phi_jax.inference import loader
    from phi_jax.training import config_file

    if "lora" not in config:
        raise InputError("the config has no lora section; start the config from "
                         "phi_jax.training.defaults.base_config()")
    if not isinstance(config.lora.rank, int) or config.lora.rank < 0:
        raise InputError(f"--config.lora.rank={config.lora.rank!r} is invalid: must be an integer >= 0 "
                         "(0 = full fine-tuning; 8 or 16 are usual LoRA ranks)")
    field = config.data.messages_field or "messages"
    if not isinstance(data, (str, bytes)) and not hasattr(data, "__fspath__"):
        data = write_conversations(fileio.as_path(workdir) / DATA_DIR, data, field)
    source, files = data_files(str(data), field)
    loader.source_kind(model)  # a missing or odd path: one line, before anything loads

    base = loader.load(model, dtype=config.model.param_dtype, step=step, tokenizer=tokenizer,
                       layout="training")
    loader.require_tokenizer(base, model)
    model_config = base.model.config.replace(**{f: config.model[f] for f in COMPUTE_FIELDS}, scan_layers=True)
    with config.unlocked():
        config.model = ml_collections.ConfigDict(model_config.to_dict())
    config.data.source = source
    config.data.paths = ",".join(files)
    config.data.messages_field = field
    config.tokenizer.path = _tokenizer_path(tokenizer, base)
    config_file.validate_training(config)
    return config, base


def run_prepared(config, base, *, model: str, workdir: str, merge: str | None = None,
                 tokenizer: str | None = None) -> FinetuneResult:
    """Train from `prepare`'s output and write the adapter / merged model once the run is finished."""
    import jax

    from phi_jax import lora
    from phi_jax.training.loop import model_config_from, train

    tuned_config = model_config_from(config)

    def init_params():
        if not tuned_config.lora_rank:
            return base.variables["params"]
        rng = jax.random.PRNGKey(config.train.seed + 2)
        return lora.add_lora_params(tuned_config, base.variables, rng)["params"]

    summary = train(config, workdir, init_params=init_params)
    adapter = merged = written = None
    if summary["end_step"] >= summary["total_steps"]:
        adapter, merged, written = _write_outputs(workdir, model, base, merge)
        summary.update({"adapter": adapter} if adapter else {}, **({"merged": merged} if merged else {}))
    else:
        log.info("stopped at step %d of %d: rerun to finish (the adapter and the merged model are "
                 "written at the end)", summary["end_step"], summary["total_steps"])
    return FinetuneResult(str(fileio.as_path(workdir)), str(model), adapter, merged, summary["start_step"],
                          summary["end_step"], summary["total_steps"], list(summary["losses"]),
                          summary["heldout"], summary, dtype=str(config.model.param_dtype), tokenizer=tokenizer,
                          checkpoint_step=written)


def write_conversations(directory, conversations: Sequence[Mapping], field: str = "messages") -> str:
    """Conversations ({"messages": [...]} each, or a bare list of turns) as chat records in
    DIRECTORY/part-00000.jsonl, the format `phi-jax data instruct` writes; returns the directory."""
    lines = []
    for i, item in enumerate(conversations):
        messages = item.get(field, item.get("messages")) if isinstance(item, Mapping) else item
        if not isinstance(messages, (list, tuple)) or not all(isinstance(m, Mapping) for m in messages):
            raise InputError(f"data[{i}] is not a conversation; pass {{'messages': [{{'role': 'user', "
                             "'content': ...}, {'role': 'assistant', 'content': ...}]}} per example")
        text = "\n".join(str(m.get("content", "")) for m in messages)
        lines.append(json.dumps({"id": f"c{i}", "text": text, "meta": {field: list(messages)}}) + "\n")
    if not lines:
        raise InputError("data is an empty list; pass at least one conversation")
    directory = fileio.as_path(directory)
    fileio.atomic_write_text(directory / "part-00000.jsonl", "".join(lines))
    return str(directory)


def data_files(spec: str, field: str = "messages") -> tuple[str, list[str]]:
    """(pipeline source, files) of --data, checked to hold chat records."""
    from phi_jax.data import records
    from phi_jax.data.chat_examples import conversation_of

    path = fileio.as_path(spec)
    if path.is_dir() and records.read_manifest(path) is None:  # a plain folder of shards
        files = sorted(str(p) for p in path.iterdir() if p.suffix in (".jsonl", ".arrayrecord"))
        if not files:
            raise InputError(f"--data={spec} holds no .jsonl or .arrayrecord files and is not an output "
                             "of `phi-jax data instruct`; make chat data with `phi-jax data instruct`")
        spec = ",".join(files)
    if not path.exists() and not any(ch in spec for ch in "*?,"):
        raise MissingFileError(f"--data={spec} does not exist; pass the output directory of "
                               "`phi-jax data instruct` (or JSONL files of chat records)")
    try:
        shards = records.plan_shards(spec.split(","), shard_size=1 << 30)
    except InputError as e:
        raise InputError(f"--data={spec}: {e}") from None
    files = sorted({s.paths[0] for s in shards if s.paths})
    kinds = {s.kind for s in shards}
    if kinds - {"jsonl", "arrayrecord"} or len(kinds) > 1:
        raise InputError(f"--data={spec}: expected JSONL or ArrayRecord record files (one format), "
                         f"found {files[:4]}")
    first = next((r for s in shards for r in s.read()), None)
    if first is None:
        raise InputError(f"--data={spec} has no records; did `phi-jax data instruct` drop every answer? "
                         "(see its manifest.json)")
    if conversation_of(first, field) is None:
        raise InputError(f"--data={spec}: record {first.get('id')!r} has no meta.{field} conversation; "
                         "fine-tuning needs chat records: make them with `phi-jax data instruct`")
    return kinds.pop(), files


def _tokenizer_path(tokenizer: str | None, base) -> str:
    if tokenizer:
        return str(tokenizer)
    path = base.metadata["path"]
    return str(fileio.as_path(path) / "tokenizer") if base.metadata["source"] == "workdir" else str(path)


def _write_outputs(workdir: str, model: str, base, merge: str | None) -> tuple[str | None, str | None, int]:
    """WORKDIR/adapter (LoRA) and the `merge` HF directory, from the final checkpoint."""
    from phi_jax import checkpoint, lora

    config, variables, step = checkpoint.load_params_for_inference(workdir)
    adapter = merged = None
    if config.lora_rank:
        adapter = str(fileio.as_path(workdir) / "adapter")
        lora.save_adapter(adapter, config, variables, base_model=str(model))
        log.info("adapter (PEFT format, step %d) -> %s", step, adapter)
    if merge:
        lora.save_merged(merge, config, variables, base.tokenizer)
        merged = str(merge)
        log.info("merged model (HF format, step %d) -> %s", step, merge)
    return adapter, merged, step
