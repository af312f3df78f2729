"""The curation stages a training config asks for, chained under one directory, each resumable.

    result = curate(config.curation, "default", workdir / "curated", count_tokens=TokenCounter(tok))
    result.files                       # the last stage's shards: what training reads
    print("\n".join(format_line(l) for l in result.lines))

The stages are the `phi-jax data` ones (`annotate_stage`, `filter_stage`, `dedup_stage`,
`decontaminate_stage`, run by `run_stage`), in this order, each reading the previous one's output
directory; a stage switched off is passed over and the next reads its input instead. Every output
has its manifest, which names its input files' sha256 and the sha256 of the manifest of the stage
before it (`upstream`), so the chain from corpus to training shards can be checked by hash.

A stage whose output is complete for the same parameters and inputs is skipped (nothing is
written, so the hashes downstream stay valid); an unfinished one is resumed shard by shard; one
made with other settings is refused, since a checkpoint beside it was trained on that data.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path
from typing import Callable, Iterable

from phi_jax.curation.core.stage import Stage
from phi_jax.data import records
from phi_jax.errors import InputError
from phi_jax.fileio import atomic_write_json

STAGES = ("annotate", "filter", "dedup", "decontaminate")
LINES = "stages.json"


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


def build_stage(name: str, cc, output: Path) -> Stage:
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


def curate(cc, inputs: str, root: str | Path, *, count_tokens: Callable[[Iterable[str]], int],
           text_field: str = "text", max_records: int = 0, progress: bool = True,
           on_line: Callable[[StageLine], None] | None = None) -> Curated:
    """Run (or skip, or resume) every enabled stage of `cc` over `inputs` into `root/<stage>`.

    Args:
      cc: the `curation` ConfigDict (`phi_jax.training.defaults.curation_config()`).
      inputs: what the first stage reads (`default`, files or globs; see `records.plan_shards`).
      root: the directory of the stages' outputs (`WORKDIR/curated`).
      count_tokens: texts -> their token count (a `TokenCounter`), for the lines.
      text_field, max_records: how the first stage reads `inputs`.
      on_line: called with each stage's line as it finishes.
    """
    from phi_jax.curation.core.runners import completed_run, run_stage

    root = Path(root)
    saved = _read_lines(root)
    lines: list[StageLine] = []
    current, previous, last = inputs, None, None
    for name in STAGES:
        if not cc[name].enabled:
            lines.append(StageLine(name, "off", note=f"--config.curation.{name}.enabled=False"))
            if on_line:
                on_line(lines[-1])
            continue
        output = root / name
        first = previous is None
        options = dict(shard_size=cc.shard_size, text_field=text_field if first else "text",
                       max_records=max_records if first else 0)
        stage = build_stage(name, cc, output)
        done, problems = completed_run(stage, current, output, **options)
        if problems:
            raise InputError(f"{output} was curated with other settings or inputs ({'; '.join(problems)[:300]}); "
                             "a checkpoint in this workdir was trained on it: use a new --workdir, or delete "
                             f"{output} and the stages after it to redo them")
        clock = time.perf_counter()
        if done is not None:
            manifest, status = done, "skipped"
        else:
            status = "resumed" if (output / records.MANIFEST).is_file() else "ran"
            manifest = run_stage(stage, current, output, runner=cc.runner, workers=cc.workers,
                                 beam_options=cc.beam_options, progress=progress, **options)
        sha = records.file_sha256(output / records.MANIFEST)
        old = saved.get(name, {})
        if status == "skipped" and old.get("manifest_sha256") == sha:
            tokens_in, tokens_out = old.get("tokens_in"), old.get("tokens_out")
        else:
            tokens_in = previous.tokens_out if previous is not None else count_tokens(
                _texts(records.plan_shards(current, cc.shard_size, text_field=text_field,
                                           max_records=max_records)))
            tokens_out = count_tokens(r["text"] for r in records.iter_output(output))
        counts = manifest["counts"]
        line = StageLine(name, status, counts["records_in"], counts["records_out"], tokens_in, tokens_out,
                         manifest.get("wall_seconds", round(time.perf_counter() - clock, 3)),
                         dict(counts["dropped"]), str(output), sha)
        lines.append(line)
        if on_line:
            on_line(line)
        previous, last, current = line, manifest, str(output)
        if line.documents_out == 0:
            raise InputError(f"curation kept no document ({name} left 0 of {line.documents_in}); lower "
                             "--config.curation.filter.min_score or switch a stage off")
    _write_lines(root, lines)
    # a shard the stages emptied is left out: the training pipeline refuses empty files
    files = [str(Path(current) / o["path"]) for o in last["outputs"] if o["records"]] if last else []
    return Curated(lines, files)


def _texts(shards) -> Iterable[str]:
    for shard in shards:
        for record in shard.read():
            yield record["text"]


def _read_lines(root: Path) -> dict[str, dict]:
    try:
        return {line["stage"]: line for line in json.loads((root / LINES).read_text())}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def _write_lines(root: Path, lines: list[StageLine]) -> None:
    if any(line.status != "skipped" and line.status != "off" for line in lines) or not (root / LINES).exists():
        root.mkdir(parents=True, exist_ok=True)
        atomic_write_json(root / LINES, [dataclasses.asdict(line) for line in lines])


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
