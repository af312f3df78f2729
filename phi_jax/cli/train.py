"""`phi-jax train`: pretrain (or resume) a model from a config file (`phi_jax.jobs.train`).

    phi-jax train --config=configs/tiny.py --workdir=runs/tiny [--config.train.steps=100 ...]

With `config.curation.enabled` (configs/tiny.py), the data is curated first, each stage into
WORKDIR/curated/<stage> with its manifest (annotate -> filter -> dedup -> decontaminate; a finished
stage is skipped on a rerun), and the run ends with one line per stage (documents and tokens in ->
out, time), training and the held-out evaluation included.

`--config` names a Python file whose `get_config(arg)` returns the ConfigDict (`FILE:arg` passes
an argument); `--config.<key>=<value>` overrides any key. The config is validated before the
workdir is created, so a typo leaves nothing behind.
"""

from __future__ import annotations

import argparse
import json


def add_config_arguments(parser: argparse.ArgumentParser, default: str | None = None) -> None:
    parser.add_argument("--config", required=default is None, default=default,
                        help="config file (configs/*.py), optionally FILE:arg; "
                             "override keys with --config.<key>=<value>")
    parser.add_argument("--show-config", action="store_true",
                        help="print the resolved config (every key and value) and exit")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="pretrain or resume a model from a config file",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="phi-jax train --config=FILE[:arg] --workdir=DIR [--config.<key>=<value> ...]")
    add_config_arguments(p)
    p.add_argument("--workdir", help="run directory: checkpoints, metrics, tokenizer (resumed if it "
                                     "holds a run)")
    p.add_argument("--coordinator-address", help="multi-host: host:port of process 0")
    p.add_argument("--num-processes", type=int, help="multi-host: number of processes")
    p.add_argument("--process-id", type=int, help="multi-host: this process's id")
    p.set_defaults(func=run)


def load_validated(args) -> "ml_collections.ConfigDict":  # noqa: F821
    """The config named by --config with the command line's overrides applied and validated."""
    from phi_jax.jobs.config import resolve
    from phi_jax.training import config_file

    config = resolve(args.config, argv=args.config_overrides)
    config_file.validate_training(config)
    return config


def run(args) -> int:
    config = load_validated(args)
    if args.show_config:
        print(config)
        return 0
    from phi_jax import distributed

    distributed.maybe_initialize(coordinator_address=args.coordinator_address,
                                 num_processes=args.num_processes, process_id=args.process_id)
    from phi_jax.jobs.main import run_validated
    from phi_jax.training.summary import format_summary

    result = run_validated(config, args.workdir)
    print(format_summary(result.summary))
    print(result.table)
    print(json.dumps(result.to_json()))
    return 0
