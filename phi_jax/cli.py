"""`phi-jax` command line: the only module that wires every part of the library together.

    phi-jax train   --config=configs/tiny.py --workdir=DIR [--config.train.steps=N ...]
    phi-jax sample  --workdir=DIR | --hf=DIR  --prompt="def fibonacci(n):"
    phi-jax convert SRC DST          HF dir -> phi_jax workdir, or workdir -> HF dir
    phi-jax eval    humaneval|perplexity|choice ...
    phi-jax serve   --workdir=DIR | --hf=DIR --port=8000
Subcommands import their heavy modules lazily so `phi-jax --help` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import shutil
import sys
from pathlib import Path

_OPTIONAL_SUBCOMMANDS = ("phi_jax.evals.cli", "phi_jax.serve_cli", "phi_jax.plan")


def _is_hf_dir(path: Path) -> bool:
    return (path / "config.json").exists()


def _is_workdir(path: Path) -> bool:
    return (path / "checkpoints").is_dir()


def load_for_inference(*, workdir: str | None = None, hf: str | None = None, dtype: str = "float32"):
    """(model, variables, tokenizer or None) from a training workdir or an HF directory."""
    import phi_jax
    from phi_jax.model import Phi, decode_prefers_unstacked, inference_layout
    from phi_jax.tokenizer import Tokenizer

    if bool(workdir) == bool(hf):
        raise SystemExit("give exactly one of --workdir=DIR (a phi_jax run) or --hf=DIR (an HF checkpoint)")
    if hf:
        model, variables = phi_jax.from_pretrained(hf, dtype=dtype,
                                                   scan_layers=not decode_prefers_unstacked())
        tok_dir = Path(hf)
    else:
        from phi_jax.train.checkpoint import load_params_for_inference

        config, variables, step = load_params_for_inference(workdir, dtype=dtype)
        logging.info("loaded step %d from %s", step, workdir)
        model, variables = inference_layout(Phi(config), variables)
        tok_dir = Path(workdir) / "tokenizer"
    has_tokenizer = any((tok_dir / f).exists() for f in ("tokenizer.json", "tokenizer.model"))
    tokenizer = Tokenizer.from_pretrained(tok_dir) if has_tokenizer else None
    return model, variables, tokenizer


# ----------------------------------------------------------------------------------- sample
def _cmd_sample(args) -> int:
    import phi_jax

    model, variables, tokenizer = load_for_inference(workdir=args.workdir, hf=args.hf, dtype=args.dtype)
    if tokenizer is None:
        raise SystemExit("no tokenizer.json or tokenizer.model found beside the checkpoint; "
                         "copy the tokenizer files into it")
    prompt_ids = tokenizer.encode(args.prompt, add_bos=args.add_bos)
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

        phi_jax.generate(model, variables, [prompt_ids], max_new_tokens=args.max_new_tokens,
                         temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                         seed=args.seed + n, callback=stream,
                         stop_tokens=None if tokenizer.eos_id is None else [tokenizer.eos_id])
        sys.stdout.write("\n")
    return 0


def _add_sample(sub) -> None:
    p = sub.add_parser("sample", help="sample text from a checkpoint, streamed to the terminal")
    p.add_argument("--workdir", help="a phi_jax training workdir (latest checkpoint)")
    p.add_argument("--hf", help="an HF Phi checkpoint directory")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--add-bos", action="store_true", help="prepend the bos token to the prompt")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.set_defaults(func=_cmd_sample)


# ---------------------------------------------------------------------------------- convert
def _copy_tokenizer(src: Path, dst: Path) -> None:
    names = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
             "vocab.json", "merges.txt", "added_tokens.json", "generation_config.json")
    for name in names:
        if (src / name).exists():
            dst.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src / name, dst / name)


def _cmd_convert(args) -> int:
    import phi_jax
    from phi_jax.train import checkpoint

    src, dst = Path(args.src), Path(args.dst)
    if _is_hf_dir(src) and not _is_workdir(src):
        if _is_workdir(dst):
            raise SystemExit(f"{dst} already holds a phi_jax run; choose a new workdir")
        model, variables = phi_jax.from_pretrained(src, dtype=args.dtype or "float32")
        manager = checkpoint.make_manager(dst, async_save=False)
        checkpoint.save(manager, 0, params=variables["params"],
                        meta={"model_config": model.config.to_dict(), "converted_from": str(src.absolute())})
        manager.wait_until_finished()
        _copy_tokenizer(src, dst / "tokenizer")
        print(f"converted HF checkpoint {src} -> phi_jax workdir {dst} (step 0)")
    elif _is_workdir(src):
        config, variables, step = checkpoint.load_params_for_inference(src)
        phi_jax.save_pretrained(dst, config, variables, dtype=args.dtype,
                                max_shard_size=int(args.max_shard_size_gb * 2**30))
        _copy_tokenizer(src / "tokenizer", dst)
        print(f"converted phi_jax workdir {src} (step {step}) -> HF checkpoint {dst}")
    else:
        raise SystemExit(f"{src} is neither an HF checkpoint (config.json) nor a phi_jax workdir "
                         "(checkpoints/)")
    return 0


def _add_convert(sub) -> None:
    p = sub.add_parser("convert", help="HF checkpoint dir <-> phi_jax workdir (direction from SRC)")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--dtype", default=None, choices=[None, "float32", "bfloat16", "float16"],
                   help="dtype of the written weights (default: as stored)")
    p.add_argument("--max-shard-size-gb", type=float, default=5.0)
    p.set_defaults(func=_cmd_convert)


# ------------------------------------------------------------------------------------ train
def _cmd_train(args, extra: list[str]) -> int:
    from phi_jax.train import run

    return run.main(["phi-jax train", *extra])


def _quiet_library_logs() -> None:
    """Orbax and JAX log every checkpoint phase at INFO through absl; keep the terminal readable."""
    try:
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.WARNING)
    except ImportError:
        pass
    for name in ("absl", "jax._src.xla_bridge", "jax._src.distributed"):
        logging.getLogger(name).setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _quiet_library_logs()
    if argv and argv[0] == "train":  # absl/ml_collections flags: --config.key=value overrides
        return _cmd_train(None, argv[1:])
    parser = argparse.ArgumentParser(prog="phi-jax", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("train", help="train a model: phi-jax train --config=configs/tiny.py --workdir=DIR")
    _add_sample(sub)
    _add_convert(sub)
    for module in _OPTIONAL_SUBCOMMANDS:
        try:
            importlib.import_module(module).register(sub)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
