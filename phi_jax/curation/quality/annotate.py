"""Annotation: ask a teacher to score each record against a rubric; record its answer as it was.

    stage = annotate_stage(load_rubric("edu"), TeacherConfig(url, model), cache=out / "teacher_cache.sqlite")
    run_stage(stage, "default", out)

Each record gets `meta.annotation`:
    {"status": "scored" | "unparsed" | "refused", "score": int | null, "reason": str | null,
     "teacher": model name or "heuristic", "rubric": name, "rubric_sha256": first 16 hex digits,
     "answer": the teacher's full answer, "truncated": whether the text was cut to max_chars}
A score is only ever the number the teacher wrote in its `Educational score: N` line (the last one,
a whole number in 0-5); an answer without one is `unparsed` with the reason, never given a score.
Annotation drops nothing: filter on `annotation.score` or a classifier's `quality` afterwards.

Rubrics are prompt files with a `{text}` placeholder: the built-in `edu` (FineWeb-Edu's additive
0-5 educational-value prompt) and `code` (phi-1's "educational value for a student learning basic
coding concepts", on the same scale) live in `phi_jax/curation/prompts/`; `--rubric=FILE` uses
yours, which must ask for the same final `Educational score: N` line.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from pathlib import Path

from phi_jax.curation.core.stage import Counts, Stage
from phi_jax.curation.core.templates import PromptTemplate, load_template
from phi_jax.curation.teacher import heuristic
from phi_jax.curation.teacher.client import Answer, Prompt, TeacherClient, TeacherConfig
from phi_jax.errors import InputError

BUILTIN_RUBRICS = ("edu", "code")
HEURISTIC = "heuristic"
MIN_SCORE, MAX_SCORE = 0, 5
PLACEHOLDER = "{text}"
_SCORE = re.compile(r"educational[ \t]+score[ \t]*[:=][ \t*_]*(-?[0-9]+(?:\.[0-9]+)?)", re.I)


Rubric = PromptTemplate  # `name` (edu, code or the file's path) and its text with `{text}`


def load_rubric(spec: str) -> Rubric:
    """A built-in rubric by name, or a prompt file; a one-line error when it cannot be used."""
    return load_template(spec, builtin={name: f"{name}.txt" for name in BUILTIN_RUBRICS}, flag="--rubric",
                         placeholders=(PLACEHOLDER,))


def parse_score(answer: Answer) -> tuple[int | None, str | None]:
    """(score, None) from the last `Educational score: N` line, else (None, why not)."""
    text = answer.text or ""
    if not text.strip():
        return None, "empty answer"
    matches = _SCORE.findall(text)
    if not matches:
        cut = (" (the answer was cut at max_tokens; raise --max-tokens)"
               if answer.finish_reason == "length" else "")
        return None, f"no 'Educational score: N' line in the answer{cut}"
    value = float(matches[-1])
    if not value.is_integer():
        return None, f"score {matches[-1]} is not a whole number"
    if not MIN_SCORE <= value <= MAX_SCORE:
        return None, f"score {int(value)} is outside {MIN_SCORE}-{MAX_SCORE}"
    return int(value), None


@dataclasses.dataclass(frozen=True)
class AnnotateSpec:
    """Everything a worker needs to build the annotation step (picklable)."""

    rubric: Rubric
    teacher: TeacherConfig | None  # None: the heuristic stand-in
    cache: str | None
    max_chars: int
    prose_rubric: Rubric | None = None  # for records with meta.kind == "prose" (None: `rubric`)

    def rubric_of(self, record: dict) -> Rubric:
        if self.prose_rubric is not None and record.get("meta", {}).get("kind") == "prose":
            return self.prose_rubric
        return self.rubric


def annotate_stage(rubric: Rubric, teacher: TeacherConfig | None, *, cache: str | Path | None,
                   max_chars: int = 4000, prose_rubric: Rubric | None = None) -> Stage:
    """The annotation stage; `teacher=None` is the offline heuristic (built-in rubrics only).

    `prose_rubric` scores records marked `meta.kind == "prose"` (the embedded corpus's language
    reference) with another rubric, so a mixed corpus is not judged by whether its prose parses as code.
    """
    if max_chars < 1:
        raise InputError(f"--max-chars={max_chars}: must be >= 1")
    for r in (rubric, prose_rubric):
        if teacher is None and r is not None and r.name not in BUILTIN_RUBRICS:
            raise InputError(f"--teacher={HEURISTIC} knows the built-in rubrics only "
                             f"({', '.join(BUILTIN_RUBRICS)}), not {r.name}; use a teacher endpoint "
                             "for your own rubric")
    spec = AnnotateSpec(rubric, teacher, None if cache is None else str(cache), max_chars, prose_rubric)
    if teacher is None:
        teacher_params = {"kind": HEURISTIC, "note": "offline stand-in computed from the text itself, "
                                                     "not a model's judgement"}
        settings = {}
    else:
        teacher_params = {"kind": "endpoint", "model": teacher.model, **teacher.sampling()}
        settings = {"teacher_url": teacher.endpoint, "concurrency": teacher.concurrency,
                    "timeout_s": teacher.timeout_s, "max_retries": teacher.max_retries,
                    "teacher_cache": spec.cache}
    parameters = {"rubric": rubric.name, "rubric_sha256": rubric.sha256, "teacher": teacher_params,
                  "max_chars": max_chars}
    if prose_rubric is not None:
        parameters.update(prose_rubric=prose_rubric.name, prose_rubric_sha256=prose_rubric.sha256)
    batch = 4 * teacher.concurrency if teacher is not None else 64
    return Stage("annotate", functools.partial(_AnnotateStep, spec), parameters, settings,
                 batch_size=max(16, batch))


class _AnnotateStep:
    def __init__(self, spec: AnnotateSpec):
        self._spec = spec
        self._client = None if spec.teacher is None else TeacherClient(spec.teacher, spec.cache)

    def __call__(self, records: list[dict], counts: Counts) -> list[dict]:
        spec = self._spec
        texts = [r["text"][:spec.max_chars] for r in records]
        rubrics = [spec.rubric_of(r) for r in records]
        if self._client is None:
            # The heuristic has no context window: it reads the whole text (cut code would not parse).
            answers = [Answer(text=heuristic.answer(r["text"], rubric.name))
                       for r, rubric in zip(records, rubrics)]
            teacher = HEURISTIC
        else:
            prompts = [Prompt([{"role": "user", "content": rubric.render(text=t)}], rubric.sha256)
                       for t, rubric in zip(texts, rubrics)]
            answers = self._client.ask(prompts, counts)
            teacher = spec.teacher.model
        for record, text, answer, rubric in zip(records, texts, answers, rubrics):
            if answer.error is not None:
                score, status, reason = None, "refused", answer.error
            else:
                score, reason = parse_score(answer)
                status = "scored" if reason is None else "unparsed"
            counts.add(status)
            record["meta"]["annotation"] = {
                "status": status, "score": score, "reason": reason, "teacher": teacher,
                "rubric": Path(rubric.name).name, "rubric_sha256": rubric.sha256[:16],
                "answer": answer.text,
                "truncated": self._client is not None and len(text) < len(record["text"])}
        return records

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
