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


WINDOW_SCHEMA = {"type": "object", "properties": {"notes": {"type": "string", "minLength": 2000}},
                 "required": ["notes"]}  # no answer can end inside the window: every row decodes


def decode_window(model_source: str, *, rows: int = SLOTS, tokens: int = 48, repeats: int = 2) -> dict[str, Any]:
    """Decode tokens/s at batch `rows` in the engine, JSON-schema constrained vs free, prefill
    excluded: the issue's goal is about decoding, and the HTTP passes above mix in each request's
    prefill (constrained answers are short, so prefill weighs more in theirs).

    Every row gets the same prompt and decodes exactly `tokens` tokens (the schema's minLength
    keeps constrained rows from finishing; free rows have no stop token); the window runs from the
    moment the last row has its first token to the last token. Also measures what a step of
    constrained decoding costs the host: `grammar.fill_masks` for all rows (the time an overlap
    of mask filling with the device step could hide at most), and the same engine forced to one
    step per device call without masks (what one token per call costs by itself).
    """
    import threading

    import phi_jax
    from phi_jax.inference import grammar
    from phi_jax.serve.engine import Engine, SamplingParams

    loaded = phi_jax.load(model_source)
    tok, vocab = loaded.tokenizer, loaded.model.config.vocab_size
    engine = Engine(loaded.model, loaded.variables, num_slots=rows, max_len=512).start()
    prompt = tok.encode("Write notes about the history of computing, as JSON.")
    fmt = {"type": "json_schema", "json_schema": {"name": "notes", "schema": WINDOW_SCHEMA}}

    class Sink:
        def __init__(self):
            self.times, self.done = [], threading.Event()

        def __call__(self, event):
            if event.token is not None:
                self.times.append(time.perf_counter())
            if event.finish_reason is not None:
                self.reason = event.finish_reason
                self.done.set()

    def window(constrained: bool) -> float:
        sinks = [Sink() for _ in range(rows)]
        for i, sink in enumerate(sinks):
            constraint = grammar.compile_constraint(tok, vocab, response_format=fmt) if constrained else None
            stops = (tok.eos_id,) if constrained else ()
            engine.submit(prompt, SamplingParams(max_tokens=tokens, temperature=0.7, seed=i,
                                                 stop_token_ids=stops), sink, constraint=constraint)
        for sink in sinks:
            sink.done.wait(1800)
        assert all(s.reason == "length" for s in sinks), [s.reason for s in sinks]
        t0, t1 = max(s.times[0] for s in sinks), max(s.times[-1] for s in sinks)
        return sum(sum(t > t0 for t in s.times) for s in sinks) / (t1 - t0)

    try:
        chunk = engine.decode_chunk
        window(False), window(True)  # compile
        engine.decode_chunk = 1
        window(False)
        free, masked, one_step = [], [], []
        for _ in range(repeats):
            engine.decode_chunk = chunk
            free.append(window(False))
            masked.append(window(True))
            engine.decode_chunk = 1
            one_step.append(window(False))
        engine.decode_chunk = chunk
    finally:
        engine.stop()
    matchers = [grammar.compile_constraint(tok, vocab, response_format=fmt).new_matcher() for _ in range(rows)]
    fills = []
    for _ in range(tokens):
        start = time.perf_counter()
        masks = grammar.fill_masks(matchers, vocab)
        fills.append(time.perf_counter() - start)
        allowed_rows = grammar.allowed_tokens(masks, vocab)
        for row, matcher in enumerate(matchers):  # advance each row by one of its allowed tokens
            allowed = allowed_rows[row].nonzero()[0]
            matcher.consume(int(allowed[min(len(allowed) - 1, 40 + row)]))
    best = lambda xs: max(xs)  # noqa: E731 - the least disturbed repeat on a shared machine
    return {"rows": rows, "tokens_per_row": tokens, "repeats": repeats,
            "schema": WINDOW_SCHEMA, "free_tokens_per_s": best(free), "constrained_tokens_per_s": best(masked),
            "ratio": best(masked) / best(free),
            "free_one_step_per_call_tokens_per_s": best(one_step),
            "one_step_per_call_ratio": best(one_step) / best(free),
            "fill_masks_ms_median": 1000 * statistics.median(fills), "fill_masks_ms_max": 1000 * max(fills),
            "step_ms_constrained": 1000 * rows / best(masked),
            "all": {"free": free, "constrained": masked, "free_one_step": one_step}}


def _server_counters(url: str) -> dict[str, float]:
    """The server's /metrics counters (Prometheus text) as {name: value}."""
    import httpx

    text = httpx.get(url.removesuffix("/v1") + "/metrics", timeout=60).text
    return {k: float(v) for k, v in (line.split() for line in text.splitlines() if line and line[0] != "#")}


def _annotate(url: str, name: str, src: pathlib.Path, out: pathlib.Path, scoring: str, *,
              max_tokens: int, max_chars: int) -> dict[str, Any]:
    from phi_jax.curation.quality.annotate import annotate_stage, load_rubric
    from phi_jax.curation.core.runners import run_stage
    from phi_jax.curation.teacher.client import TeacherConfig
    from phi_jax.data import records

    teacher = TeacherConfig(url=url, model=name, concurrency=SLOTS, max_tokens=max_tokens, timeout_s=1800,
                            max_retries=1)
    stage = annotate_stage(load_rubric("code"), teacher, cache=out / "teacher_cache.sqlite",
                           max_chars=max_chars, scoring=scoring)
    before = _server_counters(url)
    start = time.perf_counter()
    manifest = run_stage(stage, str(src), out, shard_size=100_000, progress=False)
    seconds = time.perf_counter() - start
    after = _server_counters(url)
    n = manifest["counts"]["records_in"]
    delta = {k.removeprefix("phi_jax_").removesuffix("_total"): after[k] - before.get(k, 0.0)
             for k in after if k.endswith("_total")}
    notes = [r["meta"]["annotation"] for r in records.iter_output(str(out))]
    status = {s: sum(a["status"] == s for a in notes) for s in ("scored", "uncertain", "unparsed", "refused")}
    scores = [a["score"] for a in notes if a["score"] is not None]
    result = {"scoring": scoring, "documents": n, "seconds": seconds, "docs_per_s": n / seconds,
              "percent": {s: 100.0 * k / n for s, k in status.items()}, **status,
              "scores": scores, "score_spread_std": statistics.pstdev(scores) if len(scores) > 1 else None,
              "prefill_tokens_computed_per_doc": delta.get("prefill_tokens_computed", 0.0) / n,
              "prefill_tokens_reused_per_doc": delta.get("prefill_tokens_reused", 0.0) / n,
              "generated_tokens_per_doc": delta.get("generated_tokens", 0.0) / n,
              "server_counters_during_pass": delta}
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

    d, w, a = results["structured_decode"], results["decode_window"], results["annotation"]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    axes[0].bar(["free", "JSON schema", "free, 1 step/call"],
                [w["free_tokens_per_s"], w["constrained_tokens_per_s"],
                 w["free_one_step_per_call_tokens_per_s"]], color=["grey", "C0", "C1"])
    axes[0].set_title(f"decode tokens/s, batch {w['rows']} (schema x{w['ratio']:.2f})")
    if d is not None:
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
    parser.add_argument("--skip-http-decode", action="store_true",
                        help="leave out the 50-request HTTP decode passes (the engine window is kept)")
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
                constrained = free = None
                if not args.skip_http_decode:
                    for rows in (1, 2, 4, SLOTS):
                        for constrained in (True, False):
                            _decode_pass(client, name, rows, 8, constrained, in_flight=rows)
                    constrained = _decode_pass(client, name, requests, 96, True)
                    free = _decode_pass(client, name, requests, 96, False)
                src = tmp / "docs.jsonl"
                # the warm-up pass gets documents of its own: the timed ones must not find their
                # whole prompts in the prefix cache (the rubric's shared head, yes)
                _documents(src, documents + SLOTS)
                lines = src.read_text().splitlines(True)
                warm = tmp / "warm.jsonl"
                warm.write_text("".join(lines[documents:]))
                src.write_text("".join(lines[:documents]))
                _annotate(url, name, warm, tmp / "warm-l", "logprobs", max_tokens=1, max_chars=args.max_chars)
                _annotate(url, name, warm, tmp / "warm-a", "answer", max_tokens=16, max_chars=args.max_chars)
                by_scoring = {s: _annotate(url, name, src, tmp / s, s, max_tokens=args.answer_max_tokens,
                                           max_chars=args.max_chars) for s in ("logprobs", "answer")}
            finally:
                server.terminate()
                server.wait(60)
        window = decode_window(model, tokens=16 if args.quick else 48)
    results = {
        "benchmark": "teacher_engine", "quick": args.quick, "model": name, "server_start_s": start_s,
        "setup": {"slots": SLOTS, "max_len": 2048, "schema": SCHEMA, "answer_max_tokens": args.answer_max_tokens,
                  "max_chars": args.max_chars, "rubric": "code", "temperature_decode": 0.7,
                  "note": "machine shared with other engineers' jobs while measuring (see load averages); "
                          "ratios are within one run on one server"},
        "structured_decode": None if free is None else {
            "requests": requests, "constrained": constrained, "unconstrained": free,
            "ratio": constrained["tokens_per_s"] / free["tokens_per_s"],
            "note": "whole passes over HTTP, prefill included; see decode_window for decoding alone"},
        "decode_window": window,
        "annotation": by_scoring,
        "annotation_speedup_logprobs_vs_answer": by_scoring["logprobs"]["docs_per_s"]
        / by_scoring["answer"]["docs_per_s"],
        "machine": machine,
    }
    path = common.write_results(f"teacher_engine_{name}", results, _plot, quick=args.quick)
    d, w = results["structured_decode"], results["decode_window"]
    if d is not None:
        print(f"HTTP passes, tokens/s: schema {d['constrained']['tokens_per_s']:.1f} vs free "
              f"{d['unconstrained']['tokens_per_s']:.1f} (x{d['ratio']:.2f}); valid "
              f"{d['constrained']['valid']}/{requests} vs {d['unconstrained']['valid']}/{requests}")
    print(f"decode window at batch {w['rows']}: schema {w['constrained_tokens_per_s']:.1f} vs free "
          f"{w['free_tokens_per_s']:.1f} tokens/s (x{w['ratio']:.2f}); one step per call alone "
          f"x{w['one_step_per_call_ratio']:.2f}; fill_masks {w['fill_masks_ms_median']:.2f} ms median")
    for s, r in by_scoring.items():
        print(f"annotate --scoring={s}: {r['docs_per_s']:.3f} docs/s, {r['percent']}, prompt tokens per "
              f"doc computed {r['prefill_tokens_computed_per_doc']:.0f} / reused "
              f"{r['prefill_tokens_reused_per_doc']:.0f}")
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
