"""The main job's curation: the stages a training config asks for, chained under WORKDIR/curated.

    result = curate(config.curation, "default", workdir + "/curated", count_tokens=TokenCounter(tok))
    result.files                       # the last stage's shards: what training reads
    print("\n".join(format_line(l) for l in result.lines))

The stages are the `phi-jax data` ones (`annotate_stage`, `filter_stage`, `dedup_stage`,
`decontaminate_stage`, run by `run_stage`), in this order, each reading the previous one's output
directory; a stage switched off is passed over and the next reads its input instead. Every output
has its manifest, which names its input files' sha256 and the sha256 of the manifest of the stage
before it (`upstream`), so the chain from corpus to training shards can be checked by hash.

The stages run through the one pipeline orchestrator (`phi_jax.jobs.pipeline`): markers in
WORKDIR/curated/stages/, one "settings differ" error. A stage whose output is complete for the same
parameters and inputs (its manifest says so) is skipped (nothing is written, so the hashes
downstream stay valid); an unfinished one is resumed shard by shard; one made with other settings
is refused, since a checkpoint beside it was trained on that data. Every path goes through
`phi_jax.fileio`, so a gs:// workdir's curated shards live in the bucket.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from typing import Any, Callable, Iterable

from phi_jax import fileio
from phi_jax.curation.core.stage import Stage
from phi_jax.data import records
from phi_jax.errors import InputError
from phi_jax.jobs.pipeline import Step, run_pipeline, settings_differ

STAGES = ("annotate", "filter", "dedup", "decontaminate")
MARKS = "stages"  # WORKDIR/curated/stages/<stage>.json: the pipeline's markers


@dataclasses.dataclass
class StageLine:
    """One stage of a run, as printed: what went in and out, and how long it took.

    status: "ran", "resumed" (finished an interrupted run), "skipped" (already complete) or "off".
    seconds: the stage's wall time over all its runs (for a skipped stage, the earlier runs').
    """

    stage: str
    status: str
    documents_in: int | None = None
    documents_out: int | None = None
    tokens_in: int | None = None
    tokens_out: int | None = None
    seconds: float | None = None
    dropped: dict | None = None
    output: str = ""
    manifest_sha256: str = ""
    note: str = ""


@dataclasses.dataclass
class Curated:
    lines: list[StageLine]
    files: list[str]  # the last stage's shards ([] when every stage is off)


class TokenCounter:
    """Tokens of texts with a tokenizer, each distinct text encoded once (stages mostly pass texts on)."""

    def __init__(self, tokenizer, batch: int = 256):
        self._tokenizer, self._batch = tokenizer, batch
        self._known: dict[bytes, int] = {}

    def __call__(self, texts: Iterable[str]) -> int:
        total, todo, pending = 0, {}, []  # pending: keys of texts counted once `todo` is encoded
        for text in texts:
            key = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()
            if key in self._known:
                total += self._known[key]
                continue
            todo[key] = text
            pending.append(key)
            if len(todo) == self._batch:
                total += self._encode(todo, pending)
                todo, pending = {}, []
        return total + self._encode(todo, pending)

    def _encode(self, todo: dict[bytes, str], pending: list[bytes]) -> int:
        if todo:
            ids = self._tokenizer.encode_batch(list(todo.values()))
            for key, row in zip(todo, ids):
                self._known[key] = len(row)
        return sum(self._known[key] for key in pending)  # a text twice in a batch counts twice


def build_stage(name: str, cc, output):
    """The `phi-jax data` stage `name` configured by the `curation` ConfigDict."""
    if name == "annotate":
        from phi_jax.curation.quality.annotate import HEURISTIC, annotate_stage, load_rubric
        from phi_jax.curation.teacher.client import TeacherConfig, default_cache_path

        a = cc.annotate
        teacher = None if a.teacher == HEURISTIC else TeacherConfig(url=a.teacher, model=a.teacher_model,
                                                                     concurrency=a.concurrency)
        prose = load_rubric(a.prose_rubric) if a.prose_rubric else None
        return annotate_stage(load_rubric(a.rubric), teacher, cache=default_cache_path(output),
                              max_chars=a.max_chars, prose_rubric=prose)
    if name == "filter":
        from phi_jax.curation.quality.filter import filter_stage

        return filter_stage(cc.filter.min_score, cc.filter.field)
    if name == "dedup":
        from phi_jax.curation.dedup.remove import dedup_stage

        return dedup_stage(cc.dedup.threshold, ngram=cc.dedup.ngram)
    if name == "decontaminate":
        from phi_jax.curation.decontaminate.remove import decontaminate_stage

        x = cc.decontaminate
        return decontaminate_stage([s.strip() for s in x.against.split(",") if s.strip()], ngram=x.ngram,
                                   code_check=x.code_check)
    raise ValueError(f"unknown curation stage {name!r}; the stages are {STAGES}")


def curate(cc, inputs: str, root: Any, *, count_tokens: Callable[[Iterable[str]], int],
           text_field: str = "text", max_records: int = 0, progress: bool = True,
           on_line: Callable[[StageLine], None] | None = None) -> Curated:
    """Run (or skip, or resume) every enabled stage of `cc` over `inputs` into `root/<stage>`.

    Args:
      cc: the `curation` ConfigDict (`phi_jax.training.defaults.curation_config()`).
      inputs: what the first stage reads (`default`, files or globs; see `records.plan_shards`).
      root: the directory of the stages' outputs (`WORKDIR/curated`; local or gs://).
      count_tokens: texts -> their token count (a `TokenCounter`), for the lines.
      text_field, max_records: how the first stage reads `inputs`.
      on_line: called with each stage's line as it finishes.
    """
    from phi_jax.curation.core.runners import completed_run, run_stage

    root = fileio.as_path(root)
    state = {"current": inputs, "previous": None, "last": None}

    def step(name: str) -> Step:
        if not cc[name].enabled:
            return Step(name, off=f"--config.curation.{name}.enabled=False")
        output = root / name

        def options():
            first = state["previous"] is None
            return dict(shard_size=cc.shard_size, text_field=text_field if first else "text",
                        max_records=max_records if first else 0)

        def line(manifest: dict, status: str, saved: dict | None, seconds: float | None = None) -> dict:
            sha = records.file_sha256(output / records.MANIFEST)
            old = (saved or {}).get("result") or {}
            if status == "skipped" and old.get("manifest_sha256") == sha:
                tokens_in, tokens_out = old.get("tokens_in"), old.get("tokens_out")
            else:
                previous = state["previous"]
                tokens_in = previous["tokens_out"] if previous is not None else count_tokens(
                    _texts(records.plan_shards(state["current"], cc.shard_size, text_field=text_field,
                                               max_records=max_records)))
                tokens_out = count_tokens(r["text"] for r in records.iter_output(str(output)))
            counts = manifest["counts"]
            state["last"] = manifest
            return dataclasses.asdict(StageLine(
                name, status, counts["records_in"], counts["records_out"], tokens_in, tokens_out,
                manifest.get("wall_seconds", seconds), dict(counts["dropped"]), str(output), sha))

        def complete(saved):
            done, problems = completed_run(build_stage(name, cc, output), state["current"], str(output),
                                           **options())
            if problems:
                raise settings_differ(output, problems)
            return None if done is None else line(done, "skipped", saved)

        def run():
            status = "resumed" if (output / records.MANIFEST).is_file() else "ran"
            clock = time.perf_counter()
            manifest = run_stage(build_stage(name, cc, output), state["current"], str(output),
                                 runner=cc.runner, workers=cc.workers, beam_options=cc.beam_options,
                                 progress=progress, **options())
            return line(manifest, status, None, round(time.perf_counter() - clock, 3))

        return Step(name, run=run, output=output, complete=complete)

    lines: list[StageLine] = []

    def finished(name: str, out: dict) -> None:
        if out["status"] == "off":
            lines.append(StageLine(name, "off", note=out["reason"]))
        else:
            lines.append(StageLine(**out["result"]))
            state["previous"], state["current"] = out["result"], out["result"]["output"]
        if on_line:
            on_line(lines[-1])
        if lines[-1].documents_out == 0:
            raise InputError(f"curation kept no document ({name} left 0 of {lines[-1].documents_in}); lower "
                             "--config.curation.filter.min_score or switch a stage off")

    # built lazily, one at a time: each step reads the previous one's output
    run_pipeline([step(name) for name in STAGES], root / MARKS, on_outcome=finished)
    last = state["last"]
    # a shard the stages emptied is left out: the training pipeline refuses empty files
    files = [str(fileio.as_path(state["current"]) / o["path"]) for o in last["outputs"] if o["records"]] \
        if last else []
    return Curated(lines, files)


def _texts(shards) -> Iterable[str]:
    for shard in shards:
        for record in shard.read():
            yield record["text"]


def human_count(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / 1e6:.2f}M" if n >= 1_000_000 else f"{n:,}"


def format_line(line: StageLine) -> str:
    """`annotate       748 -> 748 docs   2.91M -> 2.91M tokens     6.1 s  ran`."""
    if line.status == "off":
        return f"  {line.stage:<14} off ({line.note})"
    docs = f"{human_count(line.documents_in)} -> {human_count(line.documents_out)} docs"
    tokens = f"{human_count(line.tokens_in)} -> {human_count(line.tokens_out)} tokens"
    seconds = "-" if line.seconds is None else f"{line.seconds:.1f} s"
    dropped = ", ".join(f"{n:,} {why}" for why, n in sorted((line.dropped or {}).items(), key=lambda kv: -kv[1]))
    note = line.note or (f"dropped {dropped}" if dropped else "")
    return f"  {line.stage:<14} {docs:<24} {tokens:<28} {seconds:>8}  {line.status}" + (f"; {note}" if note else "")
