"""Curation: annotation docs/s against a served teacher at concurrency 1, 8 and 32, embedding
tokens/s, and the quality classifier's held-out F1.

    python -m benchmarks.curation --quick                      # a random tiny model (a few minutes)
    python -m benchmarks.curation --model=PATH/SmolLM2-135M-Instruct.Q4_1.gguf --name=smollm2
    python -m benchmarks.curation --model=smollm2 --name=smollm2 --teacher-url=http://127.0.0.1:8000/v1 \
        --concurrency=8 --documents=200 --embed-documents=32     # a teacher already being served

The teacher is a real `phi-jax serve` subprocess on 127.0.0.1 (its own process, so the client's
Python does not share a GIL with it) serving `--model` (any source `--model` accepts; default: the
"tiny" preset with random weights and a BPE trained on a few stdlib sources). The documents are
the first standard-library sources of the embedded corpus (evenly spaced), annotated with the `code`
rubric (or `--rubric`) through the real annotation stage (`run_stage` + the teacher client), each
concurrency with a fresh cache so every answer is asked for. Concurrency 1 is the reference the
others are compared with. Before the timed runs a pass at the highest concurrency compiles the
server's prefill buckets, so compilation is not timed. `--teacher-url` uses a server that is already
running and warm instead (for a slow teacher, whose every answer costs minutes on a CPU: the JSON
then says the server was shared with whatever else was asking it).

Embedding tokens/s: `phi_jax.inference.embed.Embedder` over the same documents (the first
`--embed-documents` of them) in this process, batched (16 rows) against one text per call (the
reference), after a compiling pass.

Classifier F1: ridge / logistic / forest heads trained on the teacher's scores when it scored at
least 20 documents with more than one distinct score, else on the offline heuristic's scores (a
random model writes no scores; the JSON says which); held-out P/R/F1 at score >= 3 beside the
majority-class baseline.

Writes benchmarks/results/curation_<name>.json and .png (curation_<name>_quick.* for --quick).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import tempfile
import time
from typing import Any

from benchmarks import common
from benchmarks.serve import _corpus, _free_port, _start_server

CONCURRENCY = (1, 8, 32)
HEADS = ("ridge", "logistic", "forest")
RUBRIC = "code"
EXAMPLES = 4  # teacher answers kept in the JSON, so a reader sees what "unparsed" looked like


def _tiny_model(directory: pathlib.Path, max_len: int) -> pathlib.Path:
    """A random "tiny" Phi + a BPE trained on a few stdlib sources, saved as an HF directory."""
    import jax

    import phi_jax
    from phi_jax.config import preset
    from phi_jax.model import init_params
    from phi_jax.tokenizer import train_bpe

    tokenizer = train_bpe(_corpus(), vocab_size=4096)
    config = preset("tiny", vocab_size=tokenizer.vocab_size, eos_token_id=tokenizer.eos_id, max_len=max_len)
    variables = jax.jit(init_params, static_argnums=0)(config, jax.random.key(0))
    phi_jax.save_pretrained(directory, config, variables)
    tokenizer.save(directory)
    return directory


def _documents(path: pathlib.Path, count: int) -> list[dict]:
    """`count` standard-library sources, evenly spaced over the corpus, as a JSONL input."""
    from phi_jax.data import corpus

    names = [n for n in corpus.document_names() if n.endswith(".py")]
    step = max(1, len(names) // count)
    rows = [{"id": f"stdlib:{n}", "text": corpus.read_document(n)} for n in names[::step][:count]]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def _annotate(url: str, name: str, src: pathlib.Path, out: pathlib.Path, concurrency: int, *,
              max_tokens: int, max_chars: int, rubric: str = RUBRIC) -> dict[str, Any]:
    from phi_jax.curation.core.runners import run_stage
    from phi_jax.curation.quality.annotate import annotate_stage, load_rubric
    from phi_jax.curation.teacher.client import TeacherConfig

    teacher = TeacherConfig(url=url, model=name, concurrency=concurrency, max_tokens=max_tokens,
                            timeout_s=900, max_retries=2)
    # written answers (what this sweep and its "unparsed" examples are about); logprob scoring is
    # measured beside it by benchmarks/teacher_engine.py
    stage = annotate_stage(load_rubric(rubric), teacher, cache=out / "teacher_cache.sqlite",
                           max_chars=max_chars, scoring="answer")
    start = time.perf_counter()
    manifest = run_stage(stage, str(src), out, shard_size=100_000, progress=False)
    seconds = time.perf_counter() - start
    c, n = manifest["counts"]["stage"], manifest["counts"]["records_in"]
    return {"concurrency": concurrency, "documents": n, "seconds": seconds, "docs_per_s": n / seconds,
            "completion_tokens_per_s": c.get("teacher_completion_tokens", 0) / seconds,
            "prompt_tokens_per_s": c.get("teacher_prompt_tokens", 0) / seconds,
            "prompt_tokens": c.get("teacher_prompt_tokens", 0),
            "completion_tokens": c.get("teacher_completion_tokens", 0),
            **{k: c.get(k, 0) for k in ("scored", "unparsed", "refused", "teacher_retries")},
            **_answers(out)}


def _answers(out: pathlib.Path) -> dict[str, Any]:
    """Score histogram, unparsed reasons and a few answers as the teacher wrote them."""
    from collections import Counter

    from phi_jax.data import records

    notes = [r["meta"]["annotation"] for r in records.iter_output(str(out))]
    return {"score_histogram": dict(sorted(Counter(str(n["score"]) for n in notes if n["score"] is not None).items())),
            "unparsed_reasons": dict(Counter(n["reason"] for n in notes if n["status"] == "unparsed").most_common(5)),
            "example_answers": [(n.get("answer") or "")[-300:] for n in notes[:EXAMPLES]]}


def _embedding(loaded, texts: list[str], max_tokens: int, batch_size: int, repeats: int) -> dict[str, Any]:
    from phi_jax.inference.embed import Embedder

    embedder = Embedder(loaded.model, loaded.variables, loaded.tokenizer, max_tokens=max_tokens,
                        batch_size=batch_size)
    embedder(texts)  # compile every bucket
    seconds = []
    for _ in range(repeats):
        embedder.tokens = 0
        seconds.append(common.timed(lambda: embedder(texts))[0])
    tokens = embedder.tokens
    return {"batch_size": batch_size, "documents": len(texts), "tokens": tokens,
            "tokens_per_s": common.rate_stats(seconds, tokens), "max_tokens": max_tokens}


class _Memo:
    """An Embedder that embeds each text once, so the three heads do not pay three times."""

    def __init__(self, embedder):
        self._embedder, self._cache, self.tokens = embedder, {}, 0

    def __call__(self, texts):
        import numpy as np

        todo = [t for t in dict.fromkeys(texts) if t not in self._cache]
        if todo:
            before = self._embedder.tokens
            for t, v in zip(todo, self._embedder(todo)):
                self._cache[t] = v
            self.tokens += self._embedder.tokens - before
        return np.stack([self._cache[t] for t in texts])


def _classifier(loaded, model_path: str, teacher_dir: pathlib.Path, work: pathlib.Path, *, documents: int,
                max_tokens: int) -> dict[str, Any]:
    from phi_jax.curation.core.runners import run_stage
    from phi_jax.curation.quality.annotate import annotate_stage, load_rubric
    from phi_jax.curation.quality.classify import scored_annotations, train_classifier
    from phi_jax.inference.embed import Embedder

    scored, _ = scored_annotations([str(teacher_dir)])
    labels, source = teacher_dir, "teacher"
    if len(scored) < 20 or len({r["meta"]["annotation"]["score"] for r in scored}) < 2:
        labels, source = work / "heuristic", "heuristic (the teacher scored too few documents)"
        _documents(work / "classifier_docs.jsonl", documents)
        run_stage(annotate_stage(load_rubric(RUBRIC), None, cache=None), str(work / "classifier_docs.jsonl"),
                  labels, progress=False)
    memo = _Memo(Embedder(loaded.model, loaded.variables, loaded.tokenizer, max_tokens=max_tokens))
    heads = {}
    for head in HEADS:
        info = {"path": model_path, "dtype": "float32", "max_tokens": max_tokens}
        report = train_classifier([str(labels)], memo, head=head, output=work / f"clf-{head}", embedder_info=info)
        heads[head] = {k: report["held_out"][k] for k in ("precision", "recall", "f1", "accuracy", "mae", "n")}
        baseline = report["baseline_majority"]["f1"]
    return {"labels": source, "documents": report["train"] + report["test"], "test": report["test"],
            "score_histogram": report["score_histogram"], "heads": heads, "baseline_majority_f1": baseline}


def run(quick: bool = False, model: str | None = None, name: str | None = None, documents: int | None = None,
        max_tokens: int | None = None, max_chars: int = 2000, max_len: int = 2048,
        classifier_documents: int = 300, results_dir: str | None = None, *, teacher_url: str | None = None,
        concurrency: tuple[int, ...] = CONCURRENCY, rubric: str = RUBRIC, embed_tokens: int = 512,
        embed_documents: int = 0) -> dict[str, Any]:
    from phi_jax.inference import loader

    documents = documents or (48 if quick else 300)
    max_tokens = max_tokens or (32 if quick else 256)
    name = name or ("tiny-random" if model is None else pathlib.Path(model).stem)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        model_path = str(_tiny_model(tmp / "model", max_len) if model is None else model)
        src = tmp / "docs.jsonl"
        rows = _documents(src, documents)

        def annotate_all(url: str) -> dict[str, Any]:
            return {str(c): _annotate(url, name, src, tmp / f"c{c}", c, max_tokens=max_tokens,
                                      max_chars=max_chars, rubric=rubric) for c in concurrency}

        if teacher_url:
            annotation = annotate_all(teacher_url)
        else:
            port = _free_port()
            with open(tmp / "server.log", "w+") as log:
                proc = _start_server(pathlib.Path(model_path), port, max(concurrency), max_len, log, name=name,
                                     warmup=False)
                try:
                    url = f"http://127.0.0.1:{port}/v1"
                    _annotate(url, name, src, tmp / "warmup", max(concurrency), max_tokens=4,
                              max_chars=max_chars, rubric=rubric)
                    annotation = annotate_all(url)
                finally:
                    proc.terminate()
                    proc.wait(60)
        loaded = loader.load(model_path)
        texts = [r["text"] for r in rows][:embed_documents or None]
        embedding = {"batched": _embedding(loaded, texts, embed_tokens, 16, 1 if quick else 3),
                     "one_per_call": _embedding(loaded, texts, embed_tokens, 1, 1 if quick else 2)}
        labelled = max(concurrency, key=lambda c: annotation[str(c)]["scored"])
        classifier = _classifier(loaded, model_path, tmp / f"c{labelled}", tmp, documents=classifier_documents,
                                 max_tokens=embed_tokens)
    base = annotation["1"]["docs_per_s"] if "1" in annotation else None
    results = {
        "benchmark": "curation", "quick": quick,
        "setup": {"model": model or "tiny preset, random weights, 4k BPE", "name": name, "documents": documents,
                  "rubric": rubric, "max_tokens": max_tokens, "max_chars": max_chars,
                  "server": teacher_url or "started by this benchmark, nothing else asking it",
                  "server_slots": None if teacher_url else max(concurrency), "max_len": max_len,
                  "temperature": 0.0, "embed_tokens": embed_tokens,
                  "classifier_documents_if_heuristic": classifier_documents},
        "annotation": annotation,
        "annotation_speedup_vs_concurrency_1": {c: row["docs_per_s"] / base if base else None
                                                for c, row in annotation.items()},
        "embedding": embedding,
        "embedding_speedup_vs_one_per_call": embedding["batched"]["tokens_per_s"]["median"]
        / embedding["one_per_call"]["tokens_per_s"]["median"],
        "classifier": classifier,
    }
    common.write_results(f"curation_{name}", results, _plot, quick=quick, results_dir=results_dir)
    _print(results)
    return results


def _plot(results: dict[str, Any], path: pathlib.Path) -> None:
    import matplotlib.pyplot as plt

    fig, (a, b, c) = plt.subplots(1, 3, figsize=(13, 3.8))
    ann = results["annotation"]
    a.bar([f"c={k}" for k in ann], [r["docs_per_s"] for r in ann.values()], color="tab:blue")
    a.set_ylabel("documents / s")
    first = next(iter(ann.values()))
    a.set_title(f"annotation: {first['scored']} of {first['documents']} scored"
                + ("; c=1 is the reference" if "1" in ann else ""))
    emb = results["embedding"]
    rates = [emb["one_per_call"]["tokens_per_s"]["median"], emb["batched"]["tokens_per_s"]["median"]]
    b.bar(["one per call", "batched (16)"], rates, color=["gray", "tab:blue"])
    b.set_ylabel("tokens / s")
    b.set_title("embedding")
    clf = results["classifier"]
    names = list(clf["heads"]) + ["majority"]
    c.bar(names, [h["f1"] for h in clf["heads"].values()] + [clf["baseline_majority_f1"]],
          color=["tab:blue"] * len(clf["heads"]) + ["gray"])
    c.set_ylim(0, 1)
    c.set_ylabel("held-out F1 (score >= 3)")
    c.set_title(f"classifier, labels: {clf['labels'].split(' ')[0]}, n={clf['documents']}")
    s = results["setup"]
    common.save_figure(fig, path, f"curation, teacher {s['name']}, {s['documents']} documents — "
                       f"{common.subtitle(results['machine'])}", dpi=100)


def _print(results: dict[str, Any]) -> None:
    print(f"{'annotation':<24}{'docs/s':>10}{'x c=1':>8}{'prompt tok/s':>14}{'answer tok/s':>14}"
          f"{'scored':>8}{'unparsed':>10}")
    for c, row in results["annotation"].items():
        print(f"{'  concurrency ' + c:<24}{row['docs_per_s']:>10.2f}"
              f"{results['annotation_speedup_vs_concurrency_1'][c] or float('nan'):>8.2f}"
              f"{row['prompt_tokens_per_s']:>14,.0f}"
              f"{row['completion_tokens_per_s']:>14,.1f}{row['scored']:>8}{row['unparsed']:>10}")
    emb = results["embedding"]
    print(f"embedding tokens/s: batched {emb['batched']['tokens_per_s']['median']:,.0f}, one per call "
          f"{emb['one_per_call']['tokens_per_s']['median']:,.0f} "
          f"(x{results['embedding_speedup_vs_one_per_call']:.2f})")
    clf = results["classifier"]
    print(f"classifier ({clf['labels']}, {clf['documents']} documents, {clf['test']} held out): "
          + ", ".join(f"{h} F1 {v['f1']:.2f}" for h, v in clf["heads"].items())
          + f"; majority baseline F1 {clf['baseline_majority_f1']:.2f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="48 documents, 32-token answers")
    parser.add_argument("--model", help="the teacher and embedder (any --model source); default: tiny random")
    parser.add_argument("--name", help="served model name, also in the output file name")
    parser.add_argument("--documents", type=int, help="documents to annotate (default 48 quick / 300)")
    parser.add_argument("--max-tokens", type=int, help="answer length (default 32 quick / 256)")
    parser.add_argument("--max-chars", type=int, default=2000, help="characters of each document shown")
    parser.add_argument("--max-len", type=int, default=2048, help="the server's context (prompt + answer)")
    parser.add_argument("--classifier-documents", type=int, default=300,
                        help="documents the heuristic labels when the teacher scored too few")
    parser.add_argument("--teacher-url", help="an OpenAI-compatible URL already serving --model as --name "
                        "(default: start `phi-jax serve` here)")
    parser.add_argument("--concurrency", default=",".join(map(str, CONCURRENCY)),
                        help="comma-separated concurrencies to annotate at (1 is the reference)")
    parser.add_argument("--rubric", default=RUBRIC, help="edu, code or a prompt file (as `data annotate`)")
    parser.add_argument("--embed-tokens", type=int, default=512, help="tokens of each document embedded")
    parser.add_argument("--embed-documents", type=int, default=0,
                        help="documents in the embedding-throughput measurement (0 = all)")
    args = parser.parse_args(argv)
    run(args.quick, args.model, args.name, args.documents, args.max_tokens, args.max_chars, args.max_len,
        args.classifier_documents, teacher_url=args.teacher_url,
        concurrency=tuple(int(c) for c in args.concurrency.split(",")), rubric=args.rubric,
        embed_tokens=args.embed_tokens, embed_documents=args.embed_documents)


if __name__ == "__main__":
    sys.exit(main())
