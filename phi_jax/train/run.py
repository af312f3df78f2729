"""`phi-jax train`: parse --config / --config.key=value / --workdir, then run the loop.

Uses ml_collections' config flags (the big_vision convention) on a private FlagValues, so the
flags never leak into a host program that imports phi_jax.
"""

from __future__ import annotations

import json
import logging
import sys

from absl import flags
from ml_collections import config_flags

log = logging.getLogger(__name__)


def parse(argv: list[str]):
    """(config, workdir) from argv like ['phi-jax train', '--config=configs/tiny.py', ...]."""
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "training config file (configs/*.py)",
                                    flag_values=fv, lock_config=True)
    flags.DEFINE_string("workdir", None, "run directory: checkpoints, metrics, tokenizer", flag_values=fv)
    flags.DEFINE_string("coordinator_address", None, "multi-host: host:port of process 0", flag_values=fv)
    flags.DEFINE_integer("num_processes", None, "multi-host: number of processes", flag_values=fv)
    flags.DEFINE_integer("process_id", None, "multi-host: this process's id", flag_values=fv)
    try:
        fv(argv)
    except (flags.Error, KeyError, AttributeError, ValueError) as e:
        raise SystemExit(f"phi-jax train: {e}") from None
    if fv.config is None or fv.workdir is None:
        raise SystemExit("usage: phi-jax train --config=configs/tiny.py --workdir=DIR "
                         "[--config.train.steps=N ...]")
    return fv.config, fv.workdir, fv


def main(argv: list[str]) -> int:
    config, workdir, fv = parse(argv)
    from phi_jax import distributed

    distributed.maybe_initialize(coordinator_address=fv.coordinator_address,
                                 num_processes=fv.num_processes, process_id=fv.process_id)
    from phi_jax.train.loop import train

    summary = train(config, workdir)
    losses = summary.pop("losses")
    if losses:
        summary.update(first_loss=losses[0], last_loss=losses[-1])
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
