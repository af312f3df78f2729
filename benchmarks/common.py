"""Shared helpers for the benchmarks: machine record, repeat statistics, JSON + PNG output, tables.

Every benchmark records the same `machine` block (CPU, thread settings, library versions, date and
the load average before and after), reports each figure as min/median/max over repeats, and writes
`<results_dir>/<name>.json` and `<name>.png`. A `--quick` run writes `<name>_quick.*`, so a smoke
run never overwrites the full numbers the README quotes.
"""

from __future__ import annotations

import datetime
import importlib
import json
import os
import pathlib
import platform
import statistics
import sys
import time
from typing import Any, Callable, Iterable, Sequence

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
_VERSIONED = ("jax", "jaxlib", "flax", "optax", "numpy", "torch", "transformers", "grain", "tokenizers")


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (platform.processor() is often just 'x86_64')."""
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def versions(names: Iterable[str] = _VERSIONED) -> dict[str, str]:
    """Versions of the libraries already imported or importable (missing ones are left out)."""
    out = {"python": sys.version.split()[0]}
    for name in names:
        try:
            out[name] = importlib.import_module(name).__version__
        except Exception:  # noqa: BLE001 - an absent optional library is simply not recorded
            continue
    return out


def _allocator() -> str:
    from phi_jax import allocator
    return allocator.current()


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on, including how busy the machine was when they started."""
    info: dict[str, Any] = {
        "platform": platform.platform(), "cpu": cpu_model(), "cpu_count": os.cpu_count(),
        "cpus_usable": usable_cores(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "load_average_start": list(os.getloadavg()),
        "env": {k: os.environ[k] for k in ("XLA_FLAGS", "JAX_PLATFORMS", "OMP_NUM_THREADS",
                                           "MKL_NUM_THREADS") if k in os.environ},
        "versions": versions(),
        # Both sides of every comparison run in this process or its children, so under the same one.
        "allocator": _allocator(),
    }
    try:
        import jax
        info["jax_backend"] = jax.default_backend()
        info["device"] = jax.devices()[0].device_kind
        info["jax_devices"] = jax.device_count()
    except Exception as e:  # noqa: BLE001 - recorded, not fatal: torch-only runs still work
        info["jax_backend"] = f"unavailable: {e}"
    if "torch" in sys.modules:
        info["torch_threads"] = sys.modules["torch"].get_num_threads()
    return info


def stats(samples: Sequence[float]) -> dict[str, Any]:
    """min / median / max of a list of measurements (the raw list is kept for re-analysis)."""
    if not samples:
        raise ValueError("no samples to summarise; run at least one repeat")
    return {"min": min(samples), "median": statistics.median(samples), "max": max(samples),
            "n": len(samples), "samples": list(samples)}


def rate_stats(seconds: Sequence[float], work: float) -> dict[str, Any]:
    """Throughput (work / s) over repeats: the fastest repeat gives the max rate."""
    return stats([work / s for s in seconds])


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """(wall seconds, result) of one call; the caller makes `fn` wait for its own results."""
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def usable_cores() -> int:
    """Cores this process may run on (taskset / cgroup affinity), which is what XLA:CPU sizes its
    thread pool by; os.cpu_count() ignores the affinity mask."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def reference_threads(quick: bool, probe: Callable[[], Any],
                      set_threads: Callable[[int], Any] | None = None
                      ) -> tuple[list[int], dict[str, float]]:
    """torch thread counts to measure the reference with, and the probe timings that chose them.

    Full runs measure both all cores (the "same thread count" as XLA:CPU, which uses every core)
    and 1 thread, because OpenMP's multi-thread barriers collapse when other processes share the
    cores; the ratio is then taken against the faster. Quick runs probe each count once with
    `probe` (already warmed up) and keep only the faster, to halve the reference's time.
    """
    if set_threads is None:  # the reference runs in this process
        import torch
        set_threads = torch.set_num_threads
    cores = usable_cores()
    counts = [cores, 1] if cores > 1 else [1]
    if not quick or len(counts) == 1:
        return counts, {}
    probe_s = {}
    for n in counts:
        set_threads(n)
        probe_s[n] = timed(probe)[0]
    set_threads(cores)
    return [min(probe_s, key=probe_s.get)], {f"{n} threads": s for n, s in probe_s.items()}


class ReferenceWorker:
    """A reference implementation (torch) in its own process, driven call by call.

    `factory(*args)` runs in a spawned child and returns an object; `call(method, threads, *a)`
    runs `getattr(obj, method)(*a)` there with torch on `threads` threads and returns
    (wall seconds, result). Why a process: torch and XLA:CPU in one process slowed each other down
    by up to 30 % (phi-100m train step: 8.6 s alone, 10-13 s beside torch). Callers still alternate
    their repeats between the two sides, so load from elsewhere hits both alike; the idle side
    blocks on a pipe and uses no CPU.
    """

    def __init__(self, factory: Callable[..., Any], *args: Any):
        import multiprocessing
        ctx = multiprocessing.get_context("spawn")  # never fork a process running XLA's threads
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_reference_worker_main, args=(child, factory, args),
                                 daemon=True)
        self._proc.start()
        self._receive()

    def _receive(self):
        kind, value = self._conn.recv()
        if kind == "error":
            raise RuntimeError(f"reference worker failed: {value}")
        return value

    def call(self, method: str, threads: int, *args: Any) -> tuple[float, Any]:
        self._conn.send(("call", method, threads, args))
        return self._receive()

    def close(self) -> None:
        try:
            self._conn.send(("stop",))
        except OSError:
            pass
        self._proc.join(timeout=60)
        if self._proc.is_alive():
            self._proc.kill()

    def __enter__(self) -> "ReferenceWorker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _reference_worker_main(conn, factory, args) -> None:
    try:
        import torch
        obj = factory(*args)
        conn.send(("ok", None))
        while True:
            message = conn.recv()
            if message[0] == "stop":
                return
            _, method, threads, call_args = message
            torch.set_num_threads(threads)
            conn.send(("ok", timed(lambda: getattr(obj, method)(*call_args))))
    except Exception as e:  # noqa: BLE001 - reported to the parent, which raises it
        conn.send(("error", f"{type(e).__name__}: {e}"))


def thread_label(n: int) -> str:
    return f"{n} thread{'s' if n > 1 else ''}"


def output_stem(name: str, quick: bool) -> str:
    return f"{name}_quick" if quick else name


def write_results(name: str, results: dict[str, Any], plot: Callable[[dict, pathlib.Path], None],
                  *, quick: bool, results_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """Writes <dir>/<stem>.json and <stem>.png; returns the JSON path."""
    out = pathlib.Path(results_dir) if results_dir is not None else RESULTS
    out.mkdir(parents=True, exist_ok=True)
    results.setdefault("machine", machine_info())
    results["machine"]["load_average_end"] = list(os.getloadavg())
    stem = output_stem(name, quick)
    path = out / f"{stem}.json"
    path.write_text(json.dumps(results, indent=2, default=_json_default) + "\n")
    import matplotlib
    matplotlib.use("Agg")
    plot(results, out / f"{stem}.png")
    return path


def _json_default(x):
    try:
        import numpy as np
        if isinstance(x, np.generic):
            return x.item()
    except ImportError:
        pass
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def subtitle(machine: dict[str, Any]) -> str:
    """One line for a figure: CPU, cores, load at start, date."""
    load = machine.get("load_average_start", [float("nan")])[0]
    return (f"{machine.get('cpu', '?')}, {machine.get('cpu_count')} cores (load {load:.1f}), "
            f"{machine.get('date', '')[:10]}")


def save_figure(fig, path: str | os.PathLike, title: str | None = None, *, dpi: int = 120,
                **title_kw: Any) -> None:
    """How every benchmark figure ends: an optional suptitle (the machine line, mostly), a tight
    layout, the PNG, and the figure closed, so a runner holding many results does not keep their
    figures alive. One place, so a change to how figures are written reaches all benchmarks."""
    import matplotlib.pyplot as plt

    if title is not None:
        fig.suptitle(title, **title_kw)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def format_number(x: float) -> str:
    """Readable at any magnitude: 1,323,062 / 522.0 / 3.17 / 0.0123."""
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    return f"{x:.3g}"


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str, str]]) -> str:
    """Plain-text table; columns are (key, header, format spec such as ',.0f', 's' or 'num')."""
    cells = [[h for _, h, _ in columns]]
    for row in rows:
        line = []
        for key, _, spec in columns:
            value = row.get(key)
            if value is None:
                line.append("-")
            elif spec == "num":
                line.append(format_number(value))
            else:
                line.append(format(value, spec) if spec else str(value))
        cells.append(line)
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def summary_row(benchmark: str, case: str, metric: str, ours: float | None, reference: float | None,
                reference_name: str, note: str = "", *, lower_is_better: bool = False) -> dict[str, Any]:
    """A row of the runner's combined table: medians, and a ratio that reads "higher is better"
    everywhere (the runner's plot and the docs' table compare ratios across benchmarks): ours /
    reference for a rate, reference / ours for a cost (`lower_is_better`: memory, seconds)."""
    if lower_is_better:
        ratio = reference / ours if ours and reference else None
    else:
        ratio = ours / reference if ours and reference else None
    return {"benchmark": benchmark, "case": case, "metric": metric, "phi_jax": ours,
            "reference": reference, "reference_name": reference_name, "ratio": ratio, "note": note}


SUMMARY_COLUMNS = [("benchmark", "benchmark", "s"), ("case", "case", "s"), ("metric", "metric", "s"),
                   ("phi_jax", "phi_jax", "num"), ("reference", "reference", "num"),
                   ("reference_name", "reference is", "s"), ("ratio", "ratio", ".2f")]
