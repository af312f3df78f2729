"""Prefill at speed and a warm start (issue 30, parts 3-4), measured:

  * prefix cache: annotation-like prompts (one long shared rubric + a short document, one token
    asked for, as logprob scoring does) through the engine with and without the prefix cache:
    prompt tokens computed per document, and documents/s;
  * batched prefill: the same prompts waiting together (one prefill call per bucket) vs admitted
    one at a time: prompt tokens/s;
  * start: `phi-jax serve --model=smollm2` seconds until /v1/models answers, with an empty compile
    cache (cold) and again with the cache it left (warm), once each; `phi-jax sample` on a tiny
    workdir, cold and warm (whole process wall time).

    python -m benchmarks.serve --part=prefill [--quick] [--model=smollm2] [--no-start]

The machine is shared: every ratio is against a reference measured in the same run; the start
times are single measurements (say so when quoting them). Writes benchmarks/results/
serve_prefill[_quick].json and .png.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

from benchmarks import common

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
ROOT = pathlib.Path(__file__).resolve().parents[1]


def _rubric_and_documents(tokenizer, rubric_tokens: int, docs: int, doc_tokens: int):
    """Token ids: a rubric of about `rubric_tokens` (from the stdlib's prose) and `docs` short
    documents (stdlib code), each prompt = rubric + document + a score line."""
    import inspect
    import json as json_module

    import numpy as np

    prose = tokenizer.encode(inspect.getdoc(json_module) * 4)
    code = tokenizer.encode(inspect.getsource(json_module.decoder))
    rng = np.random.default_rng(0)
    rubric = prose[:rubric_tokens]
    tail = tokenizer.encode("\nEducational score: ")
    prompts = []
    for _ in range(docs):
        start = int(rng.integers(0, len(code) - doc_tokens))
        prompts.append(rubric + code[start:start + doc_tokens] + tail)
    return prompts


def _drive(engine, prompts, *, together: bool) -> float:
    """Seconds to run every prompt (one new token each) through `engine`: all waiting at once (the
    engine thread is held by a gate request while they are submitted), or each after the previous
    finished."""
    from phi_jax.serve.engine import SamplingParams

    start = time.perf_counter()
    events = [threading.Event() for _ in prompts]
    gate, release = threading.Event(), threading.Event()
    if together:
        engine.submit([1], SamplingParams(max_tokens=1), lambda e: (gate.set(), release.wait(60)))
        gate.wait()
        start = time.perf_counter()
    for prompt, done in zip(prompts, events):
        engine.submit(prompt, SamplingParams(max_tokens=1),
                      lambda e, done=done: e.finish_reason and done.set())
        if not together:
            done.wait()
    release.set()
    for done in events:
        done.wait()
    return time.perf_counter() - start


def _measured(engine, prompts, *, together: bool) -> float:
    """The third of three identical runs: the first two compile every shape the run uses (and,
    with a prefix cache, fill it), so the third times steady-state work only."""
    for _ in range(2):
        _drive(engine, prompts, together=together)
    return _drive(engine, prompts, together=together)


def prefill_part(model, variables, tokenizer, *, quick: bool) -> dict[str, Any]:
    """Prefix cache on vs off, batched vs one-by-one, on the same model in this process."""
    from phi_jax.serve.engine import Engine

    docs = 16 if quick else 48
    passes = _rubric_and_documents(tokenizer, rubric_tokens=400, docs=3 * docs, doc_tokens=60)
    passes = [passes[i * docs:(i + 1) * docs] for i in range(3)]  # new documents every pass
    prompts = passes[2]
    max_len = 1 << (max(len(p) for p in prompts) + 8).bit_length()
    max_len = min(max_len, model.config.max_len)
    out: dict[str, Any] = {"documents": docs, "prompt_tokens_mean": sum(map(len, prompts)) / docs,
                           "rubric_tokens": 400, "document_tokens": 60}
    for name, cache_tokens in (("without_prefix_cache", 0), ("with_prefix_cache", 2048)):
        engine = Engine(model, variables, num_slots=8, max_len=max_len,
                        prefix_cache_tokens=cache_tokens).start()
        try:
            for warm in passes[:2]:  # compile what the run uses (and put the rubric in the cache)
                _drive(engine, warm, together=True)
            before = engine.metrics()
            seconds = _drive(engine, prompts, together=True)
            after = engine.metrics()
        finally:
            engine.stop()
        computed = after["prefill_tokens_computed"] - before["prefill_tokens_computed"]
        reused = after["prefill_tokens_reused"] - before["prefill_tokens_reused"]
        out[name] = {"seconds": seconds, "docs_per_s": docs / seconds,
                     "prefill_tokens_computed_per_doc": computed / docs,
                     "prefill_tokens_reused_per_doc": reused / docs,
                     "note": "per doc includes 1/docs token of the gate request that holds the "
                             "engine while the documents are submitted"}
    out["docs_per_s_ratio"] = (out["with_prefix_cache"]["docs_per_s"]
                               / out["without_prefix_cache"]["docs_per_s"])

    # batched vs one by one: distinct prompts (no prefix cache), one token each
    distinct = [p[400 - 100:] for p in prompts]  # ~170 tokens each; this engine has no prefix cache
    engine = Engine(model, variables, num_slots=8, max_len=max_len).start()
    try:
        batched = _measured(engine, distinct, together=True)
        single = _measured(engine, distinct, together=False)
    finally:
        engine.stop()
    tokens = sum(map(len, distinct))
    out["batched_prefill"] = {"prompts": len(distinct), "prompt_tokens": tokens,
                              "batched_tokens_per_s": tokens / batched,
                              "one_by_one_tokens_per_s": tokens / single,
                              "ratio": single / batched}
    return out


def _time_until_models(cmd: list[str], env: dict, port: int, log) -> float:
    import httpx

    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited with {proc.returncode}; see {log.name}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).status_code == 200:
                    return time.perf_counter() - start
            except httpx.TransportError:
                time.sleep(0.2)
    finally:
        proc.terminate()
        proc.wait(60)


def start_part(model_source: str, tiny_workdir: pathlib.Path, tmp: pathlib.Path) -> dict[str, Any]:
    """Cold (empty compile cache) vs warm start of `phi-jax serve` and `phi-jax sample`, once each."""
    from benchmarks.serve import _free_port

    cache = tmp / "compile-cache"
    env = dict(os.environ, PHI_JAX_COMPILE_CACHE=str(cache))
    out: dict[str, Any] = {"single_measurement": True}
    with open(tmp / "start.log", "w+") as log:
        for label in ("cold", "warm"):
            port = _free_port()
            cmd = [sys.executable, "-m", "phi_jax.cli", "serve", f"--model={model_source}",
                   "--host=127.0.0.1", f"--port={port}", "--log-level=warning"]
            out[f"serve_{label}_s"] = _time_until_models(cmd, env, port, log)
        out["serve_warm_over_cold"] = out["serve_warm_s"] / out["serve_cold_s"]
        sample_cache = tmp / "compile-cache-sample"
        env = dict(os.environ, PHI_JAX_COMPILE_CACHE=str(sample_cache))
        for label in ("cold", "warm"):
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "phi_jax.cli", "sample", f"--model={tiny_workdir}",
                            "--prompt=def add(", "--max-new-tokens=32", "--temperature=0"],
                           cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, check=True)
            out[f"sample_{label}_s"] = time.perf_counter() - start
    out["compile_cache_files"] = sum(1 for _ in cache.iterdir())
    return out


def run(quick: bool = False, model_source: str | None = None, start: bool = True) -> dict[str, Any]:
    from benchmarks.serve import _build, _load_model, _machine
    from phi_jax.cli import main as cli_main

    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        if model_source:
            model, variables, tokenizer = _load_model(model_source)
        else:
            model, variables, tokenizer = _build(tmp / "tiny", vocab=1024)
        results: dict[str, Any] = {
            "benchmark": "serve_prefill", "quick": quick, "machine": _machine(),
            "machine_note": "shared 2-core machine, loaded by other jobs while measuring",
            "model": model_source or "tiny preset, random weights",
            "prefill": prefill_part(model, variables, tokenizer, quick=quick)}
        if start:
            if model_source:  # the tiny workdir for `phi-jax sample`
                _build(tmp / "tiny", vocab=1024)
            assert cli_main(["convert", str(tmp / "tiny"), str(tmp / "tiny-workdir")]) == 0
            results["start"] = start_part("smollm2", tmp / "tiny-workdir", tmp)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = "serve_prefill" + ("_quick" if quick else "") + (
        f"_{pathlib.Path(model_source).stem.lower()}" if model_source else "")
    (RESULTS / f"{stem}.json").write_text(json.dumps(results, indent=2) + "\n")
    _plot(results, RESULTS / f"{stem}.png")
    print(json.dumps({k: v for k, v in results.items() if k != "machine"}, indent=2))
    return results


def _plot(results: dict[str, Any], path: pathlib.Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    p = results["prefill"]
    panels = [("prompt tokens computed / document",
               ["no prefix cache", "prefix cache"],
               [p["without_prefix_cache"]["prefill_tokens_computed_per_doc"],
                p["with_prefix_cache"]["prefill_tokens_computed_per_doc"]]),
              ("documents / s (1 token each)", ["no prefix cache", "prefix cache"],
               [p["without_prefix_cache"]["docs_per_s"], p["with_prefix_cache"]["docs_per_s"]]),
              ("prompt tokens / s", ["one by one", "batched"],
               [p["batched_prefill"]["one_by_one_tokens_per_s"], p["batched_prefill"]["batched_tokens_per_s"]])]
    if "start" in results:
        s = results["start"]
        panels.append(("seconds (single runs)", ["serve cold", "serve warm", "sample cold", "sample warm"],
                       [s["serve_cold_s"], s["serve_warm_s"], s["sample_cold_s"], s["sample_warm_s"]]))
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.6))
    for ax, (title, names, values) in zip(axes, panels):
        ax.bar(names, values, color=["gray"] + ["tab:blue"] * (len(values) - 1))
        ax.set_title(title, fontsize=10)
        ax.tick_params(axis="x", labelsize=8)
    m = results["machine"]
    common.save_figure(
        fig, path, f"prefill and start, {results['model']} — {m['device']} ({m['cpus']} cores, shared), "
                   f"{m['date'][:10]}", fontsize=10, dpi=100)
