"""Before/after instruction tuning: the base and the tuned models on the same held-out tasks.

    python -m benchmarks.finetune --model=smollm2 --tasks=runs/tasks --data=runs/instruct \
        --config=configs/finetune_smollm2_lora.py --seeds=0,1 --workdir=runs/ft-bench

Fine-tunes the base once per seed with `phi-jax finetune` (a subprocess: the real command, timed),
then answers the held-out split of --tasks (never trained on: `phi-jax data instruct` keeps held-out
tasks out of its data) with the base and every tuned model through `phi_jax.evals.tasks` (greedy,
the generic system message, each model's chat template) and scores them with the same scorers
(exact match / choice accuracy). The noise is stated two ways: the spread over fine-tuning seeds,
and a bootstrap 95 % interval over the held-out tasks (the base is greedy, so its only noise is
which tasks were drawn). Writes benchmarks/results/finetune[_quick].json and .png.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks import common

ROOT = Path(__file__).resolve().parents[1]


def bootstrap_ci(scores: list[float], n: int = 2000, seed: int = 0) -> list[float]:
    """95 % interval of the mean score over tasks resampled with replacement."""
    if not scores:
        return [float("nan"), float("nan")]
    rng = np.random.default_rng(seed)
    x = np.asarray(scores, float)
    means = x[rng.integers(0, len(x), (n, len(x)))].mean(axis=1)
    return [float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))]


def evaluate(model_path: str, tasks, args, adapter: str | None = None) -> dict:
    from phi_jax.evals.tasks import evaluate_tasks
    from phi_jax.inference import loader

    loaded = loader.load(model_path, adapter=adapter)
    start = time.perf_counter()
    result = evaluate_tasks(loaded.model, loaded.variables, loaded.tokenizer, tasks,
                            loaded.chat_template, max_new_tokens=args.max_new_tokens,
                            batch_size=args.batch_size)
    scores = [e["score"] for e in result["examples"]]
    result["bootstrap_ci95"] = bootstrap_ci(scores)
    result["eval_seconds"] = round(time.perf_counter() - start, 1)
    return result


def restrict(result: dict, ids: set[str]) -> dict:
    """An `evaluate` result cut to the tasks `ids` (a cached base run over a superset), rescored."""
    examples = [e for e in result["examples"] if e["id"] in ids]
    if len(examples) != len(ids):
        raise SystemExit(f"the cached base result lacks {len(ids) - len(examples)} of these tasks; remove it")
    by_type: dict[str, list[float]] = {}
    for e in examples:
        by_type.setdefault(e["type"], []).append(e["score"])
    scores = [e["score"] for e in examples]
    return {**result, "examples": examples, "num_scored": len(scores), "score": statistics.fmean(scores),
            "by_type": {t: {"num_scored": len(v), "score": statistics.fmean(v)} for t, v in sorted(by_type.items())},
            "bootstrap_ci95": bootstrap_ci(scores)}


def finetune(seeds: list[int], args) -> list[dict]:
    """One `phi-jax finetune` per seed, run side by side (`--parallel`) or one after another."""
    def start(seed: int):
        workdir = Path(args.workdir) / f"seed{seed}"
        cmd = [sys.executable, "-m", "phi_jax.cli", "finetune", f"--config={args.config}",
               f"--model={args.model}", f"--data={args.data}", f"--workdir={workdir}",
               f"--config.train.seed={seed}", *args.override]
        log = open(Path(args.workdir) / f"seed{seed}.log", "w")
        return workdir, log, time.perf_counter(), subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE,
                                                                   stderr=log, text=True)

    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    summaries, running = [], []
    for seed in seeds:
        running.append((seed, *start(seed)))
        if not args.parallel:
            summaries.append(_finish(*running.pop()))
    return summaries + [_finish(*r) for r in running]


def finished_runs(seeds: list[int], directory: str) -> list[dict]:
    """Runs already made (as `finetune` makes them, by hand): DIR/seedN (workdir), DIR/seedN.out
    (the command's stdout, its summary last) and DIR/seedN.secs (its wall time)."""
    runs = []
    for seed in seeds:
        base = Path(directory) / f"seed{seed}"
        summary = json.loads(Path(f"{base}.out").read_text().strip().splitlines()[-1])
        summary.update(seed=seed, workdir=str(base),
                       wall_seconds=round(float(Path(f"{base}.secs").read_text()), 1))
        runs.append(summary)
    return runs


def _finish(seed, workdir, log, started, process) -> dict:
    out, _ = process.communicate()
    log.close()
    if process.returncode != 0:
        raise SystemExit(f"finetune seed {seed} failed; see {log.name}")
    summary = json.loads(out.strip().splitlines()[-1])
    summary.update(seed=seed, workdir=str(workdir), wall_seconds=round(time.perf_counter() - started, 1))
    return summary


def _plot(results: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    base, tuned = results["base"], results["tuned"]
    types = sorted(base["by_type"]) + ["all"]

    def score(r, t):
        return r["score"] if t == "all" else r["by_type"].get(t, {}).get("score", float("nan"))

    fig, ax = plt.subplots(figsize=(max(5.5, 1.4 * len(types)), 3.8), dpi=120)
    x = np.arange(len(types))
    ax.bar(x - 0.2, [score(base, t) for t in types], 0.4, label=f"base ({results['base_name']})")
    per_seed = [[score(r, t) for t in types] for r in tuned]
    mean = np.nanmean(per_seed, axis=0)
    spread = np.nanstd(per_seed, axis=0) if len(per_seed) > 1 else np.zeros(len(types))
    ax.bar(x + 0.2, mean, 0.4, yerr=spread, capsize=3,
           label=f"LoRA-tuned, mean ± std over {len(tuned)} seeds")
    for k, values in enumerate(per_seed):
        ax.scatter(x + 0.2, values, s=10, color="black", zorder=3, label="one seed" if k == 0 else None)
    counts = [base["by_type"].get(t, {}).get("num_scored", base["num_scored"]) for t in types]
    ax.set_xticks(x, [f"{t}\n({n} tasks)" for t, n in zip(types, counts)], fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("score (exact match / choice accuracy)")
    ax.set_title(f"held-out tasks before / after instruction tuning\n{common.subtitle(results['machine'])}",
                 fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    common.save_figure(fig, path, dpi=100)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", help="the base model (any loader source)")
    parser.add_argument("--tasks", required=True, help="tasks (an output of `phi-jax data tasks`)")
    parser.add_argument("--data", required=True, help="chat data (an output of `phi-jax data instruct`)")
    parser.add_argument("--config", default=str(ROOT / "configs" / "finetune_smollm2_lora.py"))
    parser.add_argument("--workdir", default="runs/ft-bench")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--dev-fraction", type=float, default=0.1)
    parser.add_argument("--heldout-fraction", type=float, default=0.1)
    parser.add_argument("--limit", type=int, default=0, help="only N held-out tasks, evenly spaced")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--base-json", default="", help="cache of the base model's evaluation "
                                                        "(read if present, else written)")
    parser.add_argument("--base-only", action="store_true", help="evaluate the base, then stop")
    parser.add_argument("--parallel", action="store_true", help="fine-tune every seed at once")
    parser.add_argument("--finetuned-from", default="", help="use finished runs DIR/seedN (+ .out, "
                                                             ".secs) instead of fine-tuning")
    parser.add_argument("--merge-from", default="", help="comma-separated result JSONs of runs with "
                                                         "other seeds (same base and tasks): one report")
    parser.add_argument("--quick", action="store_true", help="write finetune_quick.*")
    parser.add_argument("--results-dir", default=None)
    parser.add_argument("override", nargs="*", help="--config.<key>=<value> passed to finetune")
    args, extra = parser.parse_known_args(argv)
    args.override = list(args.override) + extra

    from phi_jax.data.tasks import read_tasks, select_split

    machine = common.machine_info()
    if args.merge_from:  # runs made side by side (one process per seed): one report
        parts = [json.loads(Path(p).read_text()) for p in args.merge_from.split(",")]
        report(args, parts[0]["machine"], parts[0]["base"], [t for p in parts for t in p["tuned"]],
               [r for p in parts for r in p["finetune_runs"]], parts[0]["heldout_tasks"])
        return
    tasks = select_split(read_tasks(args.tasks), "heldout", dev_fraction=args.dev_fraction,
                         heldout_fraction=args.heldout_fraction)
    if args.limit:  # an evenly spaced subset, so every task type keeps its share
        tasks = tasks[::max(1, len(tasks) // args.limit)][:args.limit]
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    print(f"{len(tasks)} held-out tasks; base {args.model}; seeds {seeds}", flush=True)
    if args.base_json and Path(args.base_json).is_file():  # the base's answers from an earlier run
        base = restrict(json.loads(Path(args.base_json).read_text()), {t.id for t in tasks})
    else:
        base = evaluate(args.model, tasks, args)
        if args.base_json:
            Path(args.base_json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.base_json).write_text(json.dumps(base))
    if args.base_only:
        return
    print(f"base: {base['score']:.3f} over {base['num_scored']} tasks ({base['eval_seconds']} s)", flush=True)
    runs, tuned = (finished_runs(seeds, args.finetuned_from) if args.finetuned_from
                   else finetune(seeds, args)), []
    for seed, run in zip(seeds, runs):
        result = evaluate(run["workdir"], tasks, args)
        tuned.append(result)
        print(f"seed {seed}: finetune {run['wall_seconds']} s, loss {run.get('first_loss', 0):.3f} -> "
              f"{run.get('last_loss', 0):.3f}; tuned {result['score']:.3f} ({result['eval_seconds']} s)",
              flush=True)
    report(args, machine, base, tuned, runs, len(tasks))


def report(args, machine: dict, base: dict, tuned: list[dict], runs: list[dict], num_tasks: int) -> None:
    seeds = [r["seed"] for r in runs]
    scores = [r["score"] for r in tuned]
    results = {
        "benchmark": "finetune", "machine": machine, "base_name": str(args.model),
        "settings": {k: v for k, v in vars(args).items()}, "heldout_tasks": num_tasks,
        "base": base, "tuned": tuned, "finetune_runs": runs,
        "summary": {"base": base["score"], "base_ci95": base["bootstrap_ci95"],
                    "tuned_mean": statistics.fmean(scores),
                    "tuned_std": statistics.stdev(scores) if len(scores) > 1 else 0.0,
                    "tuned_per_seed": scores,
                    "delta_per_seed": [s - base["score"] for s in scores],
                    "finetune_seconds": [r["wall_seconds"] for r in runs]},
    }
    path = common.write_results("finetune", results, _plot, quick=args.quick, results_dir=args.results_dir)
    s = results["summary"]
    print(f"base {s['base']:.3f} (95 % CI {s['base_ci95'][0]:.3f}-{s['base_ci95'][1]:.3f}) -> tuned "
          f"{s['tuned_mean']:.3f} ± {s['tuned_std']:.3f} over {len(seeds)} seeds {s['tuned_per_seed']}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
