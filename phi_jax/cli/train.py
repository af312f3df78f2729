"""`phi-jax train`: pretrain (or resume) a model from a config file.

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
    from phi_jax.training import config_file

    config = config_file.load_config(args.config)
    config_file.apply_overrides(config, args.config_overrides)
    config_file.validate_training(config)
    return config


def run(args) -> int:
    from phi_jax.errors import InputError

    config = load_validated(args)
    if args.show_config:
        print(config)
        return 0
    if not args.workdir:
        raise InputError("phi-jax train needs --workdir=DIR (where checkpoints and metrics go)")
    from phi_jax import distributed

    distributed.maybe_initialize(coordinator_address=args.coordinator_address,
                                 num_processes=args.num_processes, process_id=args.process_id)
    import time
    from pathlib import Path

    from phi_jax.cli import stages
    from phi_jax.training.loop import preflight, train
    from phi_jax.training.summary import format_summary

    checked = preflight(config, args.workdir)  # what can fail without data fails before curation writes
    curation = stages.curate_for_training(config, Path(args.workdir), progress=config.train.progress_bar)
    start = time.perf_counter()
    summary = train(config, args.workdir, checked=checked)
    table, rows = stages.stage_report(curation, summary, config, time.perf_counter() - start)
    print(format_summary(summary))
    print(table)
    losses = summary.pop("losses")
    if losses:
        summary.update(first_loss=losses[0], last_loss=losses[-1])
    summary["stages"] = rows
    print(json.dumps(summary))
    return 0
