"""`phi-jax export`: a model as one GGUF file for llama.cpp, Ollama and LM Studio.

    phi-jax export --model=runs/tiny --output=tiny-q8_0.gguf --quant=q8_0
    phi-jax export --model=path/to/phi-2 --output=phi-2-f16.gguf --quant=f16
    phi-jax export --model=smollm2 --adapter=runs/ft/adapter --output=ft-q4_0.gguf --quant=q4_0

--model takes what every command takes (HF directory, phi_jax workdir, .gguf); --adapter is merged
into the weights first. Quants: f32, f16, bf16, q8_0, q4_0, q4_1 (matrices; norms and biases stay
f32; see `phi_jax.gguf_export`). The file is written beside OUT under a temporary name and renamed
when complete; an existing OUT is replaced only with --overwrite.
"""

from __future__ import annotations

import argparse

from phi_jax.cli.common import add_model_arguments, load_model


def register(subparsers) -> None:
    p = subparsers.add_parser("export", help="write a model as a GGUF file (llama.cpp, Ollama)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)
    p.add_argument("--output", required=True, metavar="OUT.gguf", help="the GGUF file to write")
    p.add_argument("--quant", default="f32",
                   help="f32 | f16 | bf16 | q8_0 | q4_0 | q4_1 (default f32)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing OUT (only once the new file is complete)")
    p.set_defaults(func=run)


def run(args) -> int:
    from phi_jax import gguf_export

    gguf_export.check_quant(args.quant)
    gguf_export.check_output(args.output, overwrite=args.overwrite)
    loaded = load_model(args, need_tokenizer=False)
    summary = gguf_export.save_gguf(loaded, args.output, quant=args.quant, overwrite=args.overwrite)
    print("\n".join(summary.lines()))
    return 0
