"""Does curation help? Curated vs unfiltered corpus at equal training tokens, several seeds each.

    python -m benchmarks.ablation            # 3 seeds x 2 arms x 150 steps; ~15-25 min on a loaded 2-core VM
    python -m benchmarks.ablation --quick    # 2 seeds x 20 steps, a smoke run (writes ablation_quick.*)

The corpus is the embedded stdlib one. The curated arm is what the main job trains on: the
curation chain of configs/tiny.py (heuristic annotation, score >= 3, near-duplicate removal,
HumanEval decontamination; `phi_jax.jobs.curate.curate`, the same code as `phi-jax train`). The
unfiltered arm is every document. Two evaluation sets are held out of *both* arms before anything
is trained:
  (a) high quality: a random sample of the documents the annotator gave the top score (5);
  (b) uniform: a random sample of all documents (so it holds what curation throws away, too);
and (c) HumanEval: pass@1 of greedy completions executed in the sandbox, over the first problems,
plus the loss of the canonical solutions given their prompts (a graded signal where pass@1 of a
small model is 0). No executed exercises are cheap here (a 135M teacher's synthesized exercises
rarely pass their own tests), so HumanEval stands in for them.

Both arms train the same model for the same steps x batch x length, i.e. the same number of
training tokens (the curated arm, being smaller, sees its documents more often: the epochs are
reported); seed s initialises both arms identically. Per metric: mean ± std over seeds, and the
curated - unfiltered difference with a 95 % t-interval over the paired per-seed differences.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import tempfile
import time
from typing import Any

import numpy as np

from benchmarks import common

NAME = "ablation"
TOP_SCORE = 5
MAX_NEW_TOKENS = 64
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


SEQ_LEN, BATCH = 128, 8


def model_config(config, quick: bool) -> None:
    """A very small Phi (2 layers, 64 wide, 2k vocab): 6 runs of 150 steps fit a loaded 2-core machine."""
    config.model.update(d_model=64, n_layers=2, n_heads=4, mlp_dim=256, vocab_size=2048, max_len=512)
    config.tokenizer.vocab_size = 2048
    config.train.update(batch_size=BATCH, seq_len=SEQ_LEN, log_every=10, progress_bar=False,
                        async_checkpoint=False, eval_batches=0)
    config.optimizer.update(lr=2e-3, warmup_steps=10)
    config.data.update(heldout_fraction=0.0)


def build_sets(work: pathlib.Path, tokenizer, *, uniform_size: int, hq_size: int, seed: int = 1234
               ) -> dict[str, Any]:
    """Curate the corpus (the main job's chain), then the two training sets and the held-out sets."""
    from phi_jax.jobs.curate import TokenCounter, curate
    from phi_jax.data import records
    from phi_jax.training.config_file import load_config

    cc = load_config(str(common.RESULTS.parents[1] / "configs" / "tiny.py")).curation
    start = time.perf_counter()
    curated = curate(cc, "default", work / "curated", count_tokens=TokenCounter(tokenizer), progress=False)
    curate_s = time.perf_counter() - start
    annotated = list(records.iter_output(work / "curated" / "annotate"))
    score = {r["id"]: r["meta"]["annotation"]["score"] for r in annotated}
    rng = np.random.default_rng(seed)
    ids = sorted(score)
    uniform = set(rng.choice(ids, size=uniform_size, replace=False).tolist())
    top = sorted(i for i in ids if score[i] == TOP_SCORE and i not in uniform)
    hq = set(rng.choice(top, size=min(hq_size, len(top)), replace=False).tolist())
    held = uniform | hq
    kept = [r for f in curated.files for r in records.read_records(f) if r["id"] not in held]
    raw = [r for r in annotated if r["id"] not in held]
    by_id = {r["id"]: r for r in annotated}
    sets = {"curated": kept, "unfiltered": raw}
    out: dict[str, Any] = {"curation_lines": [line.__dict__ for line in curated.lines],
                           "curation_seconds": curate_s, "scores": {str(k): sum(v == k for v in score.values())
                                                                     for k in range(6)}}
    for arm, docs in sets.items():
        path = work / f"train_{arm}.jsonl"
        path.write_text("".join(json.dumps({"id": r["id"], "text": r["text"]}) + "\n" for r in docs))
        out[arm] = {"path": str(path), "documents": len(docs),
                    "tokens": sum(len(t) for t in tokenizer.encode_batch([r["text"] for r in docs]))}
    out["heldout"] = {"uniform": [by_id[i]["text"] for i in sorted(uniform)],
                      "high_quality": [by_id[i]["text"] for i in sorted(hq)],
                      "uniform_scores": [score[i] for i in sorted(uniform)]}
    return out


def train_arm(work: pathlib.Path, train_file: str, tokenizer_dir: pathlib.Path, *, seed: int, steps: int,
              quick: bool) -> tuple[pathlib.Path, dict]:
    from phi_jax.training.defaults import base_config
    from phi_jax.training.loop import train

    config = base_config("tiny")
    model_config(config, quick)
    config.train.update(steps=steps, seed=seed, checkpoint_every=steps)
    config.tokenizer.path = str(tokenizer_dir)
    config.data.update(source="jsonl", paths=train_file)
    workdir = work / f"{pathlib.Path(train_file).stem}_s{seed}"
    summary = train(config, workdir)
    return workdir, summary


def evaluate(workdir: pathlib.Path, sets: dict, problems: dict, seq_len: int) -> dict[str, float]:
    from phi_jax.evals import humaneval
    from phi_jax.evals.perplexity import evaluate_texts
    from phi_jax.inference import loader

    loaded = loader.load(workdir)
    model, variables, tok = loaded.model, loaded.variables, loaded.tokenizer
    out = {}
    for name in ("high_quality", "uniform"):
        out[f"{name}_loss"] = evaluate_texts(model, variables, tok, sets["heldout"][name], row_len=seq_len).loss
    # HumanEval: solution loss given the prompt = NLL(prompt + solution) - NLL(prompt), per solution token
    full = evaluate_texts(model, variables, tok, [p["prompt"] + p["canonical_solution"] for p in problems.values()],
                          row_len=seq_len)
    prompts = evaluate_texts(model, variables, tok, [p["prompt"] for p in problems.values()], row_len=seq_len)
    out["humaneval_solution_loss"] = (full.nll - prompts.nll) / (full.num_tokens - prompts.num_tokens)
    samples = humaneval.generate_samples(model, variables, tok, problems, max_new_tokens=MAX_NEW_TOKENS, batch_size=16,
                                         progress=False)
    result = humaneval.evaluate(problems, samples, ks=(1,), workers=2, progress=False)
    out["humaneval_pass@1"] = result["pass@1"]
    return out


def _summary(values: list[float]) -> dict[str, float]:
    a = np.asarray(values, dtype=float)
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0, "n": len(a),
            "samples": a.tolist()}


def _difference(curated: list[float], unfiltered: list[float]) -> dict[str, float]:
    d = np.asarray(curated) - np.asarray(unfiltered)
    n = len(d)
    mean = float(d.mean())
    half = T975.get(n - 1, 1.96) * float(d.std(ddof=1)) / math.sqrt(n) if n > 1 else float("nan")
    return {"mean": mean, "ci95": [mean - half, mean + half], "n": n, "paired_by_seed": True}


METRICS = (("high_quality_loss", "(a) held-out high-quality loss", "lower"),
           ("uniform_loss", "(b) held-out uniform loss", "lower"),
           ("humaneval_solution_loss", "(c) HumanEval solution loss", "lower"),
           ("humaneval_pass@1", "(c) HumanEval pass@1 (executed)", "higher"))


def run(quick: bool = False, results_dir: str | pathlib.Path | None = None, *, seeds: int | None = None,
        steps: int | None = None, problems: int | None = None) -> dict[str, Any]:
    from phi_jax.data import corpus
    from phi_jax.evals import humaneval

    seeds = seeds or (2 if quick else 3)
    steps = steps or (20 if quick else 150)
    n_problems = problems or (8 if quick else 16)
    machine = common.machine_info()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = pathlib.Path(tmp)
        tokenizer = corpus.get_or_train_tokenizer(work, vocab_size=2048)
        sets = build_sets(work, tokenizer, uniform_size=20 if quick else 40, hq_size=20 if quick else 40)
        fits = {k: p for k, p in humaneval.load_problems().items()  # prompt + answer within max_len
                if len(tokenizer.encode(p["prompt"])) + MAX_NEW_TOKENS <= 512}
        chosen = {k: fits[k] for k in list(fits)[:n_problems]}
        runs: dict[str, list[dict]] = {"curated": [], "unfiltered": []}
        for seed in range(seeds):
            for arm in ("curated", "unfiltered"):
                t0 = time.perf_counter()
                workdir, summary = train_arm(work, sets[arm]["path"], work / "tokenizer", seed=seed, steps=steps,
                                             quick=quick)
                train_s = time.perf_counter() - t0
                metrics = evaluate(workdir, sets, chosen, seq_len=SEQ_LEN)
                row = {"seed": seed, "train_seconds": train_s, "eval_seconds": time.perf_counter() - t0 - train_s,
                       "final_train_loss": summary["losses"][-1], **metrics}
                runs[arm].append(row)
                print(f"{arm:<10} seed {seed}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
                      + f" ({train_s:.0f} s train)", flush=True)
    train_tokens = steps * BATCH * SEQ_LEN
    results: dict[str, Any] = {
        "benchmark": NAME, "quick": quick, "machine": machine, "seconds": time.perf_counter() - start,
        "setup": {"steps": steps, "batch_size": BATCH, "seq_len": SEQ_LEN, "train_tokens": train_tokens,
                  "seeds": seeds, "model": "2 layers, d_model 64, 4 heads, mlp 256, vocab 2048 BPE",
                  "humaneval_problems": len(chosen), "humaneval_max_new_tokens": MAX_NEW_TOKENS,
                  "heldout_uniform": len(sets["heldout"]["uniform"]),
                  "heldout_high_quality": len(sets["heldout"]["high_quality"]),
                  "heldout_uniform_scores": sets["heldout"]["uniform_scores"]},
        "corpora": {arm: {"documents": sets[arm]["documents"], "tokens": sets[arm]["tokens"],
                          "epochs": train_tokens / sets[arm]["tokens"]} for arm in ("curated", "unfiltered")},
        "annotation_scores": sets["scores"], "curation": sets["curation_lines"],
        "runs": runs, "metrics": {}}
    for key, label, better in METRICS:
        c = [r[key] for r in runs["curated"]]
        u = [r[key] for r in runs["unfiltered"]]
        results["metrics"][key] = {"label": label, "better": better, "curated": _summary(c),
                                   "unfiltered": _summary(u), "difference": _difference(c, u)}
    results["summary"] = [
        common.summary_row(NAME, m["label"], "loss" if "loss" in key else "pass@1",
                           m["curated"]["mean"], m["unfiltered"]["mean"], "unfiltered corpus",
                           note=f"difference {m['difference']['mean']:+.4f}, 95% CI "
                                f"[{m['difference']['ci95'][0]:+.4f}, {m['difference']['ci95'][1]:+.4f}]")
        for key, m in ((k, results["metrics"][k]) for k, _, _ in METRICS)]
    common.write_results(NAME, results, _plot, quick=quick, results_dir=results_dir)
    return results


def table(results: dict[str, Any]) -> str:
    rows = []
    for key, m in results["metrics"].items():
        d = m["difference"]
        rows.append({"metric": m["label"], "curated": f"{m['curated']['mean']:.4f} ± {m['curated']['std']:.4f}",
                     "unfiltered": f"{m['unfiltered']['mean']:.4f} ± {m['unfiltered']['std']:.4f}",
                     "diff": f"{d['mean']:+.4f} [{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}]"})
    return common.format_table(rows, [("metric", "metric", "s"), ("curated", "curated (mean ± std)", "s"),
                                      ("unfiltered", "unfiltered (mean ± std)", "s"),
                                      ("diff", "curated - unfiltered [95% CI]", "s")])


def _plot(results: dict[str, Any], path: pathlib.Path) -> None:
    import matplotlib.pyplot as plt

    metrics = list(results["metrics"].items())
    fig, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 4))
    for ax, (key, m) in zip(axes, metrics):
        for x, arm, color in ((0, "curated", "tab:green"), (1, "unfiltered", "tab:gray")):
            s = m[arm]
            ax.bar(x, s["mean"], yerr=s["std"], color=color, alpha=0.6, capsize=6)
            ax.scatter([x] * len(s["samples"]), s["samples"], color="black", s=12, zorder=3)
        d = m["difference"]
        ax.set_xticks([0, 1], ["curated", "unfiltered"])
        ax.set_title(f"{m['label']}\ndiff {d['mean']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]",
                     fontsize=9)
        if "loss" in key:
            lo = min(min(m[a]["samples"]) for a in ("curated", "unfiltered"))
            hi = max(max(m[a]["samples"]) for a in ("curated", "unfiltered"))
            ax.set_ylim(lo - 0.5 * (hi - lo + 0.05), hi + 0.5 * (hi - lo + 0.05))
    s = results["setup"]
    common.save_figure(
        fig, path, f"curated vs unfiltered at equal training tokens ({s['train_tokens']:,}; {s['seeds']} seeds, "
                   f"{s['steps']} steps) — {common.subtitle(results['machine'])}", fontsize=10, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ablation", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--problems", type=int, default=None, help="HumanEval problems for pass@1")
    parser.add_argument("--results-dir", default=None)
    args = parser.parse_args(argv)
    results = run(args.quick, args.results_dir, seeds=args.seeds, steps=args.steps, problems=args.problems)
    print(table(results))
    c, u = results["corpora"]["curated"], results["corpora"]["unfiltered"]
    print(f"curated {c['documents']} docs / {c['tokens']:,} tokens ({c['epochs']:.2f} epochs); unfiltered "
          f"{u['documents']} docs / {u['tokens']:,} tokens ({u['epochs']:.2f} epochs); {results['seconds'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
