"""`phi-jax finetune`: instruction-tune a model on chat data, fully or with a LoRA adapter.

    phi-jax finetune --config=configs/finetune_smollm2_lora.py --model=smollm2 \
        --data=runs/instruct --workdir=runs/ft [--merge=runs/ft-merged] [--config.lora.rank=8 ...]

--model is the base: an HF checkpoint directory, a phi_jax workdir or a .gguf file (`smollm2` names
the installed SmolLM2-135M-Instruct). --data is chat data: the output of `phi-jax data instruct`
(records whose meta.messages is the conversation) or JSONL/ArrayRecord files of such records. Each
conversation is rendered with the base's chat template (ChatML when it has none;
--config.data.chat_template=FILE replaces it), packed, and trained on with the loss on the
assistant's tokens only. The run is the trainer's: the same checkpoints in --workdir and the same
exact resume (rerun the command). The model's shape comes from the base; the config sets the
training (train.*, optimizer.*, lora.*, data.*) and the compute settings (model.dtype,
model.remat_policy, model.attention_impl).

--config.lora.rank=R > 0 trains only a LoRA adapter on --config.lora.targets (HF module names,
PEFT's target_modules), the base frozen; at the end WORKDIR/adapter holds it in PEFT's format
(adapter_config.json + adapter_model.safetensors), which `peft.PeftModel.from_pretrained` loads onto
the transformers model and `--adapter=DIR` loads in sample / serve / eval. rank 0 fine-tunes every
weight. --merge=OUT also writes the tuned model (adapter folded in) as an HF directory with the
tokenizer and chat template.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

from phi_jax.cli.train import add_config_arguments

log = logging.getLogger(__name__)

# ModelConfig fields the fine-tuning config decides; every other field is the base model's.
COMPUTE_FIELDS = ("dtype", "attention_impl", "rotary_impl", "remat_policy", "resid_pdrop", "embd_pdrop")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "finetune", help="instruction-tune a model on chat data (full or LoRA)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="phi-jax finetune --config=FILE[:arg] --model=PATH --data=DIR --workdir=DIR "
              "[--merge=OUT] [--config.<key>=<value> ...]")
    add_config_arguments(p)
    p.add_argument("--model", required=True, metavar="PATH",
                   help="the base model: an HF checkpoint directory, a phi_jax workdir or a .gguf file")
    p.add_argument("--step", type=int, default=None, help="workdir base only: this checkpoint step")
    p.add_argument("--tokenizer", metavar="PATH", help="tokenizer (default: the base model's)")
    p.add_argument("--data", required=True, metavar="DIR",
                   help="chat data: an output of `phi-jax data instruct`, or JSONL / ArrayRecord files "
                        "(comma-separated, globs) of records with meta.messages")
    p.add_argument("--workdir", required=True, help="run directory (checkpoints, metrics, adapter); "
                                                    "resumed if it holds a run")
    p.add_argument("--merge", metavar="OUT", default=None,
                   help="also write the tuned model, adapter merged, as an HF directory")
    p.set_defaults(func=run)


def data_files(spec: str, field: str = "messages") -> tuple[str, list[str]]:
    """(pipeline source, files) of --data, checked to hold chat records."""
    from phi_jax.data import records
    from phi_jax.data.chat_examples import conversation_of
    from phi_jax.errors import InputError, MissingFileError

    path = Path(spec)
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


def run(args) -> int:
    import ml_collections

    from phi_jax.errors import InputError
    from phi_jax.inference import loader
    from phi_jax.training import config_file

    config = config_file.load_config(args.config)
    config_file.apply_overrides(config, args.config_overrides)
    if "lora" not in config:
        raise InputError(f"{args.config} has no lora section; start the config from "
                         "phi_jax.training.defaults.base_config()")
    if not isinstance(config.lora.rank, int) or config.lora.rank < 0:
        raise InputError(f"--config.lora.rank={config.lora.rank!r} is invalid: must be an integer >= 0 "
                         "(0 = full fine-tuning; 8 or 16 are usual LoRA ranks)")
    field = config.data.messages_field or "messages"
    source, files = data_files(args.data, field)
    loader.source_kind(args.model)  # a missing or odd path: one line, before anything loads

    base = loader.load(args.model, dtype=config.model.param_dtype, step=args.step,
                       tokenizer=args.tokenizer, layout="training")
    loader.require_tokenizer(base, args.model)
    model_config = base.model.config.replace(
        **{f: config.model[f] for f in COMPUTE_FIELDS}, scan_layers=True)
    with config.unlocked():
        config.model = ml_collections.ConfigDict(model_config.to_dict())
    config.data.source = source
    config.data.paths = ",".join(files)
    config.data.messages_field = field
    config.tokenizer.path = str(_tokenizer_path(args, base))
    config_file.validate_training(config)
    if args.show_config:
        print(config)
        return 0

    from phi_jax import lora
    from phi_jax.training.loop import model_config_from, train
    from phi_jax.training.summary import format_summary

    tuned_config = model_config_from(config)

    def init_params():
        import jax

        if not tuned_config.lora_rank:
            return base.variables["params"]
        rng = jax.random.PRNGKey(config.train.seed + 2)
        return lora.add_lora_params(tuned_config, base.variables, rng)["params"]

    summary = train(config, args.workdir, init_params=init_params)
    print(format_summary(summary))
    finished = summary["end_step"] >= summary["total_steps"]
    if finished:
        summary.update(_write_outputs(args, Path(args.workdir), base))
    else:
        log.info("stopped at step %d of %d: rerun the same command to finish (the adapter and "
                 "--merge are written at the end)", summary["end_step"], summary["total_steps"])
    losses = summary.pop("losses")
    if losses:
        summary.update(first_loss=losses[0], last_loss=losses[-1])
    print(json.dumps(summary))
    return 0


def _tokenizer_path(args, base) -> Path:
    if args.tokenizer:
        return Path(args.tokenizer)
    path = Path(base.metadata["path"])
    return path / "tokenizer" if base.metadata["source"] == "workdir" else path


def _write_outputs(args, workdir: Path, base) -> dict:
    """WORKDIR/adapter (LoRA) and the --merge HF directory, from the final checkpoint."""
    from phi_jax import checkpoint, lora

    config, variables, step = checkpoint.load_params_for_inference(workdir)
    out = {}
    if config.lora_rank:
        path = lora.save_adapter(workdir / "adapter", config, variables, base_model=str(args.model))
        out["adapter"] = str(path)
        print(f"adapter (PEFT format, step {step}) -> {path}")
    if args.merge:
        lora.save_merged(args.merge, config, variables, base.tokenizer)
        out["merged"] = str(args.merge)
        print(f"merged model (HF format, step {step}) -> {args.merge}")
    return out
