"""Arguments shared by the subcommands that load a model, so every one spells them the same."""

from __future__ import annotations

import argparse

DTYPES = ("float32", "bfloat16", "float16")


def add_model_arguments(parser: argparse.ArgumentParser, *, required: bool = True) -> None:
    """--model (with its one-release aliases --hf/--workdir/--checkpoint), --tokenizer, --dtype."""
    parser.add_argument("--model", "--hf", "--workdir", "--checkpoint", dest="model",
                        required=required, metavar="PATH",
                        help="an HF checkpoint directory, a phi_jax training workdir or a .gguf file "
                             "(--hf, --workdir and --checkpoint are aliases kept for one release)")
    parser.add_argument("--step", type=int, default=None,
                        help="workdir only: load this checkpoint step (default: the latest)")
    parser.add_argument("--tokenizer", metavar="PATH",
                        help="tokenizer directory or file (default: the one beside the model)")
    parser.add_argument("--dtype", default="float32", choices=DTYPES)
    parser.add_argument("--adapter", metavar="DIR", default=None,
                        help="a LoRA adapter (adapter_config.json + adapter_model.safetensors, as "
                             "`phi-jax finetune` or PEFT write it) applied on top of --model")


def add_quantization_arguments(parser: argparse.ArgumentParser) -> None:
    """--quantize and --kv-cache-dtype (`phi_jax.quant`), for the commands that run inference.
    Values are checked by the library, so a bad one is the same one line from Python and CLI."""
    parser.add_argument("--quantize", default=None, metavar="MODE",
                        help="weight-only quantization of the linear layers: int8 (per channel), int4 "
                             "(groups of 32), or with a group size: int4:128, int8:32")
    parser.add_argument("--kv-cache-dtype", default=None, metavar="DTYPE",
                        help="int8: the KV cache in int8 with a scale per token and kv head "
                             "(default: the model dtype)")


def load_model(args, *, need_tokenizer: bool = True, layout: str = "inference"):
    """`phi_jax.inference.load` for the model arguments above."""
    from phi_jax.inference import loader

    loaded = loader.load(args.model, dtype=args.dtype, step=args.step, tokenizer=args.tokenizer,
                         layout=layout, adapter=getattr(args, "adapter", None),
                         quantize=getattr(args, "quantize", None),
                         kv_cache_dtype=getattr(args, "kv_cache_dtype", None))
    if need_tokenizer:
        loader.require_tokenizer(loaded, args.model)
    return loaded
