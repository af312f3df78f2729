"""`phi-jax plan`: memory / step-time plan of a training config on N devices, compiled ahead of time
on this CPU (no accelerator needed).

    phi-jax plan --config=configs/phi-2.py --devices 8 64 256 [--remat=full] [--json=plan.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from phi_jax.cli.train import add_config_arguments, load_validated

_DEFAULT_CONFIG = str(Path(__file__).resolve().parents[2] / "configs/phi-2.py")


def register(subparsers) -> None:
    p = subparsers.add_parser("plan", help="memory / step-time plan of a config on N devices, "
                                           "compiled ahead of time on this CPU",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(p, default=_DEFAULT_CONFIG)
    p.add_argument("--devices", type=int, nargs="+", default=[8, 64, 256])
    p.add_argument("--remat", choices=["none", "full", "dots_saveable"], default=None,
                   help="plan only this remat policy (default: the whole grid)")
    p.add_argument("--json", help="also write the results here")
    p.set_defaults(func=run)


def run(args) -> int:
    from phi_jax.config import ModelConfig
    from phi_jax.errors import InputError
    from phi_jax.fileio import atomic_write_json
    from phi_jax.training import plan

    if any(n < 1 for n in args.devices):
        raise InputError(f"--devices {args.devices}: device counts must be >= 1")
    config = load_validated(args)
    if args.show_config:
        print(config)
        return 0
    model_config = ModelConfig.from_dict(config.model.to_dict())
    results = []
    for n in args.devices:
        settings = [s for s in plan.default_settings(n) if args.remat in (None, s.remat_policy)]
        results += plan.plan(model_config, config.optimizer.to_dict(), config.train.seq_len, n, settings)
    print(plan.format_table(results))
    if args.json:
        atomic_write_json(args.json, results)
    return 0
