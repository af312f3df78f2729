r"""`phi-jax data`: the data recipe, one subcommand per stage.

    phi-jax data annotate         --input=default --output=out/ann --teacher=http://127.0.0.1:8000/v1 \
                                  --teacher-model=smollm2 --rubric=code
    phi-jax data train-classifier --annotations=out/ann --embedder=MODEL --head=ridge --output=out/clf
    phi-jax data score            --input=default --classifier=out/clf --output=out/scored
    phi-jax data filter           --input=out/scored --min-quality=3 --output=out/kept
    phi-jax data dedup            --input=out/kept --threshold=0.8 --output=out/dedup
    phi-jax data decontaminate    --input=out/dedup --against=humaneval,evals.jsonl --output=out/clean
    phi-jax data synthesize       --kind=exercises --count=1000 --output=out/ex \
                                  --teacher=http://127.0.0.1:8000/v1 --teacher-model=smollm2
    phi-jax data tasks            --output=out/tasks --count=400 --seed=0
    phi-jax data instruct         --tasks=out/tasks --output=out/instruct --teacher=URL --teacher-model=NAME

Stages over records (annotate, score, filter, dedup, decontaminate) share the run flags (--input,
--output, --runner=local|beam, --workers, --shard-size, --overwrite, ...), synthesize all of them
but --input (it shards its plan of prompts instead), instruct all of them with --tasks for --input:
a rerun of the same command resumes, finishing only the shards that were not done. Every output
directory has a manifest.json.
Adding a stage is one module here with `register(subparsers)` plus its name in STAGES.
"""

from __future__ import annotations

import argparse
import importlib

# Modules of phi_jax.cli.data, in the order `phi-jax data --help` lists them.
STAGES = ("annotate", "train_classifier", "score", "filter", "dedup", "decontaminate", "synthesize", "tasks",
          "instruct")


def register(subparsers) -> None:
    p = subparsers.add_parser("data", help="curate data: annotate, train a quality classifier, score, filter, "
                                           "dedup, decontaminate, synthesize, tasks, instruct",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="data_stage", required=True, metavar="STAGE")
    for name in STAGES:
        importlib.import_module(f"phi_jax.cli.data.{name}").register(sub)
