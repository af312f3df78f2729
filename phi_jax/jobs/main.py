"""The main job: curate (annotate -> filter -> dedup -> decontaminate) -> pack -> train -> held-out.

    result = train("configs/tiny.py:runlocal", workdir="runs/tiny", overrides={"train.steps": 20})

What `phi-jax train` runs. The curation stages of `config.curation` run over `config.data` into
WORKDIR/curated/<stage> (skipped when already complete, resumed when interrupted; see
`phi_jax.jobs.curate`), the training data is pointed at the last stage's shards, the trainer
(`phi_jax.training.loop.train`, which trains on `config.data` as given) runs or resumes, and the
result holds one line per stage: documents and tokens in -> out, and time. Every path under the
workdir goes through `phi_jax.fileio`, so `workdir="gs://bucket/run"` writes only to the bucket.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import Any, Mapping

from phi_jax import fileio
from phi_jax.jobs.config import ConfigLike, resolve

log = logging.getLogger(__name__)
STAGES_HEADER = "stages: documents and tokens in and out, time"


@dataclasses.dataclass
class TrainResult:
    """What a training run did: its steps and losses, one row per stage, and the paths it wrote.

    `summary` is the trainer's own summary (every field `phi-jax train` prints as JSON); `table`
    the stage table it prints; `paths`: workdir, checkpoints, metrics, tokenizer and (when the
    data was curated) curated, as strings (local paths or gs:// URLs).
    """

    workdir: str
    start_step: int
    end_step: int
    total_steps: int
    losses: list[float]
    heldout: list[dict]
    stages: list[dict]
    table: str
    paths: dict[str, str]
    summary: dict[str, Any]

    @property
    def final_loss(self) -> float | None:
        """The last training loss of this call (None when it had nothing left to train)."""
        return self.losses[-1] if self.losses else None

    @property
    def finished(self) -> bool:
        return self.end_step >= self.total_steps

    def to_json(self) -> dict[str, Any]:
        """The JSON line `phi-jax train` prints last: the summary, first/last loss, the stages."""
        out = {k: v for k, v in self.summary.items() if k != "losses"}
        if self.losses:
            out.update(first_loss=self.losses[0], last_loss=self.losses[-1])
        out["stages"] = self.stages
        return out


def train(config: ConfigLike, *, workdir: str, overrides: Mapping[str, Any] | None = None) -> TrainResult:
    """Curate (when the config asks) and train or resume the run in `workdir`; a rerun continues it.

    The trainer is a function, not a command, so a notebook or a launcher runs exactly what
    `phi-jax train` runs (the CLI only parses its flags into these arguments).

    Args:
      config: a config file (`"configs/tiny.py"` or `"configs/tiny.py:runlocal"`) or a ConfigDict
        (copied, never changed).
      workdir: the run directory, local or gs://; it is resumed if it holds a run.
      overrides: `{"train.steps": 2, ...}`, checked as `--config.train.steps=2` is (an unknown key
        is a ConfigError naming it).
    """
    from phi_jax.training import config_file

    config = resolve(config, overrides)
    config_file.validate_training(config)
    return run_validated(config, workdir)


def run_validated(config, workdir: str) -> TrainResult:
    """`train` for a config already resolved and validated (the CLI's --show-config needs it first)."""
    from phi_jax.errors import InputError
    from phi_jax.training.loop import preflight
    from phi_jax.training.loop import train as train_loop

    if not workdir:
        raise InputError("phi-jax train needs --workdir=DIR (where checkpoints and metrics go)")
    checked = preflight(config, workdir)  # what can fail without data fails before curation writes
    curation = curate_for_training(config, workdir, progress=config.train.progress_bar)
    start = time.perf_counter()
    summary = train_loop(config, workdir, checked=checked)
    table, rows = stage_report(curation, summary, config, time.perf_counter() - start)
    root = fileio.as_path(workdir)
    paths = {"workdir": str(root), "checkpoints": str(root / "checkpoints"),
             "metrics": str(root / "metrics.jsonl"), "tokenizer": str(root / "tokenizer")}
    if curation:
        paths["curated"] = str(root / "curated")
    return TrainResult(str(root), summary["start_step"], summary["end_step"], summary["total_steps"],
                       list(summary["losses"]), summary["heldout"], rows, table, paths, summary)


def curation_inputs(data) -> tuple[str, str]:
    """(inputs for the first stage, its text field) from the `data` config."""
    if data.source == "default":
        return "default", "text"
    return data.paths, data.jsonl_field


def curation_applies(config) -> tuple[bool, str]:
    """(whether the main job curates this config's data, why not)."""
    c = config.curation
    if not c.enabled:
        return False, "--config.curation.enabled=False: training on data.* as given"
    sources = [s.strip() for s in c.sources.split(",") if s.strip()]
    if config.data.source not in sources:
        return False, (f"data.source={config.data.source} is not in curation.sources ({c.sources}): "
                       "training on it as given; add it to --config.curation.sources to curate it")
    return True, ""


def curate_for_training(config, workdir, *, progress: bool = True) -> list:
    """Run the enabled curation stages and point `config.data` at their output; returns their lines
    ([] when curation does not apply, see `curation_applies`).

    Multi-host: process 0 curates while the others wait, then every process finds the stages
    complete (and skips them), so all read the same shards.
    """
    if not curation_applies(config)[0]:
        return []
    import jax

    from phi_jax.jobs.curate import TokenCounter, curate, format_line
    from phi_jax.training.loop import run_tokenizer

    workdir = fileio.as_path(workdir)
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
    """The pack, train and held-out lines of a finished trainer call (as dicts, for the JSON too)."""
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
    """The printed pack / train / held-out line, in the columns of the curation lines."""
    from phi_jax.jobs.curate import human_count

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
    from phi_jax.jobs.curate import format_line

    rows = [dataclasses.asdict(line) for line in curation_lines]
    text = [STAGES_HEADER] + [format_line(line) for line in curation_lines]
    if not curation_lines:
        text.append(f"  curation       off ({curation_applies(config)[1]})")
    extra = training_lines(summary, config, seconds)
    text += [format_training_line(line) for line in extra]
    return "\n".join(text), rows + extra
