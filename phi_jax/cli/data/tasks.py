r"""`phi-jax data tasks`: instruction tasks with checkable answers, built from the embedded corpus.

    phi-jax data tasks --output=out/tasks --count=400 --seed=0
    phi-jax data tasks --output=out/mc --count=100 --types=multiple_choice,return_value

Writes OUTPUT/tasks.jsonl, one task a line: {"id", "type", "prompt", "answer"?, "choices"?, "split",
"module"?, "call"?}, and OUTPUT/manifest.json (parameters, the corpus hash, counts by type and
split). Types: docstring_to_name (name a stdlib function from its docstring; exact match),
multiple_choice (the same among four names; choice accuracy), return_value (what a small pure
stdlib function returns for a call, computed by running it in the sandbox; exact match),
topic_summary (summarise a language-reference topic; no reference). The same seed, count and
Python give the same bytes. Splits (train / dev / heldout) come from a hash of each task id.
Feed the output to `phi-jax data instruct --tasks=OUTPUT`.
"""

from __future__ import annotations

import argparse


def register(sub) -> None:
    from phi_jax.curation.instruct.corpus_tasks import TASK_TYPES

    p = sub.add_parser("tasks", help="generate instruction tasks with references from the embedded corpus",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", required=True, help="output directory (tasks.jsonl + manifest.json)")
    p.add_argument("--count", type=int, default=400, help="tasks to generate (spread evenly over --types)")
    p.add_argument("--seed", type=int, default=0, help="which functions, options and inputs are drawn")
    p.add_argument("--types", default=",".join(TASK_TYPES), help="comma-separated task types")
    p.add_argument("--dev-fraction", type=float, default=0.1, help="tasks with an answer in the dev split")
    p.add_argument("--heldout-fraction", type=float, default=0.1,
                   help="tasks with an answer held out for evaluation")
    p.add_argument("--sandbox-backend", default="auto", choices=["auto", "bwrap", "fallback"],
                   help="where return_value functions run")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.set_defaults(func=_run)


def _run(args) -> int:
    import time

    from phi_jax.curation.instruct.corpus_tasks import generate_tasks, write_tasks
    from phi_jax.data.tasks import check_fractions
    from phi_jax.fileio import check_writable_output

    check_writable_output(args.output, overwrite=args.overwrite)
    check_fractions(args.dev_fraction, args.heldout_fraction)
    types = tuple(t.strip() for t in args.types.split(",") if t.strip())
    start = time.perf_counter()
    tasks = generate_tasks(args.count, args.seed, types, dev_fraction=args.dev_fraction,
                           heldout_fraction=args.heldout_fraction, sandbox_backend=args.sandbox_backend)
    parameters = {"count": args.count, "seed": args.seed, "types": list(types),
                  "dev_fraction": args.dev_fraction, "heldout_fraction": args.heldout_fraction}
    manifest = write_tasks(tasks, args.output, parameters, overwrite=args.overwrite,
                           seconds=time.perf_counter() - start)
    counts = manifest["counts"]["stage"]
    print(f"tasks -> {args.output}: {len(tasks)} tasks in {manifest['wall_seconds']:.1f} s")
    for name, n in counts.items():
        print(f"  {name:<24} {n:>6}")
    return 0
