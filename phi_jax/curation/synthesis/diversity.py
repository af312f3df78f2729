"""The diversity report of a synthesis run: what was planned, what was kept, and how varied it is.

    report = diversity_report(plan, generated_manifest, gated_manifest, kept_records, embedder=e)
    plot_report(report, "report.png")

Measured on the kept set (after execution and the gates), against the plan:
  * coverage: share of each topic kind, audience and style, planned and kept, beside the target;
    distinct topics planned and kept;
  * distinct-1/2/3: distinct word n-grams / all word n-grams over the whole set;
  * openings: share of records whose first N words are those of another record, and the most
    common openings;
  * embedding spread: mean pairwise cosine distance of the records' embeddings (mean-pooled
    hidden states, `phi_jax.inference.embed.Embedder`, the model recipe I's classifier uses);
  * tokens per record, from the teacher's `usage` (completion tokens); words per record;
  * outcomes: dropped by reason (teacher, execution, gates), flagged, teacher usage.
"""

from __future__ import annotations

import collections
import datetime
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from phi_jax.curation.core.text import words
from phi_jax.curation.synthesis import output_gates

_MAX_EMBEDDED = 2000  # pairwise distances of at most this many records (a seeded sample beyond)


def _percentiles(values: Sequence[float]) -> dict[str, float]:
    if not values:
        return {"mean": 0.0, "p50": 0.0, "p90": 0.0, "max": 0.0, "total": 0}
    a = np.asarray(values, np.float64)
    return {"mean": round(float(a.mean()), 2), "p50": float(np.percentile(a, 50)),
            "p90": float(np.percentile(a, 90)), "max": float(a.max()), "total": int(a.sum())}


def coverage(plan, kept: Sequence[dict], generated: int) -> dict[str, Any]:
    items, targets = plan.items(), plan.targets()
    out: dict[str, Any] = {}
    for axis, of_item, of_meta in (("topic_kind", lambda i: i.topic.kind, "topic_kind"),
                                   ("audience", lambda i: i.audience, "audience"),
                                   ("style", lambda i: i.style, "style")):
        planned = collections.Counter(of_item(i) for i in items)
        got = collections.Counter(r["meta"].get(of_meta) for r in kept)
        out[axis] = {name: {"target": round(share, 4), "planned": planned[name],
                            "planned_share": round(planned[name] / len(items), 4), "kept": got[name],
                            "kept_share": round(got[name] / len(kept), 4) if kept else 0.0}
                     for name, share in targets[axis].items()}
        out[f"{axis}_max_share_error_planned"] = round(max(
            abs(v["planned_share"] - v["target"]) for v in out[axis].values()), 4)
    out["topics"] = {"available": len(plan.topics), "planned_distinct": len({i.topic.text for i in items}),
                     "kept_distinct": len({r["meta"].get("topic") for r in kept})}
    out["records"] = {"planned": len(items), "generated": generated, "kept": len(kept)}
    return out


def embedding_spread(texts: Sequence[str], embedder, *, seed: int = 0) -> dict[str, Any]:
    """Mean pairwise cosine distance (1 - cos) over pairs of distinct records, and its histogram."""
    if len(texts) < 2:
        return {"skipped": f"{len(texts)} record(s): no pairs"}
    index = np.arange(len(texts))
    if len(texts) > _MAX_EMBEDDED:
        index = np.sort(np.random.default_rng(seed).choice(len(texts), _MAX_EMBEDDED, replace=False))
    x = np.asarray(embedder([texts[i] for i in index]), np.float64)
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    distance = 1.0 - x @ x.T
    pairs = distance[np.triu_indices(len(index), k=1)]
    counts, edges = np.histogram(pairs, bins=20, range=(0.0, max(1.0, float(pairs.max()))))
    return {"documents": int(len(index)), "mean_pairwise_cosine_distance": round(float(pairs.mean()), 5),
            "min": round(float(pairs.min()), 5), "max": round(float(pairs.max()), 5),
            "histogram": {"counts": counts.tolist(), "edges": [round(float(e), 4) for e in edges]}}


def diversity_report(plan, generated: dict, gated: dict, kept: Sequence[dict], *, config: output_gates.GateConfig,
                     teacher: dict[str, Any], embedder=None, embedder_name: str | None = None,
                     sandbox: str | None = None) -> dict[str, Any]:
    """The report (JSON-able) of one run; `generated` / `gated` are the two stages' manifests."""
    tokens = [words(r["text"]) for r in kept]
    openings = collections.Counter(output_gates.opening(t, config.opening_words) for t in tokens)
    repeated = sum(n for n in openings.values() if n > 1)
    gen_counts, gate_counts = generated["counts"], gated["counts"]
    flags = {k[len("flagged_"):]: v for k, v in gate_counts["stage"].items() if k.startswith("flagged_")}
    usage = {k[len("teacher_"):]: v for k, v in gen_counts["stage"].items() if k.startswith("teacher_")}
    completion = [(r["meta"].get("teacher") or {}).get("completion_tokens", 0) for r in kept]
    report: dict[str, Any] = {
        "kind": plan.kind, "seed": plan.seed, "teacher": teacher,
        "date": datetime.date.today().isoformat(),
        "plan": {"count": plan.count, "sha256": plan.sha256, "topic_source": plan.topic_source,
                 **{k: v for k, v in plan.parameters().items() if k not in ("kind", "count", "seed", "topics")}},
        "counts": {"planned": plan.count, "generated": gen_counts["records_out"], "kept": len(kept),
                   "dropped": {**gen_counts["dropped"], **gate_counts["dropped"]}, "flagged": flags},
        "coverage": coverage(plan, kept, gen_counts["records_out"]),
        "distinct": {f"distinct_{n}": round(output_gates.distinct_n(tokens, n), 4) for n in (1, 2, 3)},
        "openings": {"words": config.opening_words,
                     "share_repeated": round(repeated / len(kept), 4) if kept else 0.0,
                     "top": [[" ".join(o), n] for o, n in openings.most_common(5) if n > 1]},
        "tokens_per_record": {"source": "teacher usage (completion_tokens)", **_percentiles(completion)},
        "words_per_record": _percentiles([len(t) for t in tokens]),
        "teacher_usage": usage,
        "gates": output_gates.gates_run(config),
    }
    if plan.kind == "exercises":
        executed = gen_counts["stage"].get("executed", 0)
        passed = gen_counts["stage"].get("passed", 0)
        report["execution"] = {"executed": executed,
                               "passed": passed, "pass_rate_of_executed": round(passed / executed, 4)
                               if executed else 0.0, "sandbox": sandbox}
    if embedder is None:
        report["embedding"] = {"skipped": "no --embedder given"}
    else:
        report["embedding"] = {"model": embedder_name, **embedding_spread([r["text"] for r in kept], embedder,
                                                                         seed=plan.seed)}
    report["warnings"] = _warnings(report)
    return report


def _warnings(report: dict) -> list[str]:
    out = []
    kept = report["counts"]["kept"]
    if kept < 0.5 * report["counts"]["planned"]:
        out.append(f"only {kept} of {report['counts']['planned']} planned records were kept")
    if report["openings"]["share_repeated"] > 0.1:
        out.append(f"{report['openings']['share_repeated']:.0%} of records share their opening with another")
    if report["distinct"]["distinct_2"] < 0.2:
        out.append(f"distinct-2 is {report['distinct']['distinct_2']:.3f}: the set repeats itself")
    return out


def summary_lines(report: dict) -> list[str]:
    """A few lines for the end of the CLI's summary."""
    d, o, c = report["distinct"], report["openings"], report["counts"]
    lines = [f"  kept        {c['kept']:,} of {c['planned']:,} planned ({c['generated']:,} generated)",
             f"  distinct    1: {d['distinct_1']:.3f}  2: {d['distinct_2']:.3f}  3: {d['distinct_3']:.3f};  "
             f"{o['share_repeated']:.1%} share their first {o['words']} words",
             f"  tokens/rec  mean {report['tokens_per_record']['mean']:.0f}, p90 "
             f"{report['tokens_per_record']['p90']:.0f} (teacher usage)"]
    e = report["embedding"]
    if "mean_pairwise_cosine_distance" in e:
        lines.append(f"  embeddings  mean pairwise cosine distance {e['mean_pairwise_cosine_distance']:.4f} "
                     f"({e['documents']} records, {e['model']})")
    if "execution" in report:
        x = report["execution"]
        lines.append(f"  executed    {x['passed']} of {x['executed']} passed their own check")
    lines += [f"  warning     {w}" for w in report["warnings"]]
    return lines


def plot_report(report: dict, path: str | Path) -> None:
    """Coverage, outcomes, distinct-n, tokens per record and embedding distances in one PNG."""
    from phi_jax.errors import require

    require("matplotlib", extra="data", purpose="the synthesis report's PNG")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(16, 9))
    cov = report["coverage"]
    for ax, axis in ((axes[0, 0], "audience"), (axes[0, 1], "style")):
        names = list(cov[axis])
        x = np.arange(len(names))
        ax.bar(x - 0.27, [cov[axis][n]["target"] for n in names], 0.27, label="target", color="#bbbbbb")
        ax.bar(x, [cov[axis][n]["planned_share"] for n in names], 0.27, label="planned", color="#4c72b0")
        ax.bar(x + 0.27, [cov[axis][n]["kept_share"] for n in names], 0.27, label="kept", color="#55a868")
        ax.set_xticks(x, names, rotation=20, ha="right", fontsize=8)
        ax.set_ylabel("share of records")
        ax.set_title(f"{axis} coverage")
        ax.legend(fontsize=8)
    outcomes = {"kept": report["counts"]["kept"], **report["counts"]["dropped"]}
    ax = axes[0, 2]
    ax.barh(list(outcomes), list(outcomes.values()), color=["#55a868"] + ["#c44e52"] * (len(outcomes) - 1))
    ax.set_title(f"outcomes of {report['counts']['planned']} prompts")
    ax.tick_params(axis="y", labelsize=8)
    ax = axes[1, 0]
    d = report["distinct"]
    ax.bar(list(d) + ["repeated opening"], list(d.values()) + [report["openings"]["share_repeated"]],
           color=["#4c72b0"] * 3 + ["#dd8452"])
    ax.set_ylim(0, 1)
    ax.set_title("distinct n-grams / share with a repeated opening")
    ax = axes[1, 1]
    ax.set_title("tokens per record (teacher usage)")
    t = report["tokens_per_record"]
    ax.bar(["mean", "p50", "p90", "max"], [t["mean"], t["p50"], t["p90"], t["max"]], color="#8172b2")
    ax = axes[1, 2]
    e = report["embedding"]
    if "histogram" in e:
        edges = np.asarray(e["histogram"]["edges"])
        ax.bar(edges[:-1], e["histogram"]["counts"], width=np.diff(edges), align="edge", color="#64b5cd")
        ax.set_title(f"pairwise cosine distance (mean {e['mean_pairwise_cosine_distance']:.3f})")
    else:
        ax.text(0.5, 0.5, f"embedding spread: {e.get('skipped', 'n/a')}", ha="center", va="center")
        ax.set_axis_off()
    teacher = report["teacher"].get("model", "?")
    fig.suptitle(f"phi-jax data synthesize --kind={report['kind']}: teacher {teacher}, "
                 f"{report['counts']['kept']} kept of {report['counts']['planned']} planned ({report['date']})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
