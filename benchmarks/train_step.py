"""Train step tokens/s: phi_jax's jitted step vs transformers (PhiForCausalLM, LlamaForCausalLM for
the SmolLM2 shape) + torch.optim.AdamW.

    python -m benchmarks.train_step [--quick]

Both sides do the same work, and the run checks it: the same config, batch and sequence length, the
same initial weights (phi_jax init -> `phi_jax.save_pretrained` -> `AutoModelForCausalLM.from_pretrained`),
the same next-token cross-entropy over every position, the same AdamW (lr, betas, eps, decoupled
weight decay on matrices only, global-norm clipping at 1.0). The losses of the first step (initial
weights) and of the second (after one AdamW update) must agree, or the case is flagged.

The reference runs in its own process (torch and XLA in one process slowed each other down by up to
30 %), driven step by step so that repeats alternate between the two. It is measured at its best, so
the ratio is not against a straw man: torch eager with
one thread per usable core (what XLA:CPU uses) and with 1 thread (OpenMP's barriers collapse when
other processes share the cores), and `torch.compile` when it works here. The ratio divides phi_jax
by the fastest of them. `--quick` uses smaller batches, skips `torch.compile` (minutes of inductor
compilation here) and keeps only the thread count a one-step probe finds faster. Repeats of all variants are interleaved, so a burst of load from other processes
hits all of them alike. phi_jax's model FLOP/s (`ModelConfig.flops_per_token`, causal attention
counted honestly) is also given as a fraction of the `jnp.dot` peak measured in the same run.

Writes benchmarks/results/train_step.json and train_step.png (train_step_quick.* with --quick).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import tempfile
from typing import Any

import numpy as np

from benchmarks import common, roofline

NAME = "train_step"
# (preset, batch, seq_len): the tiny main job's shape, and a ~100M model at the same shape.
CASES = {"tiny": ("tiny", 8, 256), "phi-100m": ("phi-100m", 8, 256),
         "smollm2-135m": ("smollm2-135m", 8, 256)}
QUICK_CASES = {"tiny": ("tiny", 8, 128), "phi-100m": ("phi-100m", 4, 128),
               "smollm2-135m": ("smollm2-135m", 4, 128)}
SMOKE_CASES = {"test": ("test", 2, 16)}  # never run by default: the unit test's smallest case
OPTIMIZER = {"lr": 1e-3, "b1": 0.9, "b2": 0.98, "eps": 1e-7, "weight_decay": 0.1, "grad_clip": 1.0}
# phi_jax is timed with its layers scanned (the default: one compiled layer, any depth) and
# unrolled (`scan_layers=False`: no per-layer slicing of stacked weights and activations, which on
# XLA:CPU costs ~10-15 % of the tiny step); `tokens_per_s["phi_jax"]` is the faster of the two.
LAYER_LAYOUTS = ("scanned", "unrolled")
LOSS_RTOL = 1e-4  # float32 on both sides; a real difference in the work shows up far above this


# ------------------------------------------------------------------------------------ phi_jax
def _jax_side(config, batch_tokens: np.ndarray, unrolled: bool = False):
    """(step() -> loss, initial variables): the library's own jitted, donated train step.

    `unrolled`: the same initial weights with the layers unstacked (`scan_layers=False`, one
    program per layer instead of a scan); the returned variables are the scanned ones either way.
    """
    import jax
    import ml_collections

    from phi_jax.model import Phi, init_params, unstack_layers
    from phi_jax.training.optimizer import make_optimizer
    from phi_jax.training.step import init_state, make_train_step

    model = Phi(config)
    # Jitted: run eagerly, initialisation compiles one tiny program per op (minutes on a busy CPU).
    variables = jax.jit(init_params, static_argnums=0)(config, jax.random.key(0))
    returned = variables
    if unrolled:
        model, variables = unstack_layers(model, variables)
    opt_cfg = ml_collections.ConfigDict({**OPTIMIZER, "schedule": "constant", "warmup_steps": 0,
                                         "min_lr_ratio": 1.0})
    optimizer = make_optimizer(opt_cfg, total_steps=1000)
    state = jax.jit(lambda p: init_state(p, optimizer, seed=0))(variables["params"])
    b, l1 = batch_tokens.shape
    ones = np.ones((b, l1 - 1), np.int32)
    batch = {"tokens": batch_tokens[:, :-1], "targets": batch_tokens[:, 1:],
             "positions": np.broadcast_to(np.arange(l1 - 1, dtype=np.int32), (b, l1 - 1)).copy(),
             "segment_ids": ones, "loss_mask": ones}
    batch = jax.device_put(batch)
    step_fn = jax.jit(make_train_step(model, optimizer), donate_argnums=(0,))
    holder = {"state": state}

    def step() -> float:
        holder["state"], metrics = step_fn(holder["state"], batch)
        jax.block_until_ready(holder["state"])
        return float(metrics["loss"])

    return step, returned


# -------------------------------------------------------------------------------- transformers
def _torch_side(hf_dir: pathlib.Path, batch_tokens: np.ndarray):
    """(model, step(model) -> loss): transformers' class for the config (PhiForCausalLM,
    LlamaForCausalLM, ...) + torch.optim.AdamW, the textbook loop."""
    import torch
    import torch.nn.functional as F
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    model.train()
    # decay on matrices and embeddings, as phi_jax's optimizer: not on norms (LayerNorm or RMSNorm)
    decay = [p for n, p in model.named_parameters() if n.endswith(".weight") and "norm" not in n]
    no_decay = [p for n, p in model.named_parameters()
                if not (n.endswith(".weight") and "norm" not in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": OPTIMIZER["weight_decay"]},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=OPTIMIZER["lr"], betas=(OPTIMIZER["b1"], OPTIMIZER["b2"]), eps=OPTIMIZER["eps"])
    tokens = torch.as_tensor(batch_tokens, dtype=torch.long)
    inputs, targets = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    params = list(model.parameters())

    def step(module) -> float:
        optimizer.zero_grad(set_to_none=True)
        logits = module(input_ids=inputs, use_cache=False).logits
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, OPTIMIZER["grad_clip"])
        optimizer.step()
        return float(loss.detach())

    return model, step


class _TorchTrainReference:
    """The reference side as `common.ReferenceWorker` drives it, in its own process."""

    def __init__(self, hf_dir: str, batch_tokens: np.ndarray):
        self.model, self._step = _torch_side(pathlib.Path(hf_dir), batch_tokens)
        self.modules = {"eager": self.model}

    def step(self, variant: str) -> float:
        return self._step(self.modules[variant])

    def compile(self, threads: int):
        """First-step seconds of torch.compile, or the reason it failed (a str)."""
        compiled, first = _try_compile(self.model, self._step, threads)
        if compiled is not None:
            self.modules["compiled"] = compiled
        return first


def _try_compile(model, step, threads: int):
    """(compiled module, first-step seconds) or (None, reason): inductor needs a C++ toolchain."""
    import torch
    torch.set_num_threads(threads)
    try:
        compiled = torch.compile(model)
        seconds, _ = common.timed(lambda: step(compiled))
        return compiled, seconds
    except Exception as e:  # noqa: BLE001 - any failure just means the variant is not measured
        return None, f"torch.compile failed here: {type(e).__name__}: {str(e).splitlines()[0][:200]}"


# ------------------------------------------------------------------------------------- one case
def measure_case(name: str, preset_name: str, batch: int, seq_len: int, repeats: int, *,
                 compile_torch: bool, peak_flop_per_s: float | None, quick: bool = False
                 ) -> dict[str, Any]:
    """Warm up, check both sides compute the same losses, then time interleaved repeats."""
    import phi_jax
    from phi_jax.config import preset

    config = preset(preset_name)
    rng = np.random.default_rng(0)
    batch_tokens = rng.integers(0, config.vocab_size, (batch, seq_len + 1), dtype=np.int32)
    tokens_per_step = batch * seq_len
    threads = common.usable_cores()

    jax_steps = {}
    for layout in LAYER_LAYOUTS:
        jax_steps[layout], variables = _jax_side(config, batch_tokens, unrolled=layout == "unrolled")
    with tempfile.TemporaryDirectory() as hf_dir:
        phi_jax.save_pretrained(hf_dir, config, variables)
        del variables
        # Loads the weights before the directory goes away.
        worker = common.ReferenceWorker(_TorchTrainReference, hf_dir, batch_tokens)
    try:
        return _measure(worker, jax_steps, name, preset_name, config, batch, seq_len,
                        tokens_per_step, threads, repeats, compile_torch=compile_torch,
                        peak_flop_per_s=peak_flop_per_s, quick=quick)
    finally:
        worker.close()


def _measure(worker: common.ReferenceWorker, jax_steps, name, preset_name, config, batch, seq_len,
             tokens_per_step, threads, repeats, *, compile_torch, peak_flop_per_s, quick):
    compile_s, jax_losses = {}, {}
    for layout, jax_step in jax_steps.items():
        compile_s[layout], first = common.timed(jax_step)  # includes tracing + XLA compilation
        jax_losses[layout] = [first, jax_step()]
    jax_loss1, jax_loss2 = jax_losses[LAYER_LAYOUTS[0]]
    torch_loss1 = worker.call("step", threads, "eager")[1]
    torch_loss2 = worker.call("step", threads, "eager")[1]
    check = {"phi_jax": [jax_loss1, jax_loss2], "torch": [torch_loss1, torch_loss2],
             "abs_diff": [abs(jax_loss1 - torch_loss1), abs(jax_loss2 - torch_loss2)],
             "rtol": LOSS_RTOL, "phi_jax_by_layout": jax_losses}
    check["agree"] = all(d <= LOSS_RTOL * abs(t) for d, t in zip(check["abs_diff"], check["torch"]))
    check["agree"] &= all(abs(a - b) <= LOSS_RTOL * abs(b) for losses in jax_losses.values()
                          for a, b in zip(losses, check["torch"]))

    probe_threads = {"n": threads}
    counts, probes = common.reference_threads(
        quick, lambda: worker.call("step", probe_threads["n"], "eager"),
        set_threads=lambda n: probe_threads.update(n=n))
    variants: dict[str, Any] = {f"torch eager, {common.thread_label(n)}": ("eager", n)
                                for n in counts}
    notes = {"reference_thread_probe_s": probes} if probes else {}
    notes["process"] = "torch runs in its own process (common.ReferenceWorker); repeats alternate"
    if compile_torch:
        first = worker.call("compile", counts[0], counts[0])[1]
        if isinstance(first, str):
            notes["torch.compile"] = first
        else:
            variants[f"torch.compile, {common.thread_label(counts[0])}"] = ("compiled", counts[0])
            notes["torch.compile"] = f"first step (compilation) {first:.1f} s"
    else:
        notes["torch.compile"] = "not measured in this run (--quick skips it: minutes to compile here)"

    layout_seconds: dict[str, list[float]] = {layout: [] for layout in jax_steps}
    seconds: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(repeats):
        for layout, jax_step in jax_steps.items():
            layout_seconds[layout].append(common.timed(jax_step)[0])
        for label, (variant, n_threads) in variants.items():
            seconds[label].append(worker.call("step", n_threads, variant)[0])

    layouts = {k: common.rate_stats(v, tokens_per_step) for k, v in layout_seconds.items()}
    layout = max(layouts, key=lambda k: layouts[k]["median"])  # phi_jax at its best, as torch is
    rates = {"phi_jax": layouts[layout],
             **{k: common.rate_stats(v, tokens_per_step) for k, v in seconds.items()}}
    best_ref = max((k for k in rates if k != "phi_jax"), key=lambda k: rates[k]["median"])
    flops_per_token = config.flops_per_token(seq_len)
    out = {"case": name, "preset": preset_name, "params": config.param_count(), "batch": batch,
           "seq_len": seq_len, "tokens_per_step": tokens_per_step, "repeats": repeats,
           "jax_compile_s": compile_s[layout], "loss_check": check, "tokens_per_s": rates,
           "phi_jax_layout": layout, "phi_jax_by_layout": layouts,
           "jax_compile_s_by_layout": compile_s,
           "best_reference": best_ref,
           "ratio_vs_best_reference": rates["phi_jax"]["median"] / rates[best_ref]["median"],
           "flops_per_token": flops_per_token, "notes": notes}
    if peak_flop_per_s:
        out["phi_jax_flop_per_s"] = rates["phi_jax"]["median"] * flops_per_token
        out["fraction_of_matmul_peak"] = out["phi_jax_flop_per_s"] / peak_flop_per_s
        out["reference_fraction_of_matmul_peak"] = (rates[best_ref]["median"] * flops_per_token
                                                    / peak_flop_per_s)
    return out


def run(quick: bool = False, *, repeats: int | None = None, cases: list[str] | None = None,
        results_dir: str | os.PathLike | None = None, compile_torch: bool | None = None
        ) -> dict[str, Any]:
    """Runs the benchmark; returns (and writes) the results dict.

    `cases` picks names from CASES or SMOKE_CASES (default: all of CASES, at the QUICK_CASES
    shapes when quick); `compile_torch` defaults to True in a full run and
    False in a quick one (inductor takes minutes per model on 2 busy cores).
    """
    table = {**(QUICK_CASES if quick else CASES), **SMOKE_CASES}
    names = cases or list(QUICK_CASES if quick else CASES)
    unknown = sorted(set(names) - set(table))
    if unknown:
        raise ValueError(f"unknown train_step case(s) {unknown}; choose from {sorted(table)}")
    repeats = repeats or (3 if quick else 5)
    peak = roofline.matmul_peak(quick=True, repeats=repeats)
    rows = []
    for name in names:
        rows.append(measure_case(name, *table[name], repeats, quick=quick,
                                 compile_torch=not quick if compile_torch is None else compile_torch,
                                 peak_flop_per_s=peak["peak_flop_per_s"]))
    results = {"benchmark": NAME, "quick": quick, "machine": common.machine_info(),
               "optimizer": OPTIMIZER, "matmul_peak": peak, "cases": rows,
               "threads": {"torch": "torch.set_num_threads per variant (see labels)",
                           "xla": "XLA:CPU: Eigen intra-op pool, one thread per usable core "
                                  f"({common.usable_cores()} here)"}}
    results["summary"] = [common.summary_row(
        NAME, f"{r['case']} B{r['batch']}xL{r['seq_len']}", "tokens/s",
        r["tokens_per_s"]["phi_jax"]["median"], r["tokens_per_s"][r["best_reference"]]["median"],
        r["best_reference"],
        note=(f"{r['phi_jax_layout']} layers; "
              f"{r.get('fraction_of_matmul_peak', float('nan')):.0%} of matmul peak; losses "
              f"{'agree' if r['loss_check']['agree'] else 'DIFFER'}")) for r in rows]
    path = common.write_results(NAME, results, _plot, quick=quick, results_dir=results_dir)
    _print_table(results)
    results["json"] = str(path)
    return results


def _plot(results: dict[str, Any], path: pathlib.Path) -> None:
    import matplotlib.pyplot as plt
    cases = results["cases"]
    fig, axes = plt.subplots(1, len(cases), figsize=(5.5 * len(cases), 4.2), squeeze=False)
    for ax, case in zip(axes[0], cases):
        labels = list(case["tokens_per_s"])
        med = [case["tokens_per_s"][k]["median"] for k in labels]
        err = [[m - case["tokens_per_s"][k]["min"] for m, k in zip(med, labels)],
               [case["tokens_per_s"][k]["max"] - m for m, k in zip(med, labels)]]
        colors = ["#3b7dd8" if k == "phi_jax" else "#999" for k in labels]
        names = [f"phi_jax\n{case['phi_jax_layout']} layers" if k == "phi_jax"
                 else k.replace(", ", "\n") for k in labels]
        bars = ax.bar(names, med, yerr=err, capsize=3, color=colors)
        ax.bar_label(bars, fmt="%.0f", padding=2)
        frac = case.get("fraction_of_matmul_peak")
        ax.set_title(f"{case['case']} ({case['params'] / 1e6:.0f}M), B{case['batch']} x L"
                     f"{case['seq_len']}: {case['ratio_vs_best_reference']:.2f}x best torch"
                     + (f"\nphi_jax at {frac:.0%} of jnp.dot peak" if frac else ""), fontsize=9)
        ax.set_ylabel("tokens / s (median, min-max bars)")
        ax.tick_params(axis="x", labelsize=8)
    common.save_figure(
        fig, path, f"Train step (fwd+bwd+AdamW), float32 — {common.subtitle(results['machine'])}",
                   fontsize=9, dpi=120)


def _print_table(results: dict[str, Any]) -> None:
    rows = []
    for case in results["cases"]:
        for label, r in case["tokens_per_s"].items():
            rows.append({"case": f"{case['case']} B{case['batch']}xL{case['seq_len']}", "impl": label,
                         "min": r["min"], "median": r["median"], "max": r["max"],
                         "ratio": case["tokens_per_s"]["phi_jax"]["median"] / r["median"]})
        c = case["loss_check"]
        print(f"{case['case']}: first-step loss phi_jax {c['phi_jax'][0]:.6f} torch {c['torch'][0]:.6f}; "
              f"second {c['phi_jax'][1]:.6f} vs {c['torch'][1]:.6f} -> "
              f"{'agree' if c['agree'] else 'DIFFER'}; XLA compile {case['jax_compile_s']:.1f} s; "
              f"phi_jax at {case.get('fraction_of_matmul_peak', float('nan')):.1%} of matmul peak; "
              f"{case['notes'].get('torch.compile', '')}")
        print("  phi_jax by layer layout: " + ", ".join(
            f"{k} {v['median']:,.0f} tok/s" for k, v in case["phi_jax_by_layout"].items()))
    print(common.format_table(rows, [("case", "case", "s"), ("impl", "implementation", "s"),
                                     ("min", "tok/s min", ",.0f"), ("median", "median", ",.0f"),
                                     ("max", "max", ",.0f"), ("ratio", "phi_jax / this", ".2f")]))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller batches, fewer repeats")
    parser.add_argument("--cases", nargs="*", help=f"subset of {list(CASES)}")
    args = parser.parse_args(argv)
    run(args.quick, cases=args.cases)


if __name__ == "__main__":
    main()
