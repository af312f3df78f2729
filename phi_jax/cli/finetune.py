"""`phi-jax finetune`: instruction-tune a model on chat data, fully or with a LoRA adapter
(`phi_jax.jobs.finetune`).

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

from phi_jax.cli.train import add_config_arguments


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


def run(args) -> int:
    from phi_jax.jobs import finetuning as job
    from phi_jax.jobs.config import resolve
    from phi_jax.training.summary import format_summary

    config = resolve(args.config, argv=args.config_overrides)
    config, base = job.prepare(config, model=args.model, data=args.data, workdir=args.workdir,
                               step=args.step, tokenizer=args.tokenizer)
    if args.show_config:
        print(config)
        return 0
    result = job.run_prepared(config, base, model=args.model, workdir=args.workdir, merge=args.merge,
                              tokenizer=args.tokenizer)
    print(format_summary(result.summary))
    if result.adapter:
        print(f"adapter (PEFT format, step {result.checkpoint_step}) -> {result.adapter}")
    if result.merged:
        print(f"merged model (HF format, step {result.checkpoint_step}) -> {result.merged}")
    print(json.dumps(result.to_json()))
    return 0
