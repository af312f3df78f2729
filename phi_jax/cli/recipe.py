"""`phi-jax recipe`: phi-1's data recipe end to end, every stage a `phi-jax` command
(`phi_jax.jobs.phi1_recipe` runs it; this module parses, calls and prints).

    phi-jax recipe --config=configs/recipe_phi1_tiny.py --workdir=runs/recipe [--teacher=URL]
        [--config.<key>=<value> ...] [--report-copy=benchmarks/results/recipe_phi1_tiny.json]

{stages}
and WORKDIR/report.json + report.png: every stage's status, time, command and numbers, the held-out
losses and pass@1. Without --teacher (or teacher.url) a local `phi-jax serve --model=smollm2` is
started for the stages that ask a teacher and stopped at the end.

A finished stage is skipped on a rerun (its WORKDIR/stages/<stage>.json is its marker); an
interrupted one is rerun, and its command resumes what it had done; a skipped one is asked again.
A stage that cannot run says why (`skipped` with the reason: e.g. no exercise passed);
if the teacher scored too few documents to train a classifier, the corpus is scored by the offline
heuristic instead, and the report says so.
"""

from __future__ import annotations

import argparse
import json


def register(subparsers) -> None:
    from phi_jax.cli.train import add_config_arguments
    from phi_jax.jobs.phi1_recipe import stage_table

    p = subparsers.add_parser(
        "recipe", help="the phi-1 data recipe end to end: annotate, classify, filter, synthesize, train, eval",
        # the table of stages is phi1_recipe's docstring's: one copy, so help and library agree
        description=(__doc__ or "").replace("{stages}", stage_table(), 1), formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="phi-jax recipe --config=FILE[:arg] --workdir=DIR [--teacher=URL] [--config.<key>=<value> ...]")
    add_config_arguments(p)
    p.add_argument("--workdir", help="the recipe's directory (every stage's output; resumed if rerun)")
    p.add_argument("--teacher", default=None, help="an OpenAI-compatible base URL (default: the config's "
                                                   "teacher.url, else a local `phi-jax serve --model=smollm2`)")
    p.add_argument("--report-copy", default=None, help="also write the report here (.json, PNG beside it)")
    p.set_defaults(func=run)


def run(args) -> int:
    from phi_jax.errors import InputError
    from phi_jax.jobs import phi1_recipe
    from phi_jax.jobs.config import resolve

    config = resolve(args.config, argv=args.config_overrides)
    phi1_recipe.validate(config)
    if args.show_config:
        print(config)
        return 0
    if not args.workdir:
        raise InputError("phi-jax recipe needs --workdir=DIR (where every stage's output goes)")
    print(f"phi-jax recipe -> {args.workdir} (stages: {', '.join(phi1_recipe.STAGES)})", flush=True)
    result = phi1_recipe.run_validated(config, args.workdir, teacher=args.teacher, report_copy=args.report_copy,
                                       on_line=lambda line: print(line, flush=True))
    report = result.report
    print(json.dumps({"report": result.report_path, "humaneval_pass@1": report["humaneval_pass@1"],
                      "heldout": report["heldout"], "seconds": report["seconds_all_stages"]}))
    return 0
