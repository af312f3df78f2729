"""`phi-jax serve` under load: tokens/s and latency at concurrency 1, 8 and 32, against the same
requests run one by one through `phi_jax.generate`.

    python -m benchmarks.serve [--quick]
    python -m benchmarks.serve --model=smollm2      # the offline teacher: concurrency 1 and 16

The model is the "tiny" preset with random weights and a byte-level BPE trained in a second on a
few standard-library sources, saved as an HF directory and served by a real `phi-jax serve`
subprocess on 127.0.0.1 (so the client's Python does not share a GIL with the server). Every
request is greedy with its own prompt length; all runs send the same requests, so they produce the
same tokens and differ only in how they are scheduled. Requests are streamed, which gives the time
to first token as well as the end-to-end latency.

With `--model` (any `--model` source: the SmolLM2 GGUF alias, an HF dir, a workdir) the served model
is that one instead, at concurrency 1 and 16 — the teacher endpoint the curation stages talk to.

Writes benchmarks/results/serve.json and serve.png (serve_quick.* for --quick; serve_<name>.* with
--model).

`--part=prefill` measures prefill instead (`benchmarks.serve_prefill`): the prefix cache on
annotation-like prompts, batched vs one-by-one prefill, and cold vs warm starts.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import json.decoder
import os
import pathlib
import platform
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from typing import Any

from benchmarks import common

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
ROOT = pathlib.Path(__file__).resolve().parents[1]
CONCURRENCY = (1, 8, 32)
MODEL = "tiny-random"


def _machine() -> dict[str, Any]:
    import jax
    return {"backend": jax.default_backend(), "device": jax.devices()[0].device_kind,
            "cpus": os.cpu_count(), "platform": platform.platform(), "python": sys.version.split()[0],
            "jax": jax.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def _corpus() -> list[str]:
    """A little text every Python has: a few standard-library sources."""
    return [pathlib.Path(m.__file__).read_text() for m in (argparse, json.decoder, pathlib, textwrap)]


def _build(directory: pathlib.Path, vocab: int):
    """A random tiny Phi + trained tokenizer, saved as an HF directory; returns (model, vars, tok)."""
    import jax

    import phi_jax
    from phi_jax.config import preset
    from phi_jax.model import Phi, inference_layout, init_params
    from phi_jax.tokenizer import train_bpe

    tokenizer = train_bpe(_corpus(), vocab_size=vocab)
    config = preset("tiny", vocab_size=tokenizer.vocab_size, eos_token_id=tokenizer.eos_id)
    variables = init_params(config, jax.random.key(0))
    phi_jax.save_pretrained(directory, config, variables)
    tokenizer.save(directory)
    model, variables = inference_layout(Phi(config), variables)  # as `phi-jax serve` loads it
    return model, variables, tokenizer


def _requests(tokenizer, count: int, max_tokens: int) -> list[tuple[list[int], int]]:
    import numpy as np

    ids = tokenizer.encode("\n".join(_corpus()))
    rng = np.random.default_rng(0)
    out = []
    for length in rng.integers(8, 121, count):
        start = int(rng.integers(0, len(ids) - length))
        out.append((ids[start:start + int(length)], max_tokens))
    return out


def _stats(latencies: list[float], tokens: int, wall: float, ttft: list[float] | None = None) -> dict:
    import numpy as np

    row = {"requests": len(latencies), "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
           "latency_p50_s": float(np.percentile(latencies, 50)),
           "latency_p99_s": float(np.percentile(latencies, 99))}
    if ttft:
        row["ttft_p50_s"] = float(np.percentile(ttft, 50))
        row["ttft_p99_s"] = float(np.percentile(ttft, 99))
    return row


def _reference(model, variables, requests, eos: int) -> dict:
    """The same requests, one `phi_jax.generate` call each, in this process."""
    from phi_jax.inference.decode import generate, prompt_bucket

    seen = set()
    for prompt, m in requests:  # compile every (bucket, length) shape first
        if prompt_bucket(len(prompt)) not in seen:
            seen.add(prompt_bucket(len(prompt)))
            generate(model, variables, [prompt], max_new_tokens=m, stop_tokens=[eos])
    latencies, tokens, start = [], 0, time.perf_counter()
    for prompt, m in requests:
        t = time.perf_counter()
        tokens += len(generate(model, variables, [prompt], max_new_tokens=m, stop_tokens=[eos])[0])
        latencies.append(time.perf_counter() - t)
    return _stats(latencies, tokens, time.perf_counter() - start)


async def _load(url: str, requests, concurrency: int) -> dict:
    """Stream every request, at most `concurrency` in flight; collect latency and tokens."""
    import httpx

    gate = asyncio.Semaphore(concurrency)
    latencies, ttfts, tokens = [], [], 0

    async def one(client, prompt, max_tokens):
        nonlocal tokens
        body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                "stream": True, "stream_options": {"include_usage": True}}
        async with gate:
            start, first = time.perf_counter(), None
            async with client.stream("POST", "/v1/completions", json=body) as r:
                r.raise_for_status()
                async for line in r.aiter_lines():
                    if not line.startswith("data: {"):
                        continue
                    chunk = json.loads(line[6:])
                    if first is None and chunk["choices"]:
                        first = time.perf_counter()
                    if chunk.get("usage"):
                        tokens += chunk["usage"]["completion_tokens"]
            latencies.append(time.perf_counter() - start)
            ttfts.append((first or time.perf_counter()) - start)

    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(one(client, p, m) for p, m in requests))
        wall = time.perf_counter() - start
    return _stats(latencies, tokens, wall, ttfts)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(directory: pathlib.Path, port: int, slots: int, max_len: int, log, *, name: str = MODEL,
                  warmup: bool = True) -> subprocess.Popen:
    """`phi-jax serve` for the model at `directory` (any --model source) in a subprocess, once healthy."""
    import httpx

    cmd = [sys.executable, "-m", "phi_jax.cli", "serve", f"--model={directory}", "--host=127.0.0.1",
           f"--port={port}", f"--num-slots={slots}", f"--max-len={max_len}", f"--served-model-name={name}",
           "--max-queue=1024", "--log-level=warning"] + ([] if warmup else ["--no-warmup"])
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 900  # loading + compiling every prefill bucket
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}; see {log.name}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError("the server did not become healthy within 900 s")


def _load_model(source: str):
    """A real model as `phi-jax serve --model=source` loads it: (model, variables, tokenizer)."""
    from phi_jax.inference import loader
    from phi_jax.model import inference_layout

    loaded = loader.load(source)
    model, variables = inference_layout(loaded.model, loaded.variables)
    return model, variables, loader.require_tokenizer(loaded, source)


def run(quick: bool = False, model_source: str | None = None,
        results_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Runs the benchmark; returns (and writes) the results dict."""
    count, max_tokens, slots, max_len = (32, 32, 8, 256) if quick else (128, 64, 8, 256)
    concurrency = CONCURRENCY
    if model_source:  # a real model: fewer, longer-context requests; the teacher's concurrencies
        count, max_tokens, slots, max_len, concurrency = 32, 64, 16, 512, (1, 16)
    with tempfile.TemporaryDirectory() as tmp:
        directory = pathlib.Path(tmp) / "model"
        if model_source:
            directory = model_source
            model, variables, tokenizer = _load_model(model_source)
        else:
            model, variables, tokenizer = _build(directory, vocab=1024 if quick else 4096)
        requests = _requests(tokenizer, count, max_tokens)
        reference = _reference(model, variables, requests, tokenizer.eos_id)
        port = _free_port()
        with open(pathlib.Path(tmp) / "server.log", "w+") as log:
            proc = _start_server(directory, port, slots, max_len, log)
            try:
                url = f"http://127.0.0.1:{port}"
                asyncio.run(_load(url, requests[:slots], slots))  # warm the HTTP path
                rows = {c: asyncio.run(_load(url, requests, c)) for c in concurrency}
            finally:
                proc.terminate()
                proc.wait(60)
    results = {"benchmark": "serve", "quick": quick, "machine": _machine(),
               "setup": {"model": model_source or "tiny preset, random weights", "vocab": tokenizer.vocab_size,
                         "requests": count, "prompt_tokens": "8..120", "max_tokens": max_tokens,
                         "decode_slots": slots, "max_len": max_len, "greedy": True},
               "reference_generate_one_by_one": reference,
               "server": {str(c): row for c, row in rows.items()},
               "speedup_vs_reference": {str(c): row["tokens_per_s"] / reference["tokens_per_s"]
                                        for c, row in rows.items()}}
    out = pathlib.Path(results_dir) if results_dir is not None else RESULTS  # benchmarks.run --results-dir
    out.mkdir(parents=True, exist_ok=True)
    stem = f"serve_{pathlib.Path(model_source).stem.lower()}" if model_source else (
        "serve_quick" if quick else "serve")
    (out / f"{stem}.json").write_text(json.dumps(results, indent=2) + "\n")
    _plot(results, out / f"{stem}.png")
    _print_table(results)
    return results


def _plot(results: dict[str, Any], path: pathlib.Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["generate\none by one"] + [f"server\nc={c}" for c in results["server"]]
    rows = [results["reference_generate_one_by_one"]] + list(results["server"].values())
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.bar(names, [r["tokens_per_s"] for r in rows], color=["gray"] + ["tab:blue"] * (len(rows) - 1))
    ax1.set_ylabel("generated tokens / s")
    x = range(len(rows))
    ax2.bar([i - 0.2 for i in x], [r["latency_p50_s"] for r in rows], width=0.4, label="p50")
    ax2.bar([i + 0.2 for i in x], [r["latency_p99_s"] for r in rows], width=0.4, label="p99")
    ax2.set_xticks(list(x), names)
    ax2.set_ylabel("request latency (s)")
    ax2.legend()
    m, s = results["machine"], results["setup"]
    common.save_figure(
        fig, path, f"phi-jax serve, {s['requests']} greedy requests x {s['max_tokens']} tokens, "
                   f"{s['decode_slots']} slots — {m['device']} ({m['cpus']} cores), {m['date'][:10]}", dpi=100)


def _print_table(results: dict[str, Any]) -> None:
    print(f"{'run':<22}{'tokens/s':>10}{'p50 s':>9}{'p99 s':>9}{'ttft p50':>10}{'x ref':>8}")
    ref = results["reference_generate_one_by_one"]
    print(f"{'generate, one by one':<22}{ref['tokens_per_s']:>10.1f}{ref['latency_p50_s']:>9.3f}"
          f"{ref['latency_p99_s']:>9.3f}{'':>10}{1.0:>8.2f}")
    for c, row in results["server"].items():
        print(f"{'server, c=' + c:<22}{row['tokens_per_s']:>10.1f}{row['latency_p50_s']:>9.3f}"
              f"{row['latency_p99_s']:>9.3f}{row['ttft_p50_s']:>10.3f}"
              f"{results['speedup_vs_reference'][c]:>8.2f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="32 requests of 32 tokens (a few minutes)")
    parser.add_argument("--model", help="serve this model (any --model source, e.g. smollm2) instead "
                        "of a random tiny one; concurrency 1 and 16")
    parser.add_argument("--part", choices=("load", "prefill"), default="load",
                        help="load: tokens/s under concurrency (default); prefill: prefix cache, "
                             "batched prefill, cold vs warm start")
    parser.add_argument("--no-start", dest="start", action="store_false",
                        help="--part=prefill: skip the cold/warm start measurements")
    args = parser.parse_args(argv)
    if args.part == "prefill":
        from benchmarks import serve_prefill

        serve_prefill.run(quick=args.quick, model_source=args.model, start=args.start)
        return
    run(quick=args.quick, model_source=args.model)


if __name__ == "__main__":
    main()
