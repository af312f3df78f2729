"""The phi-1 data recipe end to end, as a function: `recipe(config, workdir=...)`.

    result = recipe("configs/recipe_phi1_tiny.py:runlocal", workdir="runs/recipe",
                    overrides={"teacher.url": "http://127.0.0.1:8000/v1"})
    result.report["humaneval_pass@1"], result.report_path

Stages, in order (each writes WORKDIR/<stage>/, its command's output in WORKDIR/logs/<stage>.log):
  annotate       the teacher scores a sample of the corpus        phi-jax data annotate
  classifier     a quality head on embeddings of those documents  phi-jax data train-classifier
  score, filter  the classifier scores the corpus; keep >= min    phi-jax data score / filter
  dedup, decontaminate                                            phi-jax data dedup / decontaminate
  textbook, exercises  synthetic sections; exercises executed     phi-jax data synthesize
  pretrain       on the filtered corpus + the textbook sections   phi-jax train
  finetune       on the exercises that passed                     phi-jax finetune
  humaneval      pass@1, sandboxed                                phi-jax eval humaneval
and WORKDIR/report.json + report.png. Each stage runs as its `phi-jax` command in its own process:
its memory goes back to the OS when it ends, its log is its own, and the report records commands a
user can rerun by hand. Without a teacher URL a local `phi-jax serve --model=smollm2` is started
for the stages that ask one (`phi_jax.jobs.local_teacher`) and stopped at the end.

Resume is the one pipeline's (`phi_jax.jobs.pipeline`, markers in WORKDIR/stages/): a finished stage
is skipped on a rerun, an interrupted one is rerun (its command resumes what it had done), a
skipped one is asked again; a workdir made with other settings is refused. If the teacher scored
too few documents to train a classifier, the corpus is scored by the offline heuristic instead,
and the report says so.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import subprocess
import sys
import time
from typing import Any, Callable, Mapping

from phi_jax import fileio
from phi_jax.errors import ConfigError, InputError, RunError
from phi_jax.jobs.config import ConfigLike, resolve
from phi_jax.jobs.pipeline import StageSkipped, Step, run_pipeline

log = logging.getLogger(__name__)

STAGES = ("annotate", "classifier", "score", "filter", "dedup", "decontaminate", "textbook", "exercises",
          "pretrain", "finetune", "humaneval")
_TEACHER_STAGES = ("annotate", "textbook", "exercises")


def stage_table() -> str:
    """The table of stages in this module's docstring: the one copy, which `phi-jax recipe --help`
    shows too (so the two never disagree). Under `python -OO` (no docstrings) the stage names."""
    doc = __doc__ or ""
    start, end = doc.find("Stages, in order"), doc.find("\nand WORKDIR/report.json")
    return doc[start:end] if 0 <= start < end else "Stages, in order: " + ", ".join(STAGES)


@dataclasses.dataclass
class RecipeResult:
    """The recipe's report (every stage's status, time, commands and numbers) and where it went."""

    workdir: str
    report: dict[str, Any]
    report_path: str

    @property
    def stages(self) -> dict[str, dict]:
        return self.report["stages"]

    @property
    def humaneval_pass_at_1(self) -> float | None:
        return self.report["humaneval_pass@1"]


def recipe(config: ConfigLike, *, workdir: str, overrides: Mapping[str, Any] | None = None,
           teacher: str | None = None, report_copy: str | None = None,
           on_line: Callable[[str], None] | None = None) -> RecipeResult:
    """Run (or resume) phi-1's recipe in `workdir`: curate, synthesize, pretrain, fine-tune, evaluate.

    A function so a notebook or a scheduler runs what `phi-jax recipe` runs.

    Args:
      config: a recipe config file (`"configs/recipe_phi1_tiny.py:runlocal"`) or a ConfigDict.
      workdir: where every stage's output goes (resumed if rerun).
      overrides: `{"pretrain.steps": 4, ...}`, checked as `--config.k=v` is.
      teacher: an OpenAI-compatible base URL (default: config.teacher.url, else a local server).
      report_copy: also write the report here (.json, the PNG beside it).
      on_line: called with each stage's line as it finishes (the CLI prints them).
    """
    config = resolve(config, overrides)
    validate(config)
    return run_validated(config, workdir, teacher=teacher, report_copy=report_copy, on_line=on_line)


def validate(config) -> None:
    """Ranges of the recipe's keys, before anything is written."""
    def get(key: str):
        value = config
        for part in key.split("."):
            value = value[part]
        return value

    def check(ok: bool, key: str, need: str) -> None:
        if not ok:
            raise ConfigError(f"--config.{key}={get(key)!r} is invalid: {need}")

    check(config.runner in ("local", "beam"), "runner", "must be local or beam")
    for key in ("workers", "teacher.concurrency", "teacher.num_slots", "annotate.sample", "annotate.max_chars",
                "annotate.max_tokens", "classifier.max_tokens", "synthesize.max_tokens", "pretrain.steps",
                "finetune.steps", "eval.humaneval_problems", "eval.max_new_tokens"):
        check(isinstance(get(key), int) and get(key) >= 1, key, "must be an integer >= 1")
    for key in ("synthesize.textbook", "synthesize.exercises", "filter.documents"):
        check(isinstance(get(key), int) and get(key) >= 0, key, "must be an integer >= 0")
    check(0 <= config.filter.min_quality <= 5, "filter.min_quality", "must be a score in [0, 5]")
    check(config.classifier.head in ("ridge", "logistic", "forest"), "classifier.head",
          "must be ridge, logistic or forest")
    check(config.eval.humaneval_problems <= 164, "eval.humaneval_problems", "HumanEval has 164 problems")


def run_validated(config, workdir: str, *, teacher: str | None = None, report_copy: str | None = None,
                  on_line: Callable[[str], None] | None = None) -> RecipeResult:
    """`recipe` for a config already resolved and validated (the CLI's --show-config needs that)."""
    from phi_jax.jobs import recipe_report

    if not workdir:
        raise InputError("phi-jax recipe needs --workdir=DIR (where every stage's output goes)")
    root = fileio.as_path(workdir)
    root.mkdir(parents=True, exist_ok=True)
    report = _Recipe(config, root, teacher).run(on_line)
    path = root / "report.json"
    for target in [path] + ([fileio.as_path(report_copy)] if report_copy else []):
        target.parent.mkdir(parents=True, exist_ok=True)
        fileio.atomic_write_json(target, report)
        recipe_report.plot_report(report, target.with_suffix(".png"))
    return RecipeResult(str(root), report, str(path))


class _Recipe:
    """The stages over one workdir, each a `phi-jax` command; the teacher starts when first asked."""

    def __init__(self, config, workdir, teacher: str | None):
        from phi_jax.jobs.local_teacher import LocalTeacher

        self.config, self.workdir = config, workdir
        self._url = teacher or config.teacher.url
        t = config.teacher
        self._local = LocalTeacher(str(self._log_dir() / "teacher.log"), model=t.model,
                                   num_slots=t.num_slots, max_len=t.max_len)
        self.teacher_info: dict[str, Any] = {"url": self._url or None, "model": t.model, "local": not self._url}
        self.results: dict[str, dict] = {}
        self.commands: dict[str, list[str]] = {}

    # ------------------------------------------------------------------------------ plumbing
    def _log_dir(self):
        """WORKDIR/logs, or a local scratch copy for a bucket (a server's stdout needs a real file)."""
        return (fileio.scratch_dir(self.workdir) if fileio.is_remote(self.workdir) else self.workdir) / "logs"

    def phi_jax(self, stage: str, *args: str) -> str:
        """Run one `phi-jax` command; its output goes to logs/<stage>.log; returns its stdout."""
        logs = self.workdir / "logs"
        command = "phi-jax " + " ".join(map(str, args))
        proc = subprocess.run([sys.executable, "-m", "phi_jax.cli", *map(str, args)], capture_output=True,
                              text=True)
        log_file = logs / f"{stage}.log"
        before = log_file.read_text() if log_file.exists() else ""
        fileio.atomic_write_text(log_file, f"{before}$ {command}\n{proc.stdout}{proc.stderr}")
        self.commands.setdefault(stage, []).append(command)
        if proc.returncode != 0:
            lines = [line for line in proc.stderr.splitlines() if line.strip()]
            raise RunError(f"stage {stage}: `phi-jax {args[0]} {args[1] if len(args) > 1 else ''}` failed: "
                           f"{lines[-1] if lines else 'exit code ' + str(proc.returncode)} (log: {log_file})")
        return proc.stdout

    def teacher_url(self) -> str:
        if self._url:
            return self._url
        url = self._local.url()
        self.teacher_info.update(self._local.info)
        return url

    def run_flags(self) -> list[str]:
        # --overwrite: a stage without its marker is redone even if a failed try had other settings
        beam = [f"--beam-options={self.config.beam_options}"] if self.config.beam_options else []
        return [f"--runner={self.config.runner}", f"--workers={self.config.workers}", "--no-progress",
                "--overwrite", *beam]

    def teacher_flags(self, max_tokens: int) -> list[str]:
        t = self.config.teacher
        return [f"--teacher={self.teacher_url()}", f"--teacher-model={t.model}", f"--concurrency={t.concurrency}",
                f"--timeout={t.timeout_s}", f"--max-tokens={max_tokens}"]

    def out(self, stage: str):
        return self.workdir / stage

    def done(self, stage: str) -> bool:
        return self.results.get(stage, {}).get("status") == "done"

    # -------------------------------------------------------------------------------- stages
    def annotate(self) -> dict:
        a = self.config.annotate
        self.phi_jax("annotate", "data", "annotate", f"--input={self.config.input}", f"--max-records={a.sample}",
                     f"--output={self.out('annotate')}", f"--rubric={a.rubric}", f"--max-chars={a.max_chars}",
                     *self.teacher_flags(a.max_tokens), *self.run_flags())
        return _manifest_counts(self.out("annotate"))

    def classifier(self) -> dict:
        from phi_jax.curation.quality.classify import MIN_ANNOTATIONS

        scored = _manifest_counts(self.out("annotate"))["stage"].get("scored", 0)
        if scored < MIN_ANNOTATIONS:
            raise StageSkipped(f"the teacher gave a score to {scored} of {self.config.annotate.sample} documents "
                               f"(the rest did not end in an 'Educational score: N' line); a classifier needs "
                               f"{MIN_ANNOTATIONS}: the corpus is scored by the offline heuristic instead")
        k = self.config.classifier
        stdout = self.phi_jax("classifier", "data", "train-classifier", f"--annotations={self.out('annotate')}",
                              f"--embedder={k.embedder}", f"--head={k.head}", f"--output={self.out('classifier')}",
                              f"--max-tokens={k.max_tokens}", "--overwrite",
                              *(["--add-bos"] if k.embedder.startswith("smollm2") else []))
        return json.loads(stdout.strip().splitlines()[-1])

    def score(self) -> dict:
        docs = self.config.filter.documents
        sample = [f"--max-records={docs}"] if docs else []
        if self.done("classifier"):
            self.phi_jax("score", "data", "score", f"--input={self.config.input}", f"--classifier={self.out('classifier')}",
                         f"--output={self.out('score')}", *sample, *self.run_flags())
            return {"scorer": "classifier", **_manifest_counts(self.out("score"))}
        self.phi_jax("score", "data", "annotate", f"--input={self.config.input}", "--teacher=heuristic",
                     f"--rubric={self.config.annotate.rubric}", "--prose-rubric=edu",
                     f"--output={self.out('score')}", *sample, *self.run_flags())
        return {"scorer": "heuristic (no classifier)", **_manifest_counts(self.out("score"))}

    def filter(self) -> dict:
        field = "quality" if _manifest(self.out("score"))["stage"] == "score" else "annotation.score"
        self.phi_jax("filter", "data", "filter", f"--input={self.out('score')}", f"--output={self.out('filter')}",
                     f"--min-quality={self.config.filter.min_quality}", f"--field={field}", *self.run_flags())
        counts = _manifest_counts(self.out("filter"))
        if counts["records_out"] == 0:
            raise RunError(f"stage filter kept none of {counts['records_in']} documents at quality >= "
                           f"{self.config.filter.min_quality}; lower --config.filter.min_quality and rerun")
        return counts

    def dedup(self) -> dict:
        self.phi_jax("dedup", "data", "dedup", f"--input={self.out('filter')}", f"--output={self.out('dedup')}",
                     *self.run_flags())
        return _manifest_counts(self.out("dedup"))

    def decontaminate(self) -> dict:
        self.phi_jax("decontaminate", "data", "decontaminate", f"--input={self.out('dedup')}",
                     f"--output={self.out('decontaminate')}", "--against=humaneval", *self.run_flags())
        return _manifest_counts(self.out("decontaminate"))

    def _synthesize(self, kind: str, stage: str, count: int) -> dict:
        if count == 0:
            raise StageSkipped(f"--config.synthesize.{stage}=0")
        self.phi_jax(stage, "data", "synthesize", f"--kind={kind}", f"--count={count}", f"--output={self.out(stage)}",
                     *self.teacher_flags(self.config.synthesize.max_tokens), *self.run_flags())
        report = json.loads((self.out(stage) / "report.json").read_text())
        return {"kept": report["counts"]["kept"], "asked": count, "dropped": report["counts"]["dropped"],
                "flagged": report["counts"]["flagged"], "execution": report.get("execution"),
                "teacher_usage": report.get("teacher_usage")}

    def textbook(self) -> dict:
        return self._synthesize("textbook", "textbook", self.config.synthesize.textbook)

    def exercises(self) -> dict:
        return self._synthesize("exercises", "exercises", self.config.synthesize.exercises)

    def pretrain(self) -> dict:
        files = _nonempty_shards(self.out("decontaminate"))
        if self.done("textbook"):
            files += _nonempty_shards(self.out("textbook") / "data")
        p = self.config.pretrain
        stdout = self.phi_jax("pretrain", "train", f"--config={p.config}", f"--workdir={self.out('pretrain')}",
                              "--config.curation.enabled=False", "--config.data.source=jsonl",
                              f"--config.data.paths={','.join(files)}", f"--config.train.steps={p.steps}",
                              "--config.train.progress_bar=False", *p.overrides.split())
        summary = json.loads(stdout.strip().splitlines()[-1])
        return {"files": len(files), "heldout": summary["heldout"], "heldout_tokens": summary["heldout_tokens"],
                "first_loss": summary.get("first_loss"), "last_loss": summary.get("last_loss"),
                "steps": summary["end_step"], "data_stats": summary.get("data_stats")}

    def finetune(self) -> dict:
        from phi_jax.jobs.finetuning import write_conversations

        train = self.out("exercises") / "train.jsonl"
        pairs = [json.loads(line) for line in train.read_text().splitlines() if line.strip()] \
            if train.is_file() else []
        if not pairs:
            raise StageSkipped("no exercise passed its own tests, so there is nothing to fine-tune on")
        data = write_conversations(self.workdir / "finetune_data", [
            {"messages": [{"role": "user", "content": p["prompt"]},
                          {"role": "assistant", "content": p["completion"]}]} for p in pairs])
        f = self.config.finetune
        stdout = self.phi_jax("finetune", "finetune", f"--config={f.config}", f"--model={self.out('pretrain')}",
                              f"--data={data}", f"--workdir={self.out('finetune')}", f"--config.train.steps={f.steps}",
                              *f.overrides.split())
        summary = json.loads(stdout.strip().splitlines()[-1])
        return {"examples": len(pairs), "heldout": summary.get("heldout"), "last_loss": summary.get("last_loss")}

    def humaneval(self) -> dict:
        tuned = self.done("finetune")
        model = self.out("finetune") if tuned else self.out("pretrain")
        e = self.config.eval
        self.phi_jax("humaneval", "eval", "humaneval", f"--model={model}", f"--output={self.out('humaneval')}",
                     f"--limit={e.humaneval_problems}", f"--max-new-tokens={e.max_new_tokens}", "--k=1", "--workers=2")
        metrics = json.loads((self.out("humaneval") / "humaneval_results.json").read_text())["metrics"]
        return {"model": "finetuned" if tuned else "pretrained (no finetune)",
                **{k: metrics.get(k) for k in ("pass@1", "num_problems", "num_samples", "num_passed")}}

    # ------------------------------------------------------------------------------- the run
    def run(self, on_line: Callable[[str], None] | None) -> dict:
        from phi_jax.jobs.recipe_report import format_line

        settings = json.loads(json.dumps(self.config.to_dict()))

        def decorate(stage: str, out: dict) -> None:
            out["commands"] = self.commands.get(stage, [])
            if stage in _TEACHER_STAGES and out["status"] == "done":
                out["teacher"] = dict(self.teacher_info)

        def finished(stage: str, out: dict) -> None:
            self.results[stage] = {k: v for k, v in out.items() if k != "settings"}
            if on_line:
                on_line(format_line(stage, self.results[stage]))

        steps = [Step(stage, run=getattr(self, stage), output=self.out(stage), settings=settings)
                 for stage in STAGES]
        started = time.perf_counter()
        try:
            run_pipeline(steps, self.workdir / "stages", on_outcome=finished, decorate=decorate)
        finally:
            self._local.close()
        return self.report(time.perf_counter() - started)

    def report(self, seconds: float) -> dict:
        from phi_jax.data import records

        pre = self.results.get("pretrain", {}).get("result", {})
        he = self.results.get("humaneval", {}).get("result", {})
        return {"recipe": "phi-1 at toy scale", "config": self.config.to_dict(), "workdir": str(self.workdir),
                "teacher": self.teacher_info, "seconds_this_run": round(seconds, 1),
                "seconds_all_stages": round(sum(r.get("seconds", 0) for r in self.results.values()), 1),
                "stages": self.results, "heldout": pre.get("heldout"), "humaneval_pass@1": he.get("pass@1"),
                "versions": records.versions(), "finished": records.now()}


def _manifest(directory) -> dict:
    from phi_jax.data import records

    return records.read_manifest(directory) or {}


def _manifest_counts(directory) -> dict:
    m = _manifest(directory)
    return {**m.get("counts", {}), "wall_seconds": m.get("wall_seconds")}


def _nonempty_shards(directory) -> list[str]:
    return [str(directory / o["path"]) for o in _manifest(directory).get("outputs", []) if o["records"]]
