"""Run every benchmark, then print one table of phi_jax against the reference measured beside it.

    python -m benchmarks.run [--quick] [--only train_step decode ...] [--skip serve ...]
    python -m benchmarks.run --allocator=system --results-dir=benchmarks/results/glibc ...

Both sides run under one allocator: by default the retaining one the `phi-jax` CLI uses
(tcmalloc when installed; see phi_jax/allocator.py), recorded in each result's `machine`.

Each benchmark runs in its own process (`python -m benchmarks.run --child NAME`), one after
another, so one benchmark's XLA arenas and models are gone before the next starts and a full run
fits the memory of the 24 GB machine it is measured on (`--in-process` runs them all in this
process, as before; a module that exists only in memory, not as a file, always does).

Each benchmark module in `BENCHMARKS` has `run(quick) -> dict` and writes its own
`benchmarks/results/<name>.json` + `.png` (`<name>_quick.*` for most in --quick mode). A module
that is not there yet is skipped with a note; one that fails is reported and the others still run
(the exit status is then 1). The runner adds what no single benchmark can say alone — the data
pipeline's tokens/s against the train step's consumption — and writes `run.json` (`run_quick.json`)
with every module's status, wall time and headline rows, and `run.png`, the ratios at a glance.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import os
import pathlib
import sys
import time
import traceback
from typing import Any

from benchmarks import common

# Order matters: the roofline first (it is what the others are read against), the train step
# before the data pipeline (whose throughput is compared with the step's consumption).
BENCHMARKS = ("roofline", "train_step", "decode", "data", "kernels", "serve", "plan", "dedup", "memory")
TARGETS = {"train_step": 2.0, "decode": 3.0}  # phi_jax / reference, from the issue


def _load(name: str):
    """The module, or None if `benchmarks/<name>.py` does not exist (yet)."""
    try:
        return importlib.import_module(f"benchmarks.{name}")
    except ModuleNotFoundError as e:
        if e.name == f"benchmarks.{name}":
            return None
        raise


def _call(module, quick: bool, results_dir: str | os.PathLike | None) -> dict[str, Any]:
    kwargs = {}
    if results_dir is not None:
        if "results_dir" not in inspect.signature(module.run).parameters:
            raise TypeError(f"benchmarks.{module.__name__.split('.')[-1]}.run has no results_dir "
                            "argument, so it cannot write elsewhere; run it without --results-dir")
        kwargs["results_dir"] = results_dir
    return module.run(quick, **kwargs)


def _call_isolated(name: str, quick: bool, results_dir: str | os.PathLike | None,
                   entry: dict[str, Any] | None = None) -> dict[str, Any]:
    """`_call` in a child process (same interpreter, environment and allocator); its result dict
    comes back as JSON. Why: the benchmarks' peaks add up in one process (three train-step models
    and their arenas were OOM-killed at 18 GB), and a process's freed memory is not always returned.
    `entry` gets the child's peak RSS (`wait4`'s ru_maxrss: the child or its largest descendant,
    e.g. one of benchmarks.memory's per-case processes), so a full run shows what each one held."""
    import json
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = pathlib.Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "benchmarks.run", "--child", name, "--child-out", str(out)]
        cmd += ["--quick"] if quick else []
        cmd += ["--results-dir", str(results_dir)] if results_dir is not None else []
        proc = subprocess.Popen(cmd, cwd=pathlib.Path(__file__).resolve().parents[1],
                                stderr=subprocess.PIPE, text=True)
        stderr = proc.stderr.read()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        if entry is not None:
            entry["peak_rss_gb"] = round(usage.ru_maxrss / 1024 ** 2, 3)  # ru_maxrss is in KiB
        if proc.returncode != 0:
            tail = [line for line in stderr.strip().splitlines() if line.strip()][-1:] or [""]
            raise RuntimeError(f"benchmarks.{name} exited with {proc.returncode}: {tail[0]}")
        return json.loads(out.read_text())


def _child(name: str, quick: bool, results_dir: str | None, out: str) -> int:
    import json

    result = _call(_load(name), quick, results_dir)
    pathlib.Path(out).write_text(json.dumps(result, default=lambda x: _jsonable(x)))
    return 0


def _jsonable(x):
    try:
        return common._json_default(x)
    except TypeError:
        return str(x)


def data_vs_train(data: dict[str, Any], train: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows: Grain tokenize+pack tokens/s over phi_jax's train-step consumption (>1 = keeps up)."""
    pipeline = data.get("pipeline") or []
    if not pipeline:
        return []
    best = max(pipeline, key=lambda r: r["tokens_per_s"])
    rows = []
    for case in train.get("cases", []):
        consumed = case["tokens_per_s"]["phi_jax"]["median"]
        rows.append(common.summary_row(
            "data", f"pipeline ({best['num_workers']} workers) vs {case['case']} train step",
            "tokens/s", best["tokens_per_s"], consumed, "train step consumption",
            note="ratio > 1: the pipeline feeds the step with room to spare"))
    return rows


def run_all(quick: bool = False, only: list[str] | None = None, skip: list[str] | None = None,
            results_dir: str | os.PathLike | None = None, in_process: bool = False) -> dict[str, Any]:
    names = [n for n in (only or BENCHMARKS) if n not in (skip or [])]
    unknown = sorted(set(names) - set(BENCHMARKS))
    if unknown:
        raise ValueError(f"unknown benchmark(s) {unknown}; choose from {list(BENCHMARKS)}")
    machine = common.machine_info()
    entries: dict[str, dict[str, Any]] = {}
    outputs: dict[str, dict[str, Any]] = {}
    for name in names:
        module = _load(name)
        if module is None:
            entries[name] = {"status": "skipped", "note": f"benchmarks/{name}.py does not exist yet"}
            print(f"== {name}: skipped (benchmarks/{name}.py does not exist yet)", flush=True)
            continue
        print(f"== {name} ({'quick' if quick else 'full'}) — load {os.getloadavg()[0]:.1f}", flush=True)
        start = time.perf_counter()
        entries[name] = {}
        try:
            if in_process or not getattr(module, "__file__", None):
                outputs[name] = _call(module, quick, results_dir)
            else:
                outputs[name] = _call_isolated(name, quick, results_dir, entries[name])
            entries[name]["status"] = "ok"
        except Exception as e:  # noqa: BLE001 - one broken benchmark must not hide the others
            entries[name].update(status="error", error=f"{type(e).__name__}: {e}",
                                 traceback=traceback.format_exc(limit=6))
            print(f"== {name}: FAILED: {type(e).__name__}: {e}", flush=True)
        entries[name]["seconds"] = time.perf_counter() - start
        peak = entries[name].get("peak_rss_gb")
        print(f"== {name}: {entries[name]['status']} in {entries[name]['seconds']:.0f} s"
              + (f", peak RSS {peak:.2f} GB" if peak is not None else "")
              + f" — load {os.getloadavg()[0]:.1f}", flush=True)  # a run cut short keeps these

    summary: list[dict[str, Any]] = []
    for name in names:
        summary.extend((outputs.get(name) or {}).get("summary", []))
    if "data" in outputs and "train_step" in outputs:
        summary.extend(data_vs_train(outputs["data"], outputs["train_step"]))
    results = {"benchmark": "run", "quick": quick, "machine": machine, "benchmarks": entries,
               "summary": summary, "targets": TARGETS}
    path = common.write_results("run", results, _plot, quick=quick, results_dir=results_dir)
    print()
    print(common.format_table(summary, common.SUMMARY_COLUMNS))
    for name, entry in entries.items():
        extra = entry.get("note") or entry.get("error") or ""
        peak = f"{entry['peak_rss_gb']:6.2f} GB" if "peak_rss_gb" in entry else " " * 9
        print(f"{name:<11} {entry['status']:<8} {entry.get('seconds', 0):7.1f} s {peak}  {extra}")
    m = results["machine"]
    print(f"{m['cpu']}, {m['cpu_count']} cores, load average {m['load_average_start'][0]:.1f} at start, "
          f"{m['load_average_end'][0]:.1f} at end; results in {path.parent}")
    results["json"] = str(path)
    return results


def _plot(results: dict[str, Any], path: pathlib.Path) -> None:
    import matplotlib.pyplot as plt
    rows = [r for r in results["summary"] if r.get("ratio")]
    fig, ax = plt.subplots(figsize=(8, 0.45 * max(len(rows), 2) + 1.5))
    if rows:
        labels = [f"{r['benchmark']}: {r['case']}" for r in rows]
        ratios = [r["ratio"] for r in rows]
        colors = ["#3b7dd8" if x >= TARGETS.get(r["benchmark"], 1.0) else "#d8903b"
                  for x, r in zip(ratios, rows)]
        bars = ax.barh(labels, ratios, color=colors)
        ax.bar_label(bars, fmt="%.2fx", padding=2, fontsize=8)
        ax.axvline(1.0, color="k", lw=0.8)
        for name, target in TARGETS.items():
            ax.axvline(target, color="#888", ls="--", lw=0.8)
            ax.text(target, 0.01, f" {name}\n target {target:g}x", fontsize=7, color="#555",
                    transform=ax.get_xaxis_transform(), va="bottom")
        ax.invert_yaxis()
        ax.tick_params(axis="y", labelsize=8)
    ax.set_xlabel("phi_jax / reference (higher is better; median over repeats)")
    ax.set_title(f"All benchmarks — {common.subtitle(results['machine'])}", fontsize=9)
    common.save_figure(fig, path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smallest cases, fewest repeats")
    parser.add_argument("--only", nargs="*", help=f"run just these of {list(BENCHMARKS)}")
    parser.add_argument("--skip", nargs="*", help="run all but these")
    parser.add_argument("--results-dir", help="write here instead of benchmarks/results")
    parser.add_argument("--allocator", choices=("auto", "tcmalloc", "jemalloc", "system"),
                        default="auto", help="run both sides under this allocator (re-executes the "
                        "runner with LD_PRELOAD, as the phi-jax CLI does; `system` = glibc's)")
    parser.add_argument("--in-process", action="store_true",
                        help="run every benchmark in this process (default: one process each)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return _child(args.child, args.quick, args.results_dir, args.child_out)
    if argv is None:  # as a program: pick the allocator before jax and torch start
        from phi_jax import allocator
        if args.allocator != "auto":
            os.environ[allocator.ENV] = args.allocator
        allocator.reexec_with_retaining_allocator(sys.argv[1:], module="benchmarks.run")
    results = run_all(args.quick, args.only, args.skip, args.results_dir, in_process=args.in_process)
    return 1 if any(e["status"] == "error" for e in results["benchmarks"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
