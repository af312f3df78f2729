"""Pod-scale plan for phi-2 on a CPU: per-device memory, FLOPs and projected step time / MFU.

    python -m benchmarks.plan [--quick]

Compiles the real phi-2 train step (configs/phi-2.py: bf16 compute, f32 master weights and Adam
state, sequence 2048, dropout on) ahead of time for 8, 64 and 256 fake devices under several
sharding / remat settings (`phi_jax.training.plan.default_settings`), one subprocess per device count;
nothing is allocated. Reported per setting: memory per device from `memory_analysis()`, FLOPs
and collective bytes per device from `cost_analysis()` and the HLO, and the projection for TPU
v5e, TPU v5p and H100 (`phi_jax.training.plan.project`). The reference in the same run is the analytic
count: model FLOPs (`ModelConfig.flops_per_token`) and the bytes of the sharded train state
(parameters + two Adam moments in float32), against which the compiled numbers are checked.
--quick plans 8 devices only, two settings. Writes benchmarks/results/plan.json and plan.png
(plan_quick.* for --quick).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import sys
import time
from typing import Any

from benchmarks import common
from phi_jax.training import plan

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
CONFIG = pathlib.Path(__file__).resolve().parents[1] / "configs" / "phi-2.py"


def _machine() -> dict[str, Any]:
    import jax
    return {"platform": platform.platform(), "cpu_count": os.cpu_count(),
            "python": sys.version.split()[0], "jax": jax.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "load_average_1min": os.getloadavg()[0]}


def run(quick: bool = False, results_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Runs the plan; returns (and writes) the results dict."""
    from phi_jax.config import ModelConfig

    from phi_jax.training.config_file import load_config

    config = load_config(str(CONFIG))
    model = ModelConfig.from_dict(config.model.to_dict())
    optimizer = config.optimizer.to_dict()
    seq_len = config.train.seq_len
    device_counts = [8] if quick else [8, 64, 256]
    rows, wall = [], {}
    for n in device_counts:
        settings = plan.default_settings(n)
        if quick:
            settings = [s for s in settings if s.name == "fsdp" and s.remat_policy in ("none", "full")]
        start = time.perf_counter()
        rows += plan.plan(model, optimizer, seq_len, n, settings)
        wall[n] = time.perf_counter() - start
        print(f"planned {len(settings)} settings on {n} devices in {wall[n]:.0f} s", flush=True)
    state_bytes = 12 * model.param_count()  # f32 params + Adam mu and nu
    for r in rows:
        shards = r["mesh"]["fsdp"] * r["mesh"]["tensor"]
        r["reference"] = {"state_bytes_per_device": state_bytes / shards,
                          "argument_over_reference": r["argument_bytes"] / (state_bytes / shards),
                          "flops_over_model_flops": r["flops"] / r["model_flops_per_device"]}
        r["projections"] = {name: plan.project(r, acc) for name, acc in plan.ACCELERATORS.items()}
    results = {"machine": _machine(), "quick": quick, "config": str(CONFIG.name),
               "model": {"params": model.param_count(), "seq_len": seq_len,
                         "dtype": model.dtype, "param_dtype": model.param_dtype,
                         "attention_impl": model.attention_impl},
               "accelerators": {k: vars(v) for k, v in plan.ACCELERATORS.items()},
               "fit_fraction": plan.FIT_FRACTION, "plan_wall_s": wall, "rows": rows}
    out = pathlib.Path(results_dir) if results_dir is not None else RESULTS  # benchmarks.run --results-dir
    out.mkdir(parents=True, exist_ok=True)
    stem = "plan_quick" if quick else "plan"
    (out / f"{stem}.json").write_text(json.dumps(results, indent=2) + "\n")
    _plot(results, out / f"{stem}.png")
    print(table(results))
    return results


def table(results: dict[str, Any]) -> str:
    """Markdown table: memory and fit per chip, then projected step time and MFU."""
    head = ("| devices | setting | mesh d,f,t | remat | rows/dev | GiB/dev | state GiB (ref) | "
            "TFLOP/dev | v5e fits | v5e s | v5e MFU | v5p s | v5p MFU | H100 fits | H100 s | H100 MFU |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results["rows"]:
        s, m, p = r["setting"], r["mesh"], r["projections"]
        lines.append(
            f"| {r['devices']} | {s['name']} | {m['data']},{m['fsdp']},{m['tensor']} | "
            f"{s['remat_policy']} | {s['rows_per_device']} | {r['peak_bytes'] / plan.GIB:.1f} | "
            f"{r['reference']['state_bytes_per_device'] / plan.GIB:.1f} | {r['flops'] / 1e12:.1f} | "
            f"{'yes' if p['TPU v5e']['fits'] else 'no'} | {p['TPU v5e']['step_s']:.2f} | "
            f"{p['TPU v5e']['mfu']:.0%} | {p['TPU v5p']['step_s']:.2f} | {p['TPU v5p']['mfu']:.0%} | "
            f"{'yes' if p['H100']['fits'] else 'no'} | {p['H100']['step_s']:.2f} | {p['H100']['mfu']:.0%} |")
    return "\n".join(lines)


def _plot(results: dict[str, Any], path: pathlib.Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = results["rows"]
    labels = [f"{r['devices']}: {r['setting']['name']}\nremat {r['setting']['remat_policy']}" for r in rows]
    fig, (ax_mem, ax_mfu) = plt.subplots(2, 1, figsize=(max(8, 0.75 * len(rows)), 8), sharex=True)
    x = range(len(rows))
    ax_mem.bar(x, [r["peak_bytes"] / plan.GIB for r in rows], color="#3b7dd8", label="compiled peak")
    ax_mem.plot(x, [r["reference"]["state_bytes_per_device"] / plan.GIB for r in rows], "k_",
                markersize=18, label="train state (analytic)")
    for name, color in (("TPU v5e", "#d62728"), ("H100", "#2ca02c")):
        cap = plan.FIT_FRACTION * plan.ACCELERATORS[name].hbm_bytes / plan.GIB
        ax_mem.axhline(cap, color=color, ls="--", lw=1, label=f"{name}: 90% of HBM")
    ax_mem.set_yscale("log")
    ax_mem.set_ylabel("GiB per device")
    ax_mem.legend(fontsize=8)
    width = 0.27
    for k, (name, color) in enumerate((("TPU v5e", "#d62728"), ("TPU v5p", "#9467bd"),
                                       ("H100", "#2ca02c"))):
        ax_mfu.bar([i + (k - 1) * width for i in x], [100 * r["projections"][name]["mfu"] for r in rows],
                   width, color=color, label=name)
    ax_mfu.set_ylabel("projected MFU % (no overlap)")
    ax_mfu.set_xticks(list(x))
    ax_mfu.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
    ax_mfu.legend(fontsize=8)
    m = results["machine"]
    common.save_figure(fig, path, f"phi-2 train step planned on a CPU (AOT compile, {m['cpu_count']} CPUs, "
                       f"{m['date'][:10]}); seq {results['model']['seq_len']}, bf16 compute", fontsize=10, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="8 devices, two settings")
    run(parser.parse_args().quick)


if __name__ == "__main__":
    main()
