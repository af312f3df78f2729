"""`phi-jax eval`: HumanEval (sandboxed), perplexity and multiple choice for any model.

    phi-jax eval humaneval  --model=DIR --output=OUT --num-samples=20 --temperature=0.8
    phi-jax eval perplexity --model=WORKDIR --source=jsonl --paths=data.jsonl --output=OUT
    phi-jax eval choice     --model=DIR --data=arc_easy.jsonl --output=OUT
    phi-jax eval tasks      --model=DIR --tasks=out/tasks --split=heldout --output=OUT

Every run writes OUT/<task>_results.json (metrics, settings, timing); HumanEval also writes
OUT/humaneval_samples.jsonl (one line per sample with its verdict and reason) and
OUT/humaneval_pass_at_k.png (pass@k against k); tasks writes OUT/tasks_examples.jsonl (each
answer, its reference and score).
"""

from __future__ import annotations

import argparse
import json
import logging
import pathlib
import time
from typing import Any

from phi_jax.cli.common import add_model_arguments, add_quantization_arguments, load_model

log = logging.getLogger(__name__)


def register(subparsers) -> None:
    """Add the `eval` subcommand (with humaneval / perplexity / choice) to `subparsers`."""
    p = subparsers.add_parser("eval", help="evaluate a model: humaneval, perplexity, choice, tasks",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="eval_task", required=True, metavar="TASK")

    def common(q: argparse.ArgumentParser) -> None:
        add_model_arguments(q)
        add_quantization_arguments(q)
        q.add_argument("--output", required=True, help="directory for results JSON (and PNG)")
        q.add_argument("--batch-size", type=int, default=8)
        q.set_defaults(func=run)

    h = sub.add_parser("humaneval", help="HumanEval pass@k with sandboxed execution")
    common(h)
    h.add_argument("--num-samples", type=int, default=1, help="samples per problem (n)")
    h.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    h.add_argument("--top-p", type=float, default=0.95)
    h.add_argument("--max-new-tokens", type=int, default=384)
    h.add_argument("--k", default="1,10,100", help="comma-separated k values (k <= n are kept)")
    h.add_argument("--timeout", type=float, default=10.0, help="seconds per sample")
    h.add_argument("--workers", type=int, default=0, help="parallel executions (0 = 2 x cores)")
    h.add_argument("--limit", type=int, default=0, help="only the first N problems (0 = all)")
    h.add_argument("--backend", default="auto", choices=["auto", "bwrap", "fallback"])
    h.add_argument("--seed", type=int, default=0)

    q = sub.add_parser("perplexity", help="token-level loss / perplexity over a data source")
    common(q)
    q.add_argument("--source", default="default",
                   choices=["default", "text", "jsonl", "arrayrecord", "tfds"],
                   help="a phi_jax.data.pipeline source (default: the stdlib corpus)")
    q.add_argument("--paths", default="", help="comma-separated files or globs")
    q.add_argument("--field", default="text", help="text field of JSON records")
    q.add_argument("--tfds-name", default="")
    q.add_argument("--seq-len", type=int, default=0, help="packed row length (0 = max_len)")
    q.add_argument("--max-documents", type=int, default=0)
    q.add_argument("--max-batches", type=int, default=0, help="stop after N batches (0 = all)")

    c = sub.add_parser("choice", help="multiple choice by log-likelihood from JSONL")
    common(c)
    c.add_argument("--data", required=True, help='JSONL of {"context", "choices", "label"}')
    c.add_argument("--limit", type=int, default=0)

    t = sub.add_parser("tasks", help="answer tasks as a chat model; exact match / choice accuracy")
    common(t)
    t.add_argument("--tasks", required=True,
                   help="task JSONL files or globs, or an output of `phi-jax data tasks`")
    t.add_argument("--split", default="heldout", choices=["heldout", "dev", "train", "all"])
    t.add_argument("--dev-fraction", type=float, default=0.1, help="as the data was built with (tasks "
                                                                    "without a 'split' field)")
    t.add_argument("--heldout-fraction", type=float, default=0.1, help="as the data was built with")
    t.add_argument("--scorer", default="auto", help="auto, exact, choice, or module:function")
    t.add_argument("--max-new-tokens", type=int, default=256)
    t.add_argument("--chat-template", default=None,
                   help="a Jinja chat template file (default: the model's own)")
    t.add_argument("--no-system-message", dest="system_message", action="store_false",
                   help="no system turn (default: the generic one instruction data is built with)")
    t.add_argument("--limit", type=int, default=0)


def run(args) -> int:
    """Handler of `phi-jax eval ...`: load, evaluate, write results; returns the exit status."""
    from phi_jax import fileio
    from phi_jax.errors import InputError
    from phi_jax.fileio import atomic_write_json

    if args.batch_size < 1:
        raise InputError(f"--batch-size={args.batch_size}: must be >= 1")
    fileio.check_bucket(args.output, "--output")
    out = fileio.as_path(args.output)
    if out.exists() and not out.is_dir():
        raise InputError(f"--output={out} is a file; give a directory")
    remote = out if fileio.is_remote(out) else None
    if remote is not None:  # a bucket: results are written here first, then uploaded
        import tempfile

        out = pathlib.Path(tempfile.mkdtemp(prefix="phi_jax-eval-"))
    loaded = load_model(args)
    model, variables, tokenizer = loaded
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    task = args.eval_task
    if task == "humaneval":
        metrics = _humaneval(args, model, variables, tokenizer, out)
    elif task == "perplexity":
        metrics = _perplexity(args, model, variables, tokenizer)
    elif task == "choice":
        metrics = _choice(args, model, variables, tokenizer, out)
    elif task == "tasks":
        metrics = _tasks(args, loaded, out)
    else:  # argparse already restricts the choices
        raise InputError(f"unknown eval task {task!r}")
    settings = {k: v for k, v in vars(args).items() if k != "func"}
    result = {"task": task, "model": args.model, "metrics": metrics, "settings": settings,
              "seconds": round(time.time() - start, 2)}
    path = atomic_write_json(out / f"{task}_results.json", result)
    if remote is not None:  # written locally, then uploaded with the results JSON last
        fileio.upload_tree(out, remote, last=(path.name,))
        path = remote / path.name
    print(json.dumps({"task": task, **{k: v for k, v in metrics.items()
                                       if isinstance(v, (int, float, str))}}))
    log.info("wrote %s", path)
    return 0


def _humaneval(args, model, variables, tokenizer, out: pathlib.Path) -> dict[str, Any]:
    from phi_jax import sandbox
    from phi_jax.evals import humaneval

    problems = humaneval.load_problems()
    if args.limit:
        problems = dict(list(problems.items())[:args.limit])
    if args.num_samples > 1 and args.temperature == 0.0:
        log.warning("--num-samples > 1 with greedy decoding gives identical samples; "
                    "set --temperature (e.g. 0.8) for pass@k with k > 1")
    ks = [int(k) for k in args.k.split(",") if k.strip()]
    samples = humaneval.generate_samples(model, variables, tokenizer, problems,
                                         num_samples=args.num_samples,
                                         temperature=args.temperature, top_p=args.top_p,
                                         max_new_tokens=args.max_new_tokens,
                                         batch_size=args.batch_size, seed=args.seed)
    backend = sandbox.default_backend() if args.backend == "auto" else args.backend
    res = humaneval.evaluate(problems, samples, ks=ks, timeout_s=args.timeout,
                             workers=args.workers or None, backend=backend,
                             output_jsonl=str(out / "humaneval_samples.jsonl"))
    curve = humaneval.pass_at_k_curve(res["results"], args.num_samples)
    humaneval.plot_pass_at_k(curve, out / "humaneval_pass_at_k.png",
                             title=f"HumanEval, n={args.num_samples}, T={args.temperature:g}")
    return {**{k: v for k, v in res.items() if k != "results"}, "pass_at_k_curve": curve,
            "sandbox_backend": backend}


def _perplexity(args, model, variables, tokenizer) -> dict[str, Any]:
    from phi_jax.evals import perplexity

    seq_len = args.seq_len or int(model.config.max_len)
    data_cfg = {"source": args.source, "paths": args.paths, "jsonl_field": args.field,
                "tfds_name": args.tfds_name, "max_documents": args.max_documents}
    batches = perplexity.dataset_batches(data_cfg, tokenizer, seq_len=seq_len,
                                         batch_size=args.batch_size)
    res = perplexity.evaluate_batches(model, variables, batches,
                                      max_batches=args.max_batches or None)
    return {**res.as_dict(), "seq_len": seq_len}


def _choice(args, model, variables, tokenizer, out: pathlib.Path) -> dict[str, Any]:
    from phi_jax.evals import choice

    examples = choice.read_jsonl(args.data)
    if args.limit:
        examples = examples[:args.limit]
    res = choice.evaluate(model, variables, tokenizer, examples, batch_size=args.batch_size)
    with open(out / "choice_examples.jsonl", "w") as f:
        for rec in res["examples"]:
            f.write(json.dumps(rec) + "\n")
    return {k: v for k, v in res.items() if k != "examples"}


def _tasks(args, loaded, out: pathlib.Path) -> dict[str, Any]:
    from phi_jax.data.tasks import GENERIC_SYSTEM_MESSAGE, read_tasks, select_split
    from phi_jax.evals import tasks as task_eval

    tasks = select_split(read_tasks(args.tasks), args.split, dev_fraction=args.dev_fraction,
                         heldout_fraction=args.heldout_fraction)
    if args.limit:
        tasks = tasks[:args.limit]
    template = pathlib.Path(args.chat_template).read_text() if args.chat_template else loaded.chat_template
    res = task_eval.evaluate_tasks(loaded.model, loaded.variables, loaded.tokenizer, tasks, template,
                                   scorer=args.scorer,
                                   system_message=GENERIC_SYSTEM_MESSAGE if args.system_message else None,
                                   max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    task_eval.write_examples(res, out / "tasks_examples.jsonl")
    return {k: v for k, v in res.items() if k != "examples"}
