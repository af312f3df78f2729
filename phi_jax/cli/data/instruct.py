r"""`phi-jax data instruct`: Orca-2 instruction data; a teacher answers each task under its type's
strategy, and the stored example keeps only a generic system message (prompt erasure).

    phi-jax data tasks    --output=out/tasks --count=400 --seed=0
    phi-jax data instruct --tasks=out/tasks --output=out/instruct \
        --teacher=http://127.0.0.1:8000/v1 --teacher-model=teacher --select-strategy=dev
    phi-jax data instruct --tasks=flan.jsonl --strategy-map=map.json --strategies=my_strategies/ ...

Tasks are JSONL {"id", "type", "prompt", "answer"?, "choices"?, "split"?}. Strategies are prompt
files (five built in: step_by_step, recall_then_generate, recall_reason_generate, extract_generate,
direct_answer; --strategies adds or replaces some). --select-strategy=map takes each type's strategy
from --strategy-map (JSON {"default": name, "types": {type: name}}); =dev lets the teacher answer
every type's dev tasks under every strategy and keeps the best-scoring one (--scorer), as Orca-2
did; the choice and its scores go into the manifest. Each example is a record whose
meta.messages is [system: "You are a helpful assistant.", user: task, assistant: answer]; answers
that quote a strategy prompt (13 words), empty, refused or cut ones are dropped and counted.
Dev and held-out tasks are never trained on. Answers are cached before use (rerun to resume).
"""

from __future__ import annotations

import argparse

from phi_jax.cli.data.common import add_run_arguments, add_teacher_arguments, teacher_config


def register(sub) -> None:
    p = sub.add_parser("instruct", help="Orca-2 instruction data: strategy answers, erased system prompt",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", required=True,
                   help="task JSONL files or globs (comma-separated), or an output of `phi-jax data tasks`")
    add_run_arguments(p, inputs=False)
    p.add_argument("--max-records", type=int, default=0,
                   help="only the first N tasks (0 = all): a sample to try a teacher on")
    add_teacher_arguments(p, max_tokens=1024)
    p.add_argument("--strategies", default="",
                   help="strategy files or directories of *.txt (comma-separated), added to the built-in "
                        "five; one with a built-in's name replaces it")
    p.add_argument("--strategy-map", default="default",
                   help="JSON {\"default\": strategy, \"types\": {type: strategy}} (default: the built-in "
                        "map for the task types of `phi-jax data tasks`)")
    p.add_argument("--select-strategy", default="map", choices=["map", "dev"],
                   help="map: the strategy map; dev: the best-scoring strategy on each type's dev tasks")
    p.add_argument("--scorer", default="auto",
                   help="auto (choice accuracy for tasks with choices, else exact match), exact, choice, "
                        "or module:function / file.py:function returning a score in [0, 1]")
    p.add_argument("--dev-fraction", type=float, default=0.1,
                   help="tasks with an answer (and no 'split') that are dev tasks, by a hash of the id")
    p.add_argument("--heldout-fraction", type=float, default=0.1,
                   help="tasks with an answer (and no 'split') held out for evaluation, never trained on")
    p.set_defaults(func=_run)


def _run(args) -> int:
    from phi_jax.curation.core.runners import summary
    from phi_jax.curation.instruct.run import run_instruct, selection_table
    from phi_jax.curation.instruct.strategies import load_strategies, load_strategy_map

    strategies = load_strategies(args.strategies)
    strategy_map = load_strategy_map(args.strategy_map, strategies)
    manifest = run_instruct(
        args.tasks, args.output, teacher=teacher_config(args), strategies=strategies,
        strategy_map=strategy_map, select=args.select_strategy, scorer=args.scorer,
        dev_fraction=args.dev_fraction, heldout_fraction=args.heldout_fraction, cache=args.teacher_cache,
        runner=args.runner, workers=args.workers, shard_size=args.shard_size,
        output_format=args.output_format, max_records=args.max_records, overwrite=args.overwrite,
        beam_options=args.beam_options, progress=args.progress)
    print(summary(manifest, args.output))
    selection = manifest["parameters"].get("strategy_selection")
    if selection:
        print(selection_table(selection))
    return 0
