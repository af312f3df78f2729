"""Flags and the run/summary path shared by the `phi-jax data` stages that map over records."""

from __future__ import annotations

import argparse


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    """--input/--output and how to run: the same spelling for every record stage."""
    p.add_argument("--input", required=True,
                   help="comma-separated: JSONL / ArrayRecord files or globs (records), other files or "
                        "globs (plain text, one record per file), an output dir of an earlier stage, or "
                        "'default' (the embedded stdlib corpus)")
    p.add_argument("--output", required=True, help="output directory (resumed when rerun with the same "
                                                   "arguments)")
    p.add_argument("--runner", default="local", choices=["local", "beam"],
                   help="local: worker processes over shards; beam: an Apache Beam pipeline")
    p.add_argument("--workers", type=int, default=1,
                   help="local worker processes (1 = this process) or DirectRunner workers")
    p.add_argument("--beam-options", default="",
                   help="Beam pipeline options, e.g. '--runner=DataflowRunner --project=P --region=R "
                        "--temp_location=gs://B/tmp' (default: DirectRunner)")
    p.add_argument("--shard-size", type=int, default=1000,
                   help="records per shard, the unit of resume (plain text: files per shard)")
    p.add_argument("--output-format", default="jsonl", choices=["jsonl", "arrayrecord"])
    p.add_argument("--text-field", default="text", help="the text key of JSON records")
    p.add_argument("--max-records", type=int, default=0,
                   help="only the first N input records (0 = all): a sample to try a teacher on")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an output written with other arguments or inputs")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def run(args, stage) -> int:
    """Run `stage` with the run flags, then print the one-screen summary."""
    from phi_jax.curation.runners import run_stage, summary

    manifest = run_stage(stage, args.input, args.output, runner=args.runner, workers=args.workers,
                         shard_size=args.shard_size, output_format=args.output_format,
                         text_field=args.text_field, max_records=args.max_records, overwrite=args.overwrite,
                         beam_options=args.beam_options, progress=args.progress)
    print(summary(manifest, args.output))
    return 0
