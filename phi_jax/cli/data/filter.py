"""`phi-jax data filter`: keep records whose quality passes a threshold; count the rest by reason.

    phi-jax data filter --input=out/scored --min-quality=3 --output=out/kept
    phi-jax data filter --input=out/ann --field=annotation.score --min-quality=3 --output=out/kept
"""

from __future__ import annotations

import argparse

from phi_jax.cli.data.common import add_run_arguments, run


def register(sub) -> None:
    p = sub.add_parser("filter", help="keep records with meta.quality >= --min-quality",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(p)
    p.add_argument("--min-quality", type=float, required=True, help="keep records whose field is >= this")
    p.add_argument("--field", default="quality", help="the meta field to compare (dotted for nested)")
    p.set_defaults(func=_run)


def _run(args) -> int:
    from phi_jax.curation.quality.filter import filter_stage

    return run(args, filter_stage(args.min_quality, args.field))
