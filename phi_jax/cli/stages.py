"""The main job's stages: curate (annotate -> filter -> dedup -> decontaminate) -> pack -> train -> held-out.

`phi-jax train` runs the curation stages of `config.curation` over `config.data` into
WORKDIR/curated/<stage> (skipped when already complete, resumed when interrupted), points the
training data at the last stage's shards, trains, and prints one line per stage: documents and
tokens in -> out, and time. Curation lives in `phi_jax.curation.chain`, training in
`phi_jax.training.loop`; only the CLI wires the two (the library's `train()` trains on `config.data`
as given).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
STAGES_HEADER = "stages: documents and tokens in and out, time"


def curation_inputs(data) -> tuple[str, str]:
    """(inputs for the first stage, its text field) from the `data` config."""
    if data.source == "default":
        return "default", "text"
    return data.paths, data.jsonl_field


def curation_applies(config) -> tuple[bool, str]:
    """(whether `phi-jax train` curates this config's data, why not)."""
    c = config.curation
    if not c.enabled:
        return False, "--config.curation.enabled=False: training on data.* as given"
    sources = [s.strip() for s in c.sources.split(",") if s.strip()]
    if config.data.source not in sources:
        return False, (f"data.source={config.data.source} is not in curation.sources ({c.sources}): "
                       "training on it as given; add it to --config.curation.sources to curate it")
    return True, ""


def curate_for_training(config, workdir: Path, *, progress: bool = True) -> list:
    """Run the enabled curation stages and point `config.data` at their output; returns their lines
    ([] when curation does not apply, see `curation_applies`).

    Multi-host: process 0 curates while the others wait, then every process finds the stages
    complete (and skips them), so all read the same shards.
    """
    if not curation_applies(config)[0]:
        return []
    import jax

    from phi_jax.curation.core.chain import TokenCounter, curate, format_line
    from phi_jax.training.loop import run_tokenizer

    workdir.mkdir(parents=True, exist_ok=True)
    tokenizer = run_tokenizer(config, workdir)
    inputs, text_field = curation_inputs(config.data)

    def run():
        return curate(config.curation, inputs, workdir / "curated", count_tokens=TokenCounter(tokenizer),
                      text_field=text_field, max_records=config.data.max_documents, progress=progress,
                      on_line=lambda line: log.info("curation:%s", format_line(line)))

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        result = run() if jax.process_index() == 0 else None
        multihost_utils.sync_global_devices("phi_jax curation")
        if result is None:
            result = run()
    else:
        result = run()
    if result.files:
        config.data.update(source="jsonl", paths=",".join(result.files), jsonl_field="text",
                           max_documents=0)
    return result.lines


def training_lines(summary: dict[str, Any], config, seconds: float) -> list[dict[str, Any]]:
    """The pack, train and held-out lines of a finished `train()` call (as dicts, for the JSON too)."""
    tc = config.train
    steps = summary["end_step"] - summary["start_step"]
    stats = summary.get("data_stats") or {}  # restored with the checkpoint: counts since step 0
    rows = summary["end_step"] * tc.batch_size  # so the rows are counted since step 0 too
    held = summary["heldout"]
    heldout_s = summary.get("heldout_seconds", 0.0)
    losses = [x for x in summary["losses"] if math.isfinite(x)]
    return [
        {"stage": "pack", "documents_in": stats.get("documents", 0), "tokens_in": stats.get("tokens", 0),
         "rows_out": rows, "tokens_out": rows * tc.seq_len,
         "note": f"{rows:,} rows of {tc.seq_len} since step 0 (first-fit, in the Grain pipeline, during training)"},
        {"stage": "train", "steps": [summary["start_step"], summary["end_step"]],
         "tokens_in": steps * tc.batch_size * tc.seq_len, "seconds": round(max(0.0, seconds - heldout_s), 3),
         "loss": [losses[0], losses[-1]] if losses else None},
        {"stage": "heldout", "tokens_in": summary.get("heldout_tokens", 0),
         "loss": held[-1]["loss"] if held else None, "evaluations": len(held),
         "seconds": heldout_s},
    ]


def format_training_line(line: dict[str, Any]) -> str:
    from phi_jax.curation.core.chain import human_count

    name = line["stage"]
    if name == "pack":
        docs = f"{human_count(line['documents_in'])} -> {human_count(line['rows_out'])} rows"
        tokens = f"{human_count(line['tokens_in'])} -> {human_count(line['tokens_out'])} tokens"
        return f"  {'pack':<14} {docs:<24} {tokens:<28} {'-':>8}  {line['note']}"
    if name == "train":
        a, b = line["steps"]
        loss = f"loss {line['loss'][0]:.2f} -> {line['loss'][1]:.2f}" if line["loss"] else "nothing to train"
        return (f"  {'train':<14} {f'steps {a} -> {b}':<24} {human_count(line['tokens_in']) + ' tokens':<28} "
                f"{line['seconds']:>6.1f} s  {loss}")
    loss = "-" if line["loss"] is None else f"loss {line['loss']:.3f} (perplexity {math.exp(line['loss']):.1f})"
    return (f"  {'held-out eval':<14} {str(line['evaluations']) + ' evaluations':<24} "
            f"{human_count(line['tokens_in']) + ' tokens':<28} {line['seconds']:>6.1f} s  {loss}")


def stage_report(curation_lines: list, summary: dict[str, Any], config, seconds: float
                 ) -> tuple[str, list[dict[str, Any]]]:
    """(the printed table, its rows as dicts) for the whole job."""
    import dataclasses

    from phi_jax.curation.core.chain import format_line

    rows = [dataclasses.asdict(line) for line in curation_lines]
    text = [STAGES_HEADER] + [format_line(line) for line in curation_lines]
    if not curation_lines:
        text.append(f"  curation       off ({curation_applies(config)[1]})")
    extra = training_lines(summary, config, seconds)
    text += [format_training_line(line) for line in extra]
    return "\n".join(text), rows + extra
