"""The one-screen report a training run ends with (and what a rerun of a finished run prints).

A single batch's loss is noise (the tiny main job's last logged losses range over 4.7-6.6), so the
report gives the mean of the last tenth of the steps with its spread, and the held-out loss, which
is what a run should be judged by.
"""

from __future__ import annotations

import math
from typing import Any


def smoothed(losses: list[float], fraction: float = 0.1) -> tuple[float, float, int] | None:
    """(mean, std, n) of the finite losses in the last `fraction` of the list (at least 10)."""
    finite = [x for x in losses if math.isfinite(x)]
    if not finite:
        return None
    tail = finite[-max(10, int(len(finite) * fraction)):]
    mean = sum(tail) / len(tail)
    std = math.sqrt(sum((x - mean) ** 2 for x in tail) / len(tail))
    return mean, std, len(tail)


def format_summary(summary: dict[str, Any]) -> str:
    start, end, total = summary["start_step"], summary["end_step"], summary["total_steps"]
    losses = summary["losses"]
    lines = []
    if not losses:
        lines.append(f"nothing to train: {summary['workdir']} is already at step {end} of {total}")
    else:
        lines.append(f"trained steps {start}..{end} of {total} in {summary['workdir']}")
        lines.append(f"  train loss       {losses[0]:.3f} at step {start} -> {losses[-1]:.3f} at step "
                     f"{end - 1} (one batch each)")
        tail = smoothed(losses)
        if tail:
            lines.append(f"  smoothed loss    {tail[0]:.3f} ± {tail[1]:.3f} (mean ± std of the last "
                         f"{tail[2]} steps)")
    if summary["heldout"]:
        last = summary["heldout"][-1]
        curve = ", ".join(f"{h['loss']:.3f}@{h['step']}" for h in summary["heldout"][-4:])
        lines.append(f"  held-out loss    {last['loss']:.3f} (perplexity {math.exp(last['loss']):.1f}) "
                     f"at step {last['step']}, {summary['heldout_tokens']:,} tokens; curve: {curve}")
    else:
        lines.append("  held-out loss    - (no held-out split: data.heldout_fraction or "
                     "train.eval_batches is 0, or the data is too small)")
    if summary["nonfinite_total"]:
        lines.append(f"  skipped steps    {summary['nonfinite_total']} (non-finite loss, gradient or "
                     "update)")
    stats = summary.get("data_stats") or {}
    skipped = sum(stats.get(k, 0) for k in ("bad_utf8", "bad_json", "missing_field", "empty", "too_long"))
    if losses:
        lines.append(f"  data             {stats.get('documents', 0):,} documents, "
                     f"{stats.get('tokens', 0):,} tokens read; {skipped} skipped, "
                     f"{stats.get('long_documents', 0)} over max_document_chars")
    lines.append(f"  checkpoints      steps {summary['checkpoints']}")
    return "\n".join(lines)
