"""Attention kernels: forward and forward+backward time and TFLOP/s, pallas vs XLA vs cuDNN.

    python -m benchmarks.kernels [--quick]

Full run (meant for one GPU or TPU): bf16, causal, T in 512..8192, head dims 64/80/128, 16 query
heads (MHA), B*T = 16k tokens per call. Every implementation is measured in the same process on
the same inputs; cuDNN only where the backend is a GPU. `--quick` runs tiny sizes (on CPU the
Pallas kernel runs in interpret mode, so its numbers only show that it runs).

FLOPs are counted honestly: only the (query, key) pairs that causality leaves visible,
P = B*N*T*(T+1)/2, at 4*P*H for the forward (QK^T and PV) and 12*P*H for forward+backward (the
backward's dV, dP, dQ, dK; the recomputation of S in the backward is *not* counted, so a
recomputing kernel gets no credit for it).

Writes benchmarks/results/kernels.json and kernels.png (kernels_quick.* for --quick, so a smoke
run never overwrites accelerator numbers).
"""

from __future__ import annotations

import argparse
import pathlib
import time
from typing import Any, Sequence

from benchmarks import common

NAME = "kernels"
TOKENS_PER_CALL = 16384
HEADS = 16
FULL = {"lengths": (512, 1024, 2048, 4096, 8192), "head_dims": (64, 80, 128), "repeats": 10}
QUICK = {"lengths": (64, 128), "head_dims": (64, 80), "repeats": 2}


def visible_pairs(batch: int, heads: int, length: int, causal: bool) -> int:
    """Number of (query, key) score entries that are not masked."""
    per_head = length * (length + 1) // 2 if causal else length * length
    return batch * heads * per_head


def _seconds(fn, args, repeats: int) -> list[float]:
    import jax
    jax.block_until_ready(fn(*args))  # compile and warm up
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        out.append(time.perf_counter() - start)
    return out


def measure(impl: str, batch: int, length: int, head_dim: int, causal: bool,
            repeats: int) -> dict[str, Any]:
    """One row: forward and forward+backward time (min/median/max over repeats) and TFLOP/s."""
    import jax
    import jax.numpy as jnp
    from phi_jax.kernels import attention

    ks = jax.random.split(jax.random.key(0), 4)
    shape = (batch, length, HEADS, head_dim)
    q, k, v, d_out = (jax.random.normal(key, shape, jnp.bfloat16) for key in ks)
    attend = lambda q, k, v: attention(q, k, v, causal=causal, impl=impl)
    forward = jax.jit(attend)

    @jax.jit
    def forward_backward(q, k, v, d_out):
        _, vjp = jax.vjp(attend, q, k, v)
        return vjp(d_out)

    row: dict[str, Any] = {"impl": impl, "T": length, "H": head_dim, "B": batch, "N": HEADS,
                           "causal": causal}
    try:
        fwd_s = _seconds(forward, (q, k, v), repeats)
        both_s = _seconds(forward_backward, (q, k, v, d_out), repeats)
    except Exception as err:  # noqa: BLE001 - an implementation that cannot run here is reported
        row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
        return row
    pairs = visible_pairs(batch, HEADS, length, causal)
    row.update(fwd_ms=common.stats([1e3 * x for x in fwd_s]),
               fwd_bwd_ms=common.stats([1e3 * x for x in both_s]),
               fwd_tflops=common.rate_stats(fwd_s, 4 * pairs * head_dim / 1e12),
               fwd_bwd_tflops=common.rate_stats(both_s, 12 * pairs * head_dim / 1e12))
    return row


def _summary(rows: list[dict[str, Any]], impls: Sequence[str]) -> list[dict[str, Any]]:
    """pallas against each other implementation at the longest T of every head dim."""
    ok = {(r["impl"], r["H"], r["T"]): r for r in rows if "error" not in r}
    out = []
    for head_dim in sorted({r["H"] for r in rows}):
        length = max(r["T"] for r in rows if r["H"] == head_dim)
        ours = ok.get(("pallas", head_dim, length))
        for ref in (i for i in impls if i != "pallas"):
            theirs = ok.get((ref, head_dim, length))
            for key, what in (("fwd_tflops", "fwd"), ("fwd_bwd_tflops", "fwd+bwd")):
                out.append(common.summary_row(
                    NAME, f"causal attention {what}, T={length}, H={head_dim}", "TFLOP/s",
                    ours and ours[key]["median"], theirs and theirs[key]["median"], ref,
                    note="Pallas in interpret mode" if ours and ours.get("interpret") else ""))
    return out


def run(quick: bool = False, results_dir: str | pathlib.Path | None = None, *,
        lengths: Sequence[int] | None = None, head_dims: Sequence[int] | None = None,
        repeats: int | None = None) -> dict[str, Any]:
    """Runs the benchmark; returns (and writes) the results dict. The keyword arguments override
    the sizes (the unit test uses the smallest)."""
    import jax
    machine = common.machine_info()
    sizes = QUICK if quick else FULL
    lengths = lengths or sizes["lengths"]
    head_dims = head_dims or sizes["head_dims"]
    repeats = repeats or sizes["repeats"]
    backend = jax.default_backend()
    impls = ["xla", "pallas"] + (["cudnn"] if backend == "gpu" else [])
    rows = []
    for head_dim in head_dims:
        for length in lengths:
            batch = 1 if quick else max(1, TOKENS_PER_CALL // length)
            for impl in impls:
                row = measure(impl, batch, length, head_dim, True, repeats)
                row["interpret"] = impl == "pallas" and backend == "cpu"
                rows.append(row)
    results = {"benchmark": NAME, "quick": quick, "machine": machine, "dtype": "bfloat16",
               "heads": HEADS,
               "flops": "causal visible pairs P = B*N*T*(T+1)/2: forward 4*P*H, "
                        "forward+backward 12*P*H (the backward's recomputation is not counted)",
               "interpret_mode": backend == "cpu", "rows": rows,
               "summary": _summary(rows, impls)}
    if backend != "gpu":
        results["cudnn"] = f"not measured: needs a GPU (backend is {backend})"
    results["json"] = str(common.write_results(NAME, results, _plot, quick=quick,
                                               results_dir=results_dir))
    _print_table(results)
    return results


def _plot(results: dict[str, Any], path: pathlib.Path) -> None:
    import matplotlib.pyplot as plt

    head_dims = sorted({r["H"] for r in results["rows"]})
    fig, axes = plt.subplots(1, len(head_dims), figsize=(4.5 * len(head_dims), 3.8), squeeze=False)
    for ax, head_dim in zip(axes[0], head_dims):
        for impl in sorted({r["impl"] for r in results["rows"]}):
            ok = [r for r in results["rows"] if r["H"] == head_dim and r["impl"] == impl
                  and "error" not in r]
            if not ok:
                continue
            lengths = [r["T"] for r in ok]
            line, = ax.plot(lengths, [r["fwd_tflops"]["median"] for r in ok], "o-",
                            label=f"{impl} fwd")
            ax.plot(lengths, [r["fwd_bwd_tflops"]["median"] for r in ok], "s--",
                    color=line.get_color(), label=f"{impl} fwd+bwd")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length T")
        ax.set_ylabel("TFLOP/s (causal pairs only)")
        ax.set_title(f"head dim {head_dim}", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    m = results["machine"]
    mode = " (Pallas in interpret mode)" if results["interpret_mode"] else ""
    common.save_figure(
        fig, path, f"Causal attention, bf16, {results['heads']} heads, {m.get('device', '?')}{mode}"
                   f"\n{common.subtitle(m)}", fontsize=9, dpi=110)


def _print_table(results: dict[str, Any]) -> None:
    columns = [("impl", "impl", "s"), ("H", "H", "d"), ("T", "T", "d"), ("B", "B", "d"),
               ("fwd_ms", "fwd ms", ".3f"), ("fwd_tf", "fwd TF/s", ".4f"),
               ("bwd_ms", "fwd+bwd ms", ".3f"), ("bwd_tf", "fwd+bwd TF/s", ".4f"),
               ("error", "error", "s")]
    flat = []
    for r in results["rows"]:
        row = {k: r[k] for k in ("impl", "H", "T", "B")}
        if "error" in r:
            row["error"] = r["error"][:60]
        else:
            row.update(fwd_ms=r["fwd_ms"]["median"], fwd_tf=r["fwd_tflops"]["median"],
                       bwd_ms=r["fwd_bwd_ms"]["median"], bwd_tf=r["fwd_bwd_tflops"]["median"])
        flat.append(row)
    print(common.format_table(flat, columns))
    if "cudnn" in results:
        print(f"cudnn: {results['cudnn']}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes; a smoke run on CPU")
    parser.add_argument("--results-dir", help="write here instead of benchmarks/results")
    args = parser.parse_args(argv)
    run(quick=args.quick, results_dir=args.results_dir)


if __name__ == "__main__":
    main()
