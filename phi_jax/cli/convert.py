"""`phi-jax convert SRC DST`: between HF checkpoint directories, phi_jax workdirs and GGUF files.

    phi-jax convert path/to/hf-phi-2 runs/phi2           HF dir -> phi_jax workdir (step 0)
    phi-jax convert runs/tiny exported/tiny-hf           workdir -> HF dir (transformers loads it)
    phi-jax convert model.gguf exported/model-hf         GGUF -> HF dir (weights, config, tokenizer)
    phi-jax convert --adapter=runs/ft/adapter BASE OUT   base + LoRA adapter -> merged HF dir

The direction follows from SRC. DST is written whole into a temporary sibling and renamed into
place; an existing non-empty DST is refused unless --overwrite, and then replaced only once the new
one is complete. SRC and DST may be in a bucket (gs://...): an HF directory is uploaded with its
config.json last (a loader takes it for an HF checkpoint only once that exists), a workdir is
written by Orbax straight to the bucket, where a step counts only once its commit_success.txt is
there (see `phi_jax.fileio`). A bucket has no rename, so there --overwrite removes the old DST first.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                    "special_tokens_map.json", "vocab.json", "merges.txt", "added_tokens.json",
                    "generation_config.json")


def register(subparsers) -> None:
    p = subparsers.add_parser("convert", help="HF checkpoint dir <-> phi_jax workdir, GGUF -> HF dir",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="an HF checkpoint directory, a phi_jax workdir or a .gguf file")
    p.add_argument("dst", help="the directory to write (must not exist or be empty, see --overwrite)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="dtype of the written weights (default: as stored; GGUF: float32)")
    p.add_argument("--max-shard-size-gb", type=float, default=5.0)
    p.add_argument("--step", type=int, default=None, help="workdir SRC: this step (default: latest)")
    p.add_argument("--adapter", metavar="DIR", default=None,
                   help="a LoRA adapter (PEFT format) to merge into SRC; writes an HF directory")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a non-empty DST (only once the new output is complete)")
    p.set_defaults(func=run)


def copy_tokenizer_files(src, dst: Path) -> None:
    from phi_jax import fileio

    if fileio.is_remote(src):
        if not fileio.as_path(src).is_dir():
            return
        src = fileio.local_copy(src, only=_TOKENIZER_FILES)
    for name in _TOKENIZER_FILES:
        if (src / name).is_file():
            dst.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src / name, dst / name)


def run(args) -> int:
    import phi_jax
    from phi_jax import checkpoint, fileio
    from phi_jax.errors import InputError
    from phi_jax.fileio import staged_directory
    from phi_jax.inference.loader import load, resolve, source_kind

    src, dst = resolve(args.src), fileio.as_path(args.dst)
    if args.max_shard_size_gb <= 0:
        raise InputError(f"--max-shard-size-gb={args.max_shard_size_gb}: must be > 0")
    kind = source_kind(src)
    if _same(src, dst):
        raise InputError(f"DST {dst} is SRC; choose a separate output directory")
    if args.adapter:
        from phi_jax import lora

        loaded = load(src, dtype=args.dtype or "float32", step=args.step, layout="training",
                      adapter=args.adapter)
        lora.save_merged(dst, loaded.model.config, loaded.variables, loaded.tokenizer,
                         overwrite=args.overwrite, dtype=args.dtype)
        print(f"merged adapter {args.adapter} into {kind} {src} -> HF checkpoint {dst}")
        return 0
    if kind == "hf":
        if args.step is not None:
            raise InputError("--step applies to a workdir SRC only")
        loaded = load(src, dtype=args.dtype or "float32", layout="training")
        meta = {"model_config": loaded.model.config.to_dict(),
                "converted_from": str(src) if fileio.is_remote(src) else str(src.absolute())}
        if fileio.is_remote(dst):  # Orbax commits the step on the bucket itself (commit_success.txt)
            fileio.check_writable_output(dst, overwrite=args.overwrite)
            fileio.rmtree(dst)
            with staged_directory(dst / "tokenizer") as tok:
                copy_tokenizer_files(src, tok)
            _save_step0(dst, loaded.variables["params"], meta)
        else:
            with staged_directory(dst, overwrite=args.overwrite) as out:
                _save_step0(out, loaded.variables["params"], meta)
                copy_tokenizer_files(src, out / "tokenizer")
        print(f"converted HF checkpoint {src} -> phi_jax workdir {dst} (step 0)")
        return 0
    if kind == "workdir":
        config, variables, step = checkpoint.load_params_for_inference(src, step=args.step)
        with staged_directory(dst, overwrite=args.overwrite) as out:
            phi_jax.save_pretrained(out / "model", config, variables, dtype=args.dtype,
                                    max_shard_size=int(args.max_shard_size_gb * 2**30))
            for item in (out / "model").iterdir():
                item.rename(out / item.name)
            (out / "model").rmdir()
            copy_tokenizer_files(src / "tokenizer", out)
        print(f"converted phi_jax workdir {src} (step {step}) -> HF checkpoint {dst}")
        return 0
    from phi_jax import gguf

    with staged_directory(dst, overwrite=args.overwrite) as out:
        gguf.convert_to_hf(fileio.local_copy(src), out, dtype=args.dtype,
                           max_shard_size=int(args.max_shard_size_gb * 2**30))
    print(f"converted GGUF {src} -> HF checkpoint {dst}")
    return 0


def _same(a, b) -> bool:
    from phi_jax import fileio

    if fileio.is_remote(a) or fileio.is_remote(b):
        return str(a).rstrip("/") == str(b).rstrip("/")
    return Path(a).resolve() == Path(b).resolve()


def _save_step0(workdir, params, meta: dict) -> None:
    from phi_jax import checkpoint

    manager = checkpoint.make_manager(workdir, async_save=False)
    checkpoint.save(manager, 0, params=params, meta=meta)
    manager.wait_until_finished()
    manager.close()
