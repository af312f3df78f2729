"""Flags and the run/summary path shared by the `phi-jax data` stages that map over records."""

from __future__ import annotations

import argparse


def add_run_arguments(p: argparse.ArgumentParser, *, inputs: bool = True) -> None:
    """--input/--output and how to run: the same spelling for every record stage.

    `inputs=False` for stages that generate their records (synthesize): no --input/--text-field.
    """
    if inputs:
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
    if inputs:
        p.add_argument("--text-field", default="text", help="the text key of JSON records")
        p.add_argument("--max-records", type=int, default=0,
                       help="only the first N input records (0 = all): a sample to try a teacher on")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an output written with other arguments or inputs")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def add_teacher_arguments(p: argparse.ArgumentParser, *, seed_flag: str = "--seed", temperature: float = 0.0,
                          max_tokens: int | None = 512, heuristic: bool = False) -> None:
    """The teacher endpoint and how to ask it: the same flags for every stage that asks one."""
    p.add_argument("--teacher", required=True,
                   help="an OpenAI-compatible base URL (http://host:port/v1)"
                        + (", or 'heuristic'" if heuristic else ""))
    p.add_argument("--teacher-model", default="", help="the model name the endpoint serves")
    p.add_argument("--teacher-cache", default=None, help="answer cache (default: in the output directory)")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight (per worker)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per request before retrying it")
    p.add_argument("--max-retries", type=int, default=6, help="retries per request")
    p.add_argument("--backoff", type=float, default=1.0, help="seconds before the first retry (doubles)")
    p.add_argument("--max-tokens", type=int, default=max_tokens, help="answer length limit"
                   + ("" if max_tokens else " (default: per kind)"))
    p.add_argument("--temperature", type=float, default=temperature)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument(seed_flag, dest="teacher_seed", type=int, default=None,
                   help="sampling seed sent to the teacher")


def teacher_config(args, *, max_tokens: int | None = None, seed: int | None = None):
    """A `TeacherConfig` from the flags of `add_teacher_arguments`."""
    from phi_jax.curation.teacher.client import TeacherConfig

    return TeacherConfig(url=args.teacher, model=args.teacher_model, temperature=args.temperature,
                         top_p=args.top_p, max_tokens=args.max_tokens or max_tokens,
                         seed=args.teacher_seed if args.teacher_seed is not None else seed,
                         concurrency=args.concurrency, timeout_s=args.timeout, max_retries=args.max_retries,
                         backoff_s=args.backoff)


def run(args, stage) -> int:
    """Run `stage` with the run flags, then print the one-screen summary."""
    from phi_jax.curation.core.runners import run_stage, summary

    manifest = run_stage(stage, args.input, args.output, runner=args.runner, workers=args.workers,
                         shard_size=args.shard_size, output_format=args.output_format,
                         text_field=args.text_field, max_records=args.max_records, overwrite=args.overwrite,
                         beam_options=args.beam_options, progress=args.progress)
    print(summary(manifest, args.output))
    return 0
