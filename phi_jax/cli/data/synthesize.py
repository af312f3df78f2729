r"""`phi-jax data synthesize`: a teacher writes textbook sections or exercises from a steered plan.

    phi-jax data synthesize --kind=textbook --count=1000 --output=out/tb \
        --teacher=http://127.0.0.1:8000/v1 --teacher-model=SmolLM2-135M-Instruct
    phi-jax data synthesize --kind=exercises --count=1000 --output=out/ex --teacher=URL --teacher-model=M \
        --audiences=beginner:2,intermediate:1 --topics=my_topics.yaml --embedder=model.gguf

The plan crosses topics (--topics: 'default' = stdlib modules, their public functions and the
language reference's headings; or a JSONL / YAML / text file) with audiences and styles from the
steering file, scheduled to the target mix (--topic-mix, --audiences, --styles as NAME:WEIGHT,...)
and a pure function of --seed, --kind, the mix and --count: a rerun reproduces the same prompts,
and a killed run, rerun with the same command, resumes (the teacher's answers are cached in
OUTPUT/generated/teacher_cache.sqlite before they are used). Prompt templates are files:
--template (placeholders {topic}, {audience}, {style}) and --steering (YAML) override the
built-in ones in phi_jax/curation/prompts/.

Exercises are run in the sandbox (no network, --exec-timeout, --exec-memory-mb): only those whose
solution passes its own check are kept; the rest are counted by reason. Output: OUTPUT/generated
(every usable answer), OUTPUT/data (after the quality gates; train on this), OUTPUT/train.jsonl
(exercises: prompt/completion pairs, loss on the solution), OUTPUT/report.json + report.png.
"""

from __future__ import annotations

import argparse

from phi_jax.cli.data.common import add_run_arguments, add_teacher_arguments, teacher_config

_MAX_TOKENS = {"textbook": 1024, "exercises": 768}


def register(sub) -> None:
    p = sub.add_parser("synthesize", help="generate textbook sections or executed exercises with a teacher",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kind", required=True, choices=["textbook", "exercises"])
    p.add_argument("--count", type=int, default=100, help="prompts in the plan")
    p.add_argument("--seed", type=int, default=0,
                   help="the plan's seed (also the teacher's sampling seed, unless --teacher-seed)")
    p.add_argument("--topics", default="default", help="'default' (the embedded corpus) or a .jsonl / .yaml / "
                                                       ".txt file of topics")
    p.add_argument("--topic-mix", default=None, help="topic kinds as KIND:WEIGHT,... (default: module:1,"
                                                     "function:1,language:1; a file: every topic equally)")
    p.add_argument("--audiences", default=None,
                   help="NAME:WEIGHT,... from the steering file (default: all, equal)")
    p.add_argument("--styles", default=None, help="NAME:WEIGHT,... from the steering file (default: all, equal)")
    p.add_argument("--template", default=None, help="prompt template file with {topic}, {audience}, {style}")
    p.add_argument("--steering", default=None, help="YAML of audience and style instructions (default: built-in)")
    add_run_arguments(p, inputs=False)
    p.set_defaults(shard_size=50)
    add_teacher_arguments(p, seed_flag="--teacher-seed", temperature=0.7, max_tokens=None)
    p.add_argument("--exec-timeout", type=float, default=10.0, help="seconds per exercise run")
    p.add_argument("--exec-memory-mb", type=int, default=512, help="address space per exercise process")
    p.add_argument("--exec-workers", type=int, default=2, help="exercises run at once (per worker)")
    p.add_argument("--opening-words", type=int, default=10, help="words compared for repeated openings")
    p.add_argument("--min-distinct-2", type=float, default=0.3,
                   help="flag records whose distinct word-bigram share is below this")
    p.add_argument("--dedup-threshold", type=float, default=0.8,
                   help="drop records whose MinHash Jaccard with an earlier one is at least this")
    p.add_argument("--against", default="humaneval",
                   help="benchmarks to decontaminate against (as `data decontaminate --against`); 'none' to skip")
    p.add_argument("--drop-flagged", default="", help="comma-separated flags to drop rather than keep "
                                                      "(repeated_opening, low_distinct_2, truncated)")
    p.add_argument("--embedder", default=None, metavar="MODEL",
                   help="model for the report's embedding spread (HF dir, workdir or .gguf); none: skipped")
    p.add_argument("--embed-max-tokens", type=int, default=256)
    p.add_argument("--embed-batch-size", type=int, default=16)
    p.add_argument("--add-bos", action="store_true", help="embedder: start each text with BOS (Llama-family)")
    p.add_argument("--report-copy", default=None, help="also write the report here (.json, PNG beside it)")
    p.set_defaults(func=_run)


def _run(args) -> int:
    from phi_jax.curation.synthesis import output_gates
    from phi_jax.curation.synthesis.exercises import ExecutionLimits
    from phi_jax.curation.synthesis.plan import load_steering, load_template, load_topics, make_plan
    from phi_jax.curation.synthesis.run import run_synthesis, summary

    plan = make_plan(args.kind, count=args.count, seed=args.seed, topics=load_topics(args.topics),
                     topic_source=args.topics, steering=load_steering(args.kind, args.steering),
                     template=load_template(args.kind, args.template), topic_mix=args.topic_mix,
                     audiences=args.audiences, styles=args.styles)
    teacher = teacher_config(args, max_tokens=_MAX_TOKENS[args.kind], seed=args.seed)
    against = tuple(a.strip() for a in args.against.split(",") if a.strip() and args.against != "none")
    gate_config = output_gates.GateConfig(opening_words=args.opening_words, min_distinct_2=args.min_distinct_2,
                                          drop_flagged=tuple(f for f in args.drop_flagged.split(",") if f),
                                          near_threshold=args.dedup_threshold, against=against)
    embedder = None
    if args.embedder:
        from phi_jax.inference import loader
        from phi_jax.inference.embed import Embedder

        loaded = loader.load(args.embedder)
        loader.require_tokenizer(loaded, args.embedder)
        embedder = Embedder(loaded.model, loaded.variables, loaded.tokenizer, max_tokens=args.embed_max_tokens,
                            batch_size=args.embed_batch_size, add_bos=args.add_bos)
    result = run_synthesis(
        plan, teacher, args.output, cache=args.teacher_cache,
        limits=ExecutionLimits(timeout_s=args.exec_timeout, memory_bytes=args.exec_memory_mb << 20),
        exec_workers=args.exec_workers, gate_config=gate_config, embedder=embedder, embedder_name=args.embedder,
        runner=args.runner, workers=args.workers, shard_size=args.shard_size, output_format=args.output_format,
        overwrite=args.overwrite, beam_options=args.beam_options, progress=args.progress,
        report_copy=args.report_copy)
    print(summary(result))
    return 0
