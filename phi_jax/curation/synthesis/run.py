"""Synthesis: a teacher writes textbook sections or executed exercises from a steered plan.

    plan = make_plan("exercises", count=1000, seed=0, ...)
    result = run_synthesis(plan, TeacherConfig(url, model), "out/ex")
    result.report["distinct"], result.gated["counts"]["dropped"]

One run writes, under its output directory:
  generated/     the `synthesize` stage: one record per usable answer (exercises: only those whose
                 solution passed its own check in the sandbox); every other prompt counted in the
                 manifest by reason. Resumable per shard; the teacher cache is
                 generated/teacher_cache.sqlite, so a killed run never pays twice.
  data/          the `gate` stage over generated/: duplicates and benchmark overlap dropped, by
                 reason; repetition flagged in meta.flags (`phi_jax.curation.synthesis.output_gates`). Train on this.
  train.jsonl    exercises only: {"id", "prompt", "completion"} per kept exercise, the training form
                 `phi_jax.data` reads with the loss on the completion (the solution) only.
  report.json, report.png   the diversity report (`phi_jax.curation.synthesis.diversity`).

Record formats (`meta` besides the seed's topic, topic_kind, topic_name, audience, style,
plan_index, seed):
  textbook:  {"id": "textbook-s<seed>-<index>", "text": the section as written,
              "meta": {"kind": "textbook", "teacher": {...}}}
  exercise:  {"id": "exercises-s<seed>-<index>", "text": prompt + solution,
              "meta": {"kind": "exercise", "prompt": imports + signature + docstring,
                       "solution": the body, "check": "def check(candidate): ...",
                       "entry_point": name, "teacher": {...},
                       "execution": {"status": "passed", "seconds": wall time}}}
  teacher:   {"model", "seed" (this request's sampling seed, see `request_seed`), "finish_reason",
              "prompt_tokens", "completion_tokens", "template_sha256"}
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import hashlib
import json
from pathlib import Path
from typing import Any

from phi_jax.curation.core.stage import Counts, Stage
from phi_jax.curation.synthesis import diversity, exercises, output_gates as gates
from phi_jax.curation.teacher.client import Prompt, TeacherClient, TeacherConfig, default_cache_path
from phi_jax.data import records
from phi_jax.errors import InputError, RunError
from phi_jax import fileio
from phi_jax.fileio import atomic_write_json, atomic_write_text

GENERATED, GATED, TRAIN, REPORT_JSON, REPORT_PNG = "generated", "data", "train.jsonl", "report.json", "report.png"
_SEED_META = ("topic", "topic_kind", "topic_name", "audience", "style", "plan_index", "seed")


@dataclasses.dataclass(frozen=True)
class SynthesisSpec:
    """What a worker needs to build the synthesis step (picklable)."""

    kind: str
    teacher: TeacherConfig
    cache: str | None
    template_sha256: str
    limits: exercises.ExecutionLimits
    exec_workers: int
    backend: str


def synthesize_stage(plan, teacher: TeacherConfig, *, cache: str | Path | None,
                     limits: exercises.ExecutionLimits = exercises.ExecutionLimits(),
                     exec_workers: int = 2, backend: str = "auto") -> Stage:
    """The generation stage over `plan`'s prompts (a `PlannedInputs` for `run_stage`)."""
    if exec_workers < 1:
        raise InputError(f"--exec-workers={exec_workers}: must be >= 1")
    if limits.timeout_s <= 0 or limits.memory_bytes < (32 << 20):
        raise InputError("--exec-timeout must be > 0 and --exec-memory-mb at least 32")
    spec = SynthesisSpec(plan.kind, teacher, None if cache is None else str(cache), plan.template.sha256,
                         limits, exec_workers, backend)
    parameters = {**plan.parameters(), "teacher": {"model": teacher.model, **teacher.sampling()}}
    if plan.kind == "exercises":
        parameters["execution"] = {"timeout_s": limits.timeout_s, "memory_bytes": limits.memory_bytes,
                                   "processes": limits.processes}
    settings = {"teacher_url": teacher.endpoint, "concurrency": teacher.concurrency,
                "timeout_s": teacher.timeout_s, "max_retries": teacher.max_retries,
                "teacher_cache": spec.cache, "exec_workers": exec_workers, "sandbox_backend": backend}
    return Stage("synthesize", functools.partial(_SynthesizeStep, spec), parameters, settings,
                 batch_size=max(16, 4 * teacher.concurrency))


def request_seed(seed: int | None, index: int) -> int | None:
    """Prompt `index`'s sampling seed: a hash of the run's teacher seed and the index (31 bits).

    One seed for every request would have every answer drawn with the same random numbers, which
    correlates them; adjacent seeds would overlap if it were seed + index.
    """
    if seed is None:
        return None
    return int.from_bytes(hashlib.sha256(f"{seed}:{index}".encode()).digest()[:4], "big") >> 1


class _SynthesizeStep:
    def __init__(self, spec: SynthesisSpec):
        self._spec = spec
        self._client = TeacherClient(spec.teacher, spec.cache)
        self._pool = concurrent.futures.ThreadPoolExecutor(spec.exec_workers, thread_name_prefix="exercise")

    def _prompt(self, seed: dict) -> Prompt:
        """An exercise is asked for with its shape as a structured-output regex (nothing lost to
        parsing), and plainly from an endpoint that refuses the field (the client warns once)."""
        spec = self._spec
        plain = Prompt([{"role": "user", "content": seed["text"]}], spec.template_sha256,
                       request_seed(spec.teacher.seed, seed["meta"]["plan_index"]))
        if spec.kind != "exercises":
            return plain
        return dataclasses.replace(plain, request={"structured_outputs": {"regex": exercises.ANSWER_REGEX}},
                                   fallback=plain)

    def __call__(self, seeds: list[dict], counts: Counts) -> list[dict]:
        spec = self._spec
        prompts = [self._prompt(s) for s in seeds]
        answers = self._client.ask(prompts, counts)
        out, todo = [], []
        for seed, prompt, answer in zip(seeds, prompts, answers):
            meta = {k: seed["meta"][k] for k in _SEED_META}
            meta["teacher"] = {"model": spec.teacher.model, "seed": prompt.seed,
                               "finish_reason": answer.finish_reason, "prompt_tokens": answer.prompt_tokens,
                               "completion_tokens": answer.completion_tokens,
                               "template_sha256": spec.template_sha256[:16]}
            if answer.error is not None:
                counts.drop("teacher_refused")
            elif not (answer.text or "").strip():
                counts.drop("empty_answer")
            elif spec.kind == "textbook":
                out.append(records.make_record(seed["id"], answer.text.strip() + "\n",
                                               {"kind": "textbook", **meta}))
            else:
                parsed = exercises.parse_exercise(answer.text)
                if isinstance(parsed, exercises.Rejected):
                    counts.drop(parsed.reason)
                else:
                    todo.append((seed["id"], meta, parsed))
        runs = self._pool.map(lambda job: exercises.run_exercise(job[2], spec.limits, backend=spec.backend), todo)
        for (rid, meta, exercise), result in zip(todo, list(runs)):
            counts.add("executed")
            if result.status == "error":
                raise RunError(f"the sandbox could not run exercise {rid} ({result.reason}); check that "
                               "bubblewrap works here (`bwrap --version`; apt-get install bubblewrap), "
                               "then rerun the same command to resume")
            if not result.passed:
                counts.drop(result.status)  # failed | timeout
                continue
            counts.add("passed")
            out.append(records.make_record(rid, exercise.text, {
                "kind": "exercise", "prompt": exercise.prompt, "solution": exercise.solution,
                "check": exercise.check, "entry_point": exercise.entry_point, **meta,
                "execution": {"status": result.status, "seconds": round(result.wall_s, 3)}}))
        return out

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self._client.close()


@dataclasses.dataclass(frozen=True)
class SynthesisResult:
    generated: dict  # the synthesize stage's manifest
    gated: dict  # the gate stage's manifest
    report: dict
    output: Path


def run_synthesis(plan, teacher: TeacherConfig, output: str | Path, *, cache: str | Path | None = None,
                  limits: exercises.ExecutionLimits = exercises.ExecutionLimits(), exec_workers: int = 2,
                  backend: str = "auto", gate_config: gates.GateConfig = gates.GateConfig(),
                  embedder=None, embedder_name: str | None = None, runner: str = "local",
                  workers: int = 1, shard_size: int = 50, output_format: str = "jsonl",
                  overwrite: bool = False, beam_options: str = "", progress: bool = True,
                  report_copy: str | Path | None = None) -> SynthesisResult:
    """Generate (resumable), gate, export and report; see the module docstring for the layout.

    `report_copy`: also write the report to this path (.json; the PNG beside it), e.g. under
    benchmarks/results/.
    """
    from phi_jax.curation.core.runners import run_stage
    from phi_jax.sandbox import default_backend

    fileio.check_bucket(output, "--output")
    output = fileio.as_path(output)  # local, or a bucket (gs://...)
    if output.exists() and not output.is_dir():
        raise InputError(f"--output={output} is a file; give a directory")
    ours = (GENERATED, GATED, TRAIN, REPORT_JSON, REPORT_PNG)
    strangers = sorted(p.name for p in output.iterdir() if p.name not in ours and ".tmp-" not in p.name
                       ) if output.is_dir() else []
    if strangers:
        raise InputError(f"--output={output} holds files that are not a synthesis run's "
                         f"({', '.join(strangers[:4])}); choose a new or empty directory")
    cache = cache or default_cache_path(output / GENERATED)
    stage = synthesize_stage(plan, teacher, cache=cache, limits=limits, exec_workers=exec_workers,
                             backend=backend)
    run = dict(runner=runner, workers=workers, output_format=output_format, beam_options=beam_options,
               progress=progress)
    generated = run_stage(stage, plan, output / GENERATED, shard_size=shard_size, overwrite=overwrite, **run)
    made = list(records.iter_output(output / GENERATED))
    if made:  # derived from generated/ alone: rewritten whenever the generated set or the gates change
        decisions = gates.decide(made, gate_config)
        gated = run_stage(gates.gate_stage(decisions, gate_config), str(output / GENERATED), output / GATED,
                          shard_size=max(shard_size, 1000), overwrite=True, **{**run, "progress": False})
        kept = list(records.iter_output(output / GATED))
    else:  # nothing to gate (every answer was dropped): no data/ at all, rather than a stale one
        fileio.rmtree(output / GATED)
        gated, kept = {"counts": {"records_in": 0, "records_out": 0, "dropped": {}, "stage": {}}}, []
    if plan.kind == "exercises":
        atomic_write_text(output / TRAIN, "".join(json.dumps(exercises.training_pair(r), ensure_ascii=False)
                                                  + "\n" for r in kept))
    teacher_info = {"model": teacher.model, **teacher.sampling()}
    sandbox = None
    if plan.kind == "exercises":
        sandbox = f"backend={default_backend() if backend == 'auto' else backend}; " + \
                  f"timeout {limits.timeout_s:g} s, address space {limits.memory_bytes >> 20} MiB, " + \
                  f"{limits.processes} processes, no network"
    report = diversity.diversity_report(plan, generated, gated, kept, config=gate_config, teacher=teacher_info,
                                        embedder=embedder, embedder_name=embedder_name, sandbox=sandbox)
    for path in [output / REPORT_JSON] + ([Path(report_copy)] if report_copy else []):
        atomic_write_json(path, report)
        if fileio.is_remote(path):  # matplotlib writes local files: plot here, then upload
            import tempfile

            with tempfile.TemporaryDirectory() as tmp:
                diversity.plot_report(report, Path(tmp) / "report.png")
                fileio.upload_file(Path(tmp) / "report.png", path.with_suffix(".png"))
        else:
            diversity.plot_report(report, path.with_suffix(".png"))
    return SynthesisResult(generated, gated, report, output)


def summary(result: SynthesisResult) -> str:
    """The runner's one-screen summary of the generation, then the gates and the report's numbers."""
    from phi_jax.curation.core.runners import summary as stage_summary

    lines = [stage_summary(result.generated, result.output / GENERATED)]
    gated = result.gated["counts"]
    dropped = ", ".join(f"{n} {reason}" for reason, n in sorted(gated["dropped"].items())) or "none"
    flagged = ", ".join(f"{n} {k[len('flagged_'):]}" for k, n in sorted(gated["stage"].items())
                        if k.startswith("flagged_")) or "none"
    where = result.output / GATED if result.gated["counts"]["records_in"] else "(nothing was generated)"
    lines.append(f"gate -> {where}: dropped {dropped}; flagged {flagged}")
    lines += diversity.summary_lines(result.report)
    extra = f", {result.output / TRAIN}" if result.report["kind"] == "exercises" else ""
    lines.append(f"  report      {result.output / REPORT_JSON} (+ .png){extra}")
    return "\n".join(lines)
