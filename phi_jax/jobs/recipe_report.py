"""The recipe's stage line and its report figure (time per stage beside the stage lines)."""

from __future__ import annotations

from typing import Any

from phi_jax.jobs.pipeline import ALREADY_DONE


def format_line(stage: str, out: dict) -> str:
    """`  filter         done                          3.2 s  40 -> 23 records`: one stage's status,
    time and the number that says whether it worked."""
    status = out["status"] + (" (already done)" if out.get("rerun") == ALREADY_DONE else "")
    detail = out.get("reason", "")
    if out["status"] == "done":
        r = out["result"]
        if "records_in" in r:
            detail = f"{r['records_in']:,} -> {r['records_out']:,} records"
        elif "kept" in r:
            detail = f"{r['kept']} of {r['asked']} kept"
        elif "pass@1" in r:
            detail = f"pass@1 {r['pass@1']:.3f} on {r['num_problems']} problems ({r['model']})"
        elif "heldout" in r and r["heldout"]:
            detail = f"held-out loss {r['heldout'][-1]['loss']:.3f} after {r.get('steps')} steps"
        elif "f1" in r:
            detail = f"F1 {r['f1']:.2f} (majority baseline {r['baseline_f1']:.2f}) on {r['test']} held out"
    return f"  {stage:<14} {status:<26} {out.get('seconds', 0):>7.1f} s  {detail}"


def plot_report(report: dict[str, Any], path) -> None:
    """report.png: seconds per stage (grey: skipped) and the stage lines, so one image tells the run."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from phi_jax import fileio

    stages = list(report["stages"])
    seconds = [report["stages"][s].get("seconds", 0) for s in stages]
    colors = ["tab:green" if report["stages"][s]["status"] == "done" else "tab:gray" for s in stages]
    fig, (ax, text) = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [3, 2]})
    ax.barh(stages[::-1], seconds[::-1], color=colors[::-1])
    ax.set_xlabel("seconds (grey: skipped)")
    ax.set_title(f"phi-jax recipe: {sum(seconds) / 60:.1f} min of stages")
    lines = [format_line(s, report["stages"][s]).strip() for s in stages]
    text.axis("off")
    text.text(0, 1, "\n".join(line[:80] for line in lines), va="top", family="monospace", fontsize=7)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    fileio.atomic_write_bytes(path, buffer.getvalue())
