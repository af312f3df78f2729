"""`phi-jax sample`: sample text from any model, streamed to the terminal as tokens arrive.

    phi-jax sample --model=runs/tiny --prompt="def fibonacci(n):"
    phi-jax sample --model=path/to/phi-2 --prompt="Alice was" --temperature=0 --max-new-tokens=64
"""

from __future__ import annotations

import argparse
import sys

from phi_jax.cli.common import add_model_arguments, add_quantization_arguments, load_model


def register(subparsers) -> None:
    p = subparsers.add_parser("sample", help="sample text from a model, streamed to the terminal",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)
    add_quantization_arguments(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=0.95, help="1 = off")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-samples", type=int, default=1, help="sample n uses seed + n")
    p.add_argument("--add-bos", action="store_true", help="prepend the bos token to the prompt")
    p.set_defaults(func=run)


def run(args) -> int:
    from phi_jax.errors import InputError
    from phi_jax.inference import decode
    from phi_jax.inference.sampling import SamplingParams

    if args.num_samples < 1:
        raise InputError(f"--num-samples={args.num_samples}: must be >= 1")
    loaded = load_model(args)
    model, variables, tokenizer = loaded
    prompt_ids = tokenizer.encode(args.prompt, add_bos=args.add_bos)
    if not prompt_ids:
        if tokenizer.bos_id is None:
            raise InputError("--prompt is empty and the tokenizer has no BOS token to start from")
        prompt_ids = [tokenizer.bos_id]
    stop = () if tokenizer.eos_id is None else (tokenizer.eos_id,)
    params = SamplingParams(max_tokens=args.max_new_tokens, temperature=args.temperature,
                            top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                            stop_token_ids=stop).validated(
        vocab_size=model.config.vocab_size, context=model.config.max_len,
        prompt_length=len(prompt_ids), flag_prefix="--")
    for n in range(args.num_samples):
        if args.num_samples > 1:
            print(f"\n--- sample {n + 1} ---", flush=True)
        sys.stdout.write(args.prompt)
        new_ids: list[int] = []
        shown = [""]

        def stream(_: int, token: int) -> None:
            new_ids.append(token)
            text = tokenizer.decode(new_ids)
            if not text.endswith("\ufffd"):  # wait for a multi-byte character to complete
                sys.stdout.write(text[len(shown[0]):])
                sys.stdout.flush()
                shown[0] = text

        decode.generate(model, variables, [prompt_ids], params.max_tokens,
                        temperature=params.temperature, top_k=params.top_k, top_p=params.top_p,
                        seed=params.seed + n, stop_tokens=list(stop), callback=stream)
        sys.stdout.write(tokenizer.decode(new_ids)[len(shown[0]):] + "\n")  # what was held back
    return 0
