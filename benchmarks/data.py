"""Data pipeline throughput on the embedded default corpus: tokenize + pack tokens/s.

    python -m benchmarks.data [--quick]

Measures, in one run on the same machine:
  * the corpus (documents, characters, tokens) and the time to train the 8k byte-level BPE on it;
  * the reference: the bare tokenizer (`tokenizers` encode, one thread, and encode_batch, all cores);
  * the Grain pipeline (read, tokenize, pack, batch; seq_len 2048, batch 8) with 0 (in-process),
    1 and 2 worker processes. Tokens/s counts real (non-padding) tokens after the first batch, so
    worker start-up is reported separately.
Writes benchmarks/results/data.json and data.png.
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

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
SEQ_LEN, BATCH = 2048, 8


def _machine() -> dict[str, Any]:
    import grain
    import tokenizers
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "python": sys.version.split()[0],
            "grain": grain.__version__, "tokenizers": tokenizers.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "load_average_1min": os.getloadavg()[0]}  # Other work on the machine skews numbers.


def _pipeline_throughput(tok, num_workers: int, batches: int) -> dict[str, float]:
    from phi_jax.data import pipeline
    cfg = pipeline.default_data_config()
    cfg.num_workers = num_workers
    it = iter(pipeline.build_dataset(cfg, tok, seq_len=SEQ_LEN, batch_size=BATCH, seed=0))
    start = time.perf_counter()
    next(it)
    first = time.perf_counter() - start
    tokens, padded = 0, 0
    start = time.perf_counter()
    for _ in range(batches):
        batch = next(it)
        tokens += int((batch["segment_ids"] > 0).sum())
        padded += batch["tokens"].size
    seconds = time.perf_counter() - start
    it.close()
    return {"num_workers": num_workers, "tokens_per_s": tokens / seconds,
            "first_batch_s": first, "batches": batches, "padding_fraction": 1 - tokens / padded}


def run(quick: bool = False, results_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Runs the benchmark; returns (and writes) the results dict."""
    from phi_jax import tokenizer as tokenizer_lib
    from phi_jax.data import corpus
    texts = list(corpus.iter_documents())
    info = corpus.corpus_info()
    start = time.perf_counter()
    tok = tokenizer_lib.train_bpe(texts, vocab_size=8192)  # What get_or_train_tokenizer runs.
    train_s = time.perf_counter() - start

    start = time.perf_counter()
    single = [tok.encode(t) for t in texts]
    encode_s = time.perf_counter() - start
    n_tokens = sum(len(ids) for ids in single) + len(texts)  # + one EOS per document.
    start = time.perf_counter()
    tok.encode_batch(texts)
    batch_s = time.perf_counter() - start

    batches = 15 if quick else 80
    runs = [_pipeline_throughput(tok, w, batches) for w in (0, 1, 2)]
    results = {
        "machine": _machine(), "quick": quick, "seq_len": SEQ_LEN, "batch_size": BATCH,
        "corpus": {**info, "tokens": n_tokens, "vocab_size": tok.vocab_size,
                   "bpe_train_s": train_s, "bytes_per_token": info["characters"] / n_tokens},
        "reference": {"encode_1_thread_tokens_per_s": n_tokens / encode_s,
                      "encode_batch_all_cores_tokens_per_s": n_tokens / batch_s},
        "pipeline": runs,
    }
    out = pathlib.Path(results_dir) if results_dir is not None else RESULTS  # benchmarks.run --results-dir
    out.mkdir(parents=True, exist_ok=True)
    (out / "data.json").write_text(json.dumps(results, indent=2) + "\n")
    _plot(results, out / "data.png")
    _print_table(results)
    return results


def _plot(results: dict[str, Any], path: pathlib.Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ref = results["reference"]
    labels = ["tokenizer\n1 thread", "tokenizer\nbatch, all cores"] + [
        f"pipeline\n{r['num_workers']} workers" for r in results["pipeline"]]
    values = [ref["encode_1_thread_tokens_per_s"], ref["encode_batch_all_cores_tokens_per_s"]] + [
        r["tokens_per_s"] for r in results["pipeline"]]
    fig, ax = plt.subplots(figsize=(7, 4))
    bars = ax.bar(labels, [v / 1e3 for v in values], color=["#999", "#999"] + ["#3b7dd8"] * 3)
    ax.bar_label(bars, fmt="%.0f")
    m = results["machine"]
    ax.set_ylabel("thousand tokens / s")
    ax.set_title(f"Tokenize + pack, default corpus (seq {results['seq_len']}, batch "
                 f"{results['batch_size']})\n{m['cpu_count']} CPUs (load {m['load_average_1min']:.1f}), "
        f"{m['date'][:10]}", fontsize=10)
    common.save_figure(fig, path, dpi=120)


def _print_table(results: dict[str, Any]) -> None:
    c, ref = results["corpus"], results["reference"]
    print(f"corpus: {c['documents']} documents ({c['code_files']} files, {c['topics']} topics), "
          f"{c['characters'] / 1e6:.1f}M chars, {c['tokens'] / 1e6:.2f}M tokens "
          f"({c['bytes_per_token']:.2f} chars/token), BPE-8k training {c['bpe_train_s']:.1f} s")
    print(f"{'what':<34}{'tokens/s':>12}{'first batch s':>15}{'padding':>9}")
    print(f"{'tokenizer encode, 1 thread':<34}{ref['encode_1_thread_tokens_per_s']:>12,.0f}")
    print(f"{'tokenizer encode_batch, all cores':<34}"
          f"{ref['encode_batch_all_cores_tokens_per_s']:>12,.0f}")
    for r in results["pipeline"]:
        print(f"{'pipeline, ' + str(r['num_workers']) + ' workers':<34}{r['tokens_per_s']:>12,.0f}"
              f"{r['first_batch_s']:>15.2f}{r['padding_fraction']:>9.1%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer batches (a smoke run)")
    run(parser.parse_args().quick)


if __name__ == "__main__":
    main()
