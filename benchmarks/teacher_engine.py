"""The teacher engine with one served model: structured decoding and scores from logprobs.

    python -m benchmarks.teacher_engine --quick               # a random tiny model (~2 minutes)
    python -m benchmarks.teacher_engine --model=smollm2       # SmolLM2-135M-Instruct (compiles minutes)

One `phi-jax serve` subprocess answers every measurement (SmolLM2 compiles for minutes on a loaded
CPU, so it is started once):

  * structured decode: the same 50 chat requests (8 in flight, the server's 8 slots) with a JSON
    schema (`response_format`) and without (the reference); decode tokens/s of each, the
    constrained/unconstrained ratio, and the share of answers that `json.loads` + `jsonschema`
    accept (explicit field checks when `jsonschema` is not installed; the unconstrained answers are
    checked too, for contrast);
  * annotation (`benchmarks.curation`'s documents and stage): the same documents scored with
    `--scoring=logprobs` (one token after the rubric's score line, top-20 log-probs) and with
    `--scoring=answer` (the teacher writes reasons and a score line, parsed): docs/s, % scored /
    uncertain / unparsed, and what the labels look like (the expected scores' spread, the mass).

Untimed passes first compile what the timed ones run (prefill buckets; decode programs for 1, 2, 4
and 8 rows with and without masks; the annotation prompts' buckets and spans), so compilation is
(mostly) not timed. Writes
benchmarks/results/teacher_engine_<name>.json and .png (_quick for --quick).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import pathlib
import statistics
import sys
import tempfile
import time
from typing import Any

from benchmarks import common
from benchmarks.curation import _documents, _tiny_model
from benchmarks.serve import _free_port, _start_server

SCHEMA = {"type": "object",
          "properties": {"name": {"type": "string", "maxLength": 24},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120},
                         "city": {"type": "string", "maxLength": 24},
                         "languages": {"type": "array", "items": {"type": "string", "maxLength": 16},
                                       "maxItems": 3}},
          "required": ["name", "age", "city", "languages"], "additionalProperties": False}
SLOTS = 8


def _valid(text: str) -> bool:
    """json.loads + jsonschema when installed, else explicit checks of SCHEMA's fields."""
    try:
        value = json.loads(text)
    except ValueError:
        return False
    try:
        import jsonschema
    except ImportError:
        return (isinstance(value, dict) and set(value) == set(SCHEMA["required"])
                and isinstance(value["name"], str) and len(value["name"]) <= 24
                and type(value["age"]) is int and 0 <= value["age"] <= 120
                and isinstance(value["city"], str) and len(value["city"]) <= 24
                and isinstance(value["languages"], list) and len(value["languages"]) <= 3
                and all(isinstance(x, str) and len(x) <= 16 for x in value["languages"]))
    try:
        jsonschema.validate(value, SCHEMA)
        return True
    except jsonschema.ValidationError:
        return False


def _decode_pass(client, name: str, requests: int, max_tokens: int, constrained: bool,
                 in_flight: int = SLOTS) -> dict[str, Any]:
    """`requests` chat requests, `in_flight` at once; tokens/s over the whole pass."""
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}

    def ask(i: int):
        kwargs = {"response_format": fmt} if constrained else {}
        r = client.chat.completions.create(
            model=name, max_tokens=max_tokens, temperature=0.7, seed=i,
            messages=[{"role": "user", "content": f"Invent person number {i}: give their name, age, city "
                                                  "and up to three languages they speak, as JSON."}],
            **kwargs)
        return r.choices[0].message.content, r.usage.completion_tokens, r.choices[0].finish_reason

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(in_flight) as pool:
        answers = list(pool.map(ask, range(requests)))
    seconds = time.perf_counter() - start
    tokens = sum(a[1] for a in answers)
    return {"requests": requests, "seconds": seconds, "completion_tokens": tokens,
            "tokens_per_s": tokens / seconds, "valid": sum(_valid(a[0]) for a in answers),
            "finished": sum(a[2] == "stop" for a in answers), "examples": [a[0][:200] for a in answers[:3]]}


def _annotate(url: str, name: str, src: pathlib.Path, out: pathlib.Path, scoring: str, *,
              max_tokens: int, max_chars: int) -> dict[str, Any]:
    from phi_jax.curation.quality.annotate import annotate_stage, load_rubric
    from phi_jax.curation.runners import run_stage
    from phi_jax.curation.teacher.client import TeacherConfig
    from phi_jax.data import records

    teacher = TeacherConfig(url=url, model=name, concurrency=SLOTS, max_tokens=max_tokens, timeout_s=1800,
                            max_retries=1)
    stage = annotate_stage(load_rubric("code"), teacher, cache=out / "teacher_cache.sqlite",
                           max_chars=max_chars, scoring=scoring)
    start = time.perf_counter()
    manifest = run_stage(stage, str(src), out, shard_size=100_000, progress=False)
    seconds = time.perf_counter() - start
    n = manifest["counts"]["records_in"]
    notes = [r["meta"]["annotation"] for r in records.iter_output(str(out))]
    status = {s: sum(a["status"] == s for a in notes) for s in ("scored", "uncertain", "unparsed", "refused")}
    scores = [a["score"] for a in notes if a["score"] is not None]
    result = {"scoring": scoring, "documents": n, "seconds": seconds, "docs_per_s": n / seconds,
              "percent": {s: 100.0 * k / n for s, k in status.items()}, **status,
              "scores": scores, "score_spread_std": statistics.pstdev(scores) if len(scores) > 1 else None}
    if scoring == "logprobs":
        masses = [a["score_mass"] for a in notes if a.get("score_mass") is not None]
        expected = [a["expected_score"] for a in notes if a.get("expected_score") is not None]
        result.update(mean_score_mass=statistics.fmean(masses) if masses else None,
                      expected_scores=expected,
                      mean_distribution={d: statistics.fmean(a["distribution"][d] for a in notes
                                                             if a.get("distribution"))
                                         for d in "012345"} if expected else None)
    else:
        result["example_answers"] = [(a.get("answer") or "")[-200:] for a in notes[:3]]
    return result


def _plot(results: dict[str, Any], path: pathlib.Path) -> None:
    import matplotlib.pyplot as plt

    d, a = results["structured_decode"], results["annotation"]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    axes[0].bar(["unconstrained", "JSON schema"], [d["unconstrained"]["tokens_per_s"],
                                                   d["constrained"]["tokens_per_s"]], color=["grey", "C0"])
    axes[0].set_title(f"decode tokens/s, batch {SLOTS} (ratio {d['ratio']:.2f})")
    axes[1].bar(["unconstrained", "JSON schema"], [100 * d["unconstrained"]["valid"] / d["requests"],
                                                   100 * d["constrained"]["valid"] / d["requests"]],
                color=["grey", "C0"])
    axes[1].set_title(f"% of {d['requests']} answers valid against the schema")
    kinds = ["scored", "uncertain", "unparsed", "refused"]
    bottom = [0.0, 0.0]
    for k in kinds:
        vals = [a[s]["percent"][k] for s in ("logprobs", "answer")]
        axes[2].bar([f"logprobs\n{a['logprobs']['docs_per_s']:.3g} docs/s",
                     f"answer\n{a['answer']['docs_per_s']:.3g} docs/s"], vals, bottom=bottom, label=k)
        bottom = [b + v for b, v in zip(bottom, vals)]
    axes[2].set_title(f"annotation of {a['logprobs']['documents']} documents (%)")
    axes[2].legend(fontsize=8)
    common.save_figure(
        fig, path, f"teacher engine, {results['model']} — {common.subtitle(results['machine'])}", fontsize=9, dpi=110)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a random tiny model, fewer requests")
    parser.add_argument("--model", default="", help="any `phi-jax serve --model` source (default: tiny)")
    parser.add_argument("--name", default="", help="results name (default: smollm2 / tiny-random)")
    parser.add_argument("--requests", type=int, default=50)
    parser.add_argument("--documents", type=int, default=40)
    parser.add_argument("--answer-max-tokens", type=int, default=256)
    parser.add_argument("--max-chars", type=int, default=1500)
    args = parser.parse_args(argv)
    import openai

    machine = common.machine_info()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        model = args.model or str(_tiny_model(tmp / "tiny", 2048))
        name = args.name or ("smollm2" if "smol" in args.model.lower() else "tiny-random")
        requests = 16 if args.quick else args.requests
        documents = 8 if args.quick else args.documents
        port = _free_port()
        with open(tmp / "server.log", "w") as log:
            started = time.perf_counter()
            server = _start_server(model, port, SLOTS, 2048, log, name=name, warmup=False)
            try:
                url = f"http://127.0.0.1:{port}/v1"
                client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=1800)
                start_s = time.perf_counter() - started
                # untimed passes: compile the prefill buckets and the decode programs of every row
                # count (1, 2, 4, 8 requests in flight), with and without masks
                for rows in (1, 2, 4, SLOTS):
                    for constrained in (True, False):
                        _decode_pass(client, name, rows, 8, constrained, in_flight=rows)
                constrained = _decode_pass(client, name, requests, 96, True)
                free = _decode_pass(client, name, requests, 96, False)
                src = tmp / "docs.jsonl"
                _documents(src, documents)
                warm = tmp / "warm.jsonl"
                warm.write_text("".join(src.read_text().splitlines(True)[:SLOTS]))
                _annotate(url, name, warm, tmp / "warm-l", "logprobs", max_tokens=1, max_chars=args.max_chars)
                _annotate(url, name, warm, tmp / "warm-a", "answer", max_tokens=16, max_chars=args.max_chars)
                by_scoring = {s: _annotate(url, name, src, tmp / s, s, max_tokens=args.answer_max_tokens,
                                           max_chars=args.max_chars) for s in ("logprobs", "answer")}
            finally:
                server.terminate()
                server.wait(60)
    results = {
        "benchmark": "teacher_engine", "quick": args.quick, "model": name, "server_start_s": start_s,
        "setup": {"slots": SLOTS, "max_len": 2048, "schema": SCHEMA, "answer_max_tokens": args.answer_max_tokens,
                  "max_chars": args.max_chars, "rubric": "code", "temperature_decode": 0.7,
                  "note": "machine shared with other engineers' jobs while measuring (see load averages); "
                          "ratios are within one run on one server"},
        "structured_decode": {"requests": requests, "constrained": constrained, "unconstrained": free,
                              "ratio": constrained["tokens_per_s"] / free["tokens_per_s"]},
        "annotation": by_scoring,
        "annotation_speedup_logprobs_vs_answer": by_scoring["logprobs"]["docs_per_s"]
        / by_scoring["answer"]["docs_per_s"],
        "machine": machine,
    }
    path = common.write_results(f"teacher_engine_{name}", results, _plot, quick=args.quick)
    d = results["structured_decode"]
    print(f"decode tokens/s: schema {d['constrained']['tokens_per_s']:.1f} vs free "
          f"{d['unconstrained']['tokens_per_s']:.1f} (x{d['ratio']:.2f}); valid "
          f"{d['constrained']['valid']}/{requests} vs {d['unconstrained']['valid']}/{requests}")
    for s, r in by_scoring.items():
        print(f"annotate --scoring={s}: {r['docs_per_s']:.3f} docs/s, {r['percent']}")
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
