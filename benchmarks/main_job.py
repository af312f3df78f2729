"""README command 1, measured: `phi-jax train --config=configs/tiny.py` then `phi-jax sample`.

    python -m benchmarks.main_job     # ~5-10 min on 2 cores; writes benchmarks/results/main_job.json
    python -m benchmarks.main_job --allocator=system    # the same under glibc: main_job_system.json

Runs the two commands exactly as the README gives them (in a fresh temporary workdir, through the
installed CLI of this interpreter), records their wall time, the per-stage lines, the held-out and
smoothed losses and the sample, then reruns the training command to show it resumes (and, being
finished, trains nothing). `python -m benchmarks.readme` quotes the result.

`--allocator` sets `PHI_JAX_ALLOCATOR` for the commands (default `auto`: what a user gets), so the
README can say what the retaining allocator buys command 1 (`system` = glibc's malloc). `--set
KEY=VALUE --name=NAME` adds `--config.KEY=VALUE` to both training commands and writes
main_job_NAME.json, so the README can say what a config choice buys it (e.g.
`--set model.scan_layers=True --name=scanned`: the layers as they were before configs/tiny.py
unrolled them).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

from benchmarks.common import RESULTS, machine_info

ROOT = pathlib.Path(__file__).resolve().parents[1]
PROMPT = "def fibonacci(n):"


def _phi_jax(*args: str, cwd: pathlib.Path, allocator: str = "auto") -> tuple[subprocess.CompletedProcess, float]:
    from phi_jax.allocator import _DONE, ENV

    # the CLI picks (and preloads) its allocator itself, as it does for a user
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", _DONE)}
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "phi_jax.cli", *args], cwd=cwd, text=True,
                            capture_output=True, env={**env, ENV: allocator})
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"phi-jax {' '.join(args)} failed:\n{result.stderr[-3000:]}")
    return result, seconds


def output_file(allocator: str = "auto", name: str = "") -> pathlib.Path:
    if name:
        return RESULTS / f"main_job_{name}.json"
    return RESULTS / ("main_job.json" if allocator == "auto" else f"main_job_{allocator}.json")


def run(allocator: str = "auto", overrides: tuple[str, ...] = (), name: str = "") -> dict:
    from phi_jax.training.summary import smoothed

    train_args = (f"--config={ROOT / 'configs/tiny.py'}", *(f"--config.{o}" for o in overrides))
    with tempfile.TemporaryDirectory() as tmp:
        workdir = pathlib.Path(tmp) / "runs" / "tiny"
        train, train_s = _phi_jax("train", *train_args, f"--workdir={workdir}", cwd=ROOT,
                                  allocator=allocator)
        sample, sample_s = _phi_jax("sample", f"--model={workdir}", f"--prompt={PROMPT}", cwd=ROOT,
                                    allocator=allocator)
        rerun, rerun_s = _phi_jax("train", *train_args, f"--workdir={workdir}", cwd=ROOT,
                                  allocator=allocator)
        metrics = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
        used = json.loads(train.stdout.strip().splitlines()[-1]).get("allocator", "")
    summary = json.loads(train.stdout.strip().splitlines()[-1])
    losses = [m["loss"] for m in metrics if "loss" in m]
    lines = train.stdout.strip().splitlines()
    from phi_jax.jobs.main import STAGES_HEADER

    table = lines[lines.index(STAGES_HEADER) + 1:-1] if STAGES_HEADER in lines else []
    stages = [line.strip() for line in table if line.strip()]
    tokens_per_s = [m["tokens_per_s"] for m in metrics if "tokens_per_s" in m]
    result = {
        "benchmark": "main_job", "machine": machine_info(), "allocator": used,
        "command": f"phi-jax train --config=configs/tiny.py --workdir=runs/tiny && phi-jax sample "
                   f"--model=runs/tiny --prompt=\"{PROMPT}\"",
        "train_seconds": train_s, "sample_seconds": sample_s, "rerun_seconds": rerun_s,
        "rerun_first_line": next((l for l in rerun.stdout.splitlines() if l.strip()), ""),
        "stages": stages, "summary": summary, "smoothed_loss": smoothed(losses),
        "tokens_per_s": sorted(tokens_per_s)[len(tokens_per_s) // 2] if tokens_per_s else 0.0,
        "sample": sample.stdout, "overrides": list(overrides),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    output_file(allocator, name).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--allocator", default="auto", choices=("auto", "system", "tcmalloc", "jemalloc"),
                        help="PHI_JAX_ALLOCATOR for the commands (auto: what a user gets)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for both training commands (needs --name)")
    parser.add_argument("--name", default="", help="write main_job_NAME.json")
    args = parser.parse_args()
    if args.set and not args.name:
        parser.error("--set needs --name (main_job.json is what command 1 does as written)")
    out = run(args.allocator, tuple(args.set), args.name)
    print(f"train {out['train_seconds']:.0f} s, sample {out['sample_seconds']:.0f} s; held-out "
          f"{out['summary']['heldout'][-1]['loss']:.3f}")
