"""`phi-jax`: the command line, the only place that wires every part of the library together.

    phi-jax train    --config=configs/tiny.py --workdir=DIR [--config.train.steps=N ...]
    phi-jax finetune --config=FILE --model=BASE --data=DIR --workdir=DIR [--merge=OUT]
    phi-jax sample   --model=PATH --prompt="def fibonacci(n):"
    phi-jax convert  SRC DST                    HF dir / workdir / .gguf -> the other form
    phi-jax serve    --model=PATH --port=8000
    phi-jax eval     humaneval|perplexity|choice --model=PATH --output=DIR
    phi-jax data     annotate|train-classifier|score|filter --input=... --output=DIR
    phi-jax recipe   --config=configs/recipe_phi1_tiny.py --workdir=DIR   (the phi-1 recipe end to end)
    phi-jax plan     --config=configs/phi-2.py --devices 8 64

One style for every subcommand: argparse subparsers, one module per subcommand in this package
(each has `register(subparsers)` and imports its heavy modules only when it runs, so `--help` is
instant), `--help` everywhere, and one error path: a `phi_jax.errors.PhiJaxError` becomes a single
line on stderr and exit code 2 (bad input) or 1 (failure); `--debug` shows the traceback.
Run as a program, it first re-executes itself under a retaining allocator when one is installed
(`phi_jax.allocator`; `PHI_JAX_ALLOCATOR=system` opts out).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import traceback

from phi_jax import errors

# Subcommands in the order `phi-jax --help` lists them; each is phi_jax.cli.<name>.
SUBCOMMANDS = ("train", "finetune", "sample", "convert", "serve", "eval", "data", "recipe", "plan")
# Subcommands whose unrecognised arguments are `--config.a.b=value` overrides.
_TAKES_CONFIG_OVERRIDES = ("train", "finetune", "recipe", "plan")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="phi-jax", description="Train, sample, serve and evaluate Phi-style language models.",
        epilog="Add --debug to any command to see the traceback of an error.")
    parser.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in SUBCOMMANDS:
        importlib.import_module(f"phi_jax.cli.{name}").register(sub)
    return parser


def _version() -> str:
    import phi_jax
    from phi_jax import allocator

    return f"phi_jax {phi_jax.__version__} (python {sys.version.split()[0]}, allocator {allocator.current()})"


def _quiet_library_logs() -> None:
    """Orbax and JAX log every checkpoint phase at INFO through absl; keep the terminal readable."""
    try:
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.ERROR)
    except ImportError:
        pass
    for name in ("absl", "jax._src.xla_bridge", "jax._src.distributed", "orbax", "httpx"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # Orbax warns that a checkpoint directory opened read-only "is read only": that is what
    # inference asks for, not a problem, so it must not reach users as a warning.
    logging.getLogger("absl").addFilter(
        lambda record: "Given directory is read only" not in record.getMessage())


def _pop_debug(argv: list[str]) -> list[str]:
    """`--debug` may stand anywhere (users add it at the end of a failing command)."""
    if "--debug" in argv:
        os.environ["PHI_JAX_DEBUG"] = "1"
        argv = [a for a in argv if a != "--debug"]
    return argv


def main(argv: list[str] | None = None) -> int:
    if argv is None and sys.argv[1:] and not {"-h", "--help"} & set(sys.argv[1:]):
        from phi_jax import allocator  # a process, not a call: only when run as a program

        allocator.reexec_with_retaining_allocator(sys.argv[1:])
    argv = _pop_debug(list(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _quiet_library_logs()
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command not in _TAKES_CONFIG_OVERRIDES:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.config_overrides = extra
    try:
        return int(args.func(args) or 0)
    except errors.PhiJaxError as e:
        if errors.debug_enabled():
            traceback.print_exc()
        print(f"phi-jax {args.command}: error: {errors.one_line(e)}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"phi-jax {args.command}: interrupted", file=sys.stderr)
        return 130


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())
