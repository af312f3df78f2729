"""Annotation: ask a teacher to score each record against a rubric; record its answer as it was.

    stage = annotate_stage(load_rubric("edu"), TeacherConfig(url, model), cache=out / "teacher_cache.sqlite")
    run_stage(stage, "default", out)

Two ways to get a score (`scoring`):
  * "logprobs" (the default): the prompt ends inside the assistant's turn with the rubric's score
    line ("Educational score: ", vLLM's `continue_final_message`), one token is asked for with its
    top-20 log-probs, and the score is the expected value over the score tokens 0-5. One prefill and
    one token per document, nothing to parse, and the distribution's mean judges better than the
    greedy digit (Wang, Zhang, Choi 2025, arXiv 2503.03064). When the score tokens carry less than
    `min_mass` of the probability the record is `uncertain`: never silently scored. An endpoint
    that returns no log-probs (or refuses the request) falls back to "answer", with one warning.
  * "answer": the teacher writes its reasons and an `Educational score: N` line that is parsed.

Each record gets `meta.annotation`:
    {"status": "scored" | "uncertain" | "unparsed" | "refused", "score": number | null,
     "reason": str | null, "scoring": "logprobs" | "answer", "teacher": model name or "heuristic",
     "rubric": name, "rubric_sha256": first 16 hex digits, "answer": the teacher's answer (its
     token, with logprobs), "truncated": whether the text was cut to max_chars}
and with logprobs also "expected_score" (also when uncertain), "distribution" ({"0".."5": the
score tokens' probabilities renormalised}) and "score_mass" (what they carried before that).
In "answer" scoring a score is only ever the number the teacher wrote in its `Educational score: N`
line (the last one, a whole number in 0-5); an answer without one is `unparsed` with the reason.
Annotation drops nothing: filter on `annotation.score` or a classifier's `quality` afterwards.

Rubrics are prompt files with a `{text}` placeholder: the built-in `edu` (FineWeb-Edu's additive
0-5 educational-value prompt) and `code` (phi-1's "educational value for a student learning basic
coding concepts", on the same scale) live in `phi_jax/curation/prompts/`; `--rubric=FILE` uses
yours, which must ask for the same final `Educational score: N` line.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import re
from pathlib import Path

from phi_jax.curation.core.stage import Counts, Stage
from phi_jax.curation.core.templates import PromptTemplate, load_template
from phi_jax.curation.teacher import heuristic
from phi_jax.curation.teacher.client import Answer, Prompt, TeacherClient, TeacherConfig  # noqa: F401
from phi_jax.errors import InputError

BUILTIN_RUBRICS = ("edu", "code")
HEURISTIC = "heuristic"
MIN_SCORE, MAX_SCORE = 0, 5
PLACEHOLDER = "{text}"
SCORINGS = ("logprobs", "answer")
SCORE_PREFIX = "Educational score: "  # the rubrics' score line, where a logprobs prompt ends
TOP_LOGPROBS = 20  # OpenAI's most; the score tokens are among them whenever they carry real mass
DEFAULT_MIN_MASS = 0.5
_LOGPROBS_FIELDS = ("logprobs", "continue_final_message", "add_generation_prompt")
_log = logging.getLogger(__name__)
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


def score_from_logprobs(top_logprobs, min_mass: float = DEFAULT_MIN_MASS) -> dict:
    """The expected score over the score tokens among a first token's top log-probs.

    Args:
      top_logprobs: [[token text, log-prob], ...]; a token counts as score d when its text,
        stripped of whitespace, is the digit d in 0-5 (" 3" and "3" are the same score).
      min_mass: below this total probability on the score tokens the answer is `uncertain`.
    Returns {"status": "scored" | "uncertain", "score": float | None, "expected_score",
    "distribution", "score_mass", "reason"}.
    """
    probs = [0.0] * (MAX_SCORE - MIN_SCORE + 1)
    for token, logprob in top_logprobs or ():
        text = str(token).strip()
        if len(text) == 1 and text.isdigit() and MIN_SCORE <= int(text) <= MAX_SCORE:
            probs[int(text) - MIN_SCORE] += math.exp(float(logprob))
    mass = sum(probs)
    if mass <= 0.0:
        return {"status": "uncertain", "score": None, "expected_score": None, "distribution": None,
                "score_mass": 0.0, "reason": "no score token 0-5 among the answer's top log-probs"}
    expected = sum((MIN_SCORE + d) * p for d, p in enumerate(probs)) / mass
    out = {"expected_score": round(expected, 6), "score_mass": round(mass, 6),
           "distribution": {str(MIN_SCORE + d): round(p / mass, 6) for d, p in enumerate(probs)}}
    if mass < min_mass:
        return {**out, "status": "uncertain", "score": None,
                "reason": f"the score tokens carried {mass:.2f} of the probability, below "
                          f"--min-score-mass={min_mass:g}"}
    return {**out, "status": "scored", "score": out["expected_score"], "reason": None}


def logprobs_prompt(rubric: "Rubric", text: str) -> Prompt:
    """The one-token request of logprobs scoring: the rubric, then the assistant's turn opened with
    the score line, continued (vLLM's continue_final_message) for one token with top-20 log-probs.

    Its cache key differs from the answer prompt's (messages, fields and a `:logprobs` template
    tag), so the two scorings never share or overwrite answers."""
    messages = [{"role": "user", "content": rubric.render(text=text)},
                {"role": "assistant", "content": SCORE_PREFIX}]
    return Prompt(messages, f"{rubric.sha256}:logprobs",
                  request={"max_tokens": 1, "temperature": 0.0, "logprobs": True,
                           "top_logprobs": TOP_LOGPROBS, "continue_final_message": True,
                           "add_generation_prompt": False})


def answer_prompt(rubric: "Rubric", text: str) -> Prompt:
    """The free-text request of answer scoring (reasons, then the score line)."""
    return Prompt([{"role": "user", "content": rubric.render(text=text)}], rubric.sha256)


@dataclasses.dataclass(frozen=True)
class AnnotateSpec:
    """Everything a worker needs to build the annotation step (picklable)."""

    rubric: Rubric
    teacher: TeacherConfig | None  # None: the heuristic stand-in
    cache: str | None
    max_chars: int
    prose_rubric: Rubric | None = None  # for records with meta.kind == "prose" (None: `rubric`)
    scoring: str = "logprobs"
    min_mass: float = DEFAULT_MIN_MASS

    def rubric_of(self, record: dict) -> Rubric:
        if self.prose_rubric is not None and record.get("meta", {}).get("kind") == "prose":
            return self.prose_rubric
        return self.rubric


def annotate_stage(rubric: Rubric, teacher: TeacherConfig | None, *, cache: str | Path | None,
                   max_chars: int = 4000, prose_rubric: Rubric | None = None, scoring: str = "logprobs",
                   min_mass: float = DEFAULT_MIN_MASS) -> Stage:
    """The annotation stage; `teacher=None` is the offline heuristic (built-in rubrics only).

    `scoring` is "logprobs" (expected score from one token's log-probs; `min_mass` is the least
    probability the score tokens must carry, else `uncertain`) or "answer" (parse the teacher's
    written score); see the module docstring. The heuristic always answers.

    `prose_rubric` scores records marked `meta.kind == "prose"` (the embedded corpus's language
    reference) with another rubric, so a mixed corpus is not judged by whether its prose parses as code.
    """
    if max_chars < 1:
        raise InputError(f"--max-chars={max_chars}: must be >= 1")
    if scoring not in SCORINGS:
        raise InputError(f"--scoring={scoring!r}: choose one of {', '.join(SCORINGS)}")
    if not 0.0 <= min_mass <= 1.0:
        raise InputError(f"--min-score-mass={min_mass}: a probability, between 0 and 1")
    if teacher is None:
        scoring = "answer"
    for r in (rubric, prose_rubric):
        if teacher is None and r is not None and r.name not in BUILTIN_RUBRICS:
            raise InputError(f"--teacher={HEURISTIC} knows the built-in rubrics only "
                             f"({', '.join(BUILTIN_RUBRICS)}), not {r.name}; use a teacher endpoint "
                             "for your own rubric")
    spec = AnnotateSpec(rubric, teacher, None if cache is None else str(cache), max_chars, prose_rubric,
                        scoring, min_mass)
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
                  "max_chars": max_chars, "scoring": scoring}
    if scoring == "logprobs":
        parameters["min_score_mass"] = min_mass
    if prose_rubric is not None:
        parameters.update(prose_rubric=prose_rubric.name, prose_rubric_sha256=prose_rubric.sha256)
    batch = 4 * teacher.concurrency if teacher is not None else 64
    return Stage("annotate", functools.partial(_AnnotateStep, spec), parameters, settings,
                 batch_size=max(16, batch))


class _AnnotateStep:
    def __init__(self, spec: AnnotateSpec):
        self._spec = spec
        self._client = None if spec.teacher is None else TeacherClient(spec.teacher, spec.cache)
        self._scoring = spec.scoring  # "answer" once the endpoint showed it returns no log-probs

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
            answers, modes = self._ask(texts, rubrics, counts)
            teacher = spec.teacher.model
        for i, (record, text, answer, rubric) in enumerate(zip(records, texts, answers, rubrics)):
            extra = {}
            mode = "answer" if self._client is None else modes[i]
            if answer.error is not None:
                score, status, reason = None, "refused", answer.error
            elif mode == "logprobs":
                extra = score_from_logprobs(answer.top_logprobs, spec.min_mass)
                score, status, reason = extra.pop("score"), extra.pop("status"), extra.pop("reason")
            else:
                score, reason = parse_score(answer)
                status = "scored" if reason is None else "unparsed"
            counts.add(status)
            record["meta"]["annotation"] = {
                "status": status, "score": score, "reason": reason, "scoring": mode, "teacher": teacher,
                "rubric": Path(rubric.name).name, "rubric_sha256": rubric.sha256[:16],
                "answer": answer.text,
                "truncated": self._client is not None and len(text) < len(record["text"]), **extra}
        return records

    def _ask(self, texts, rubrics, counts) -> tuple[list, list[str]]:
        """Answers and the scoring each was asked with; logprobs answers that come back without
        log-probs (or refused) are asked again as answers, and the rest of the run asks that way."""
        if self._scoring == "answer":
            return self._client.ask([answer_prompt(r, t) for t, r in zip(texts, rubrics)], counts), \
                ["answer"] * len(texts)
        answers = self._client.ask([logprobs_prompt(r, t) for t, r in zip(texts, rubrics)], counts)
        modes = ["logprobs"] * len(texts)
        refused = lambda e: "HTTP 400" in e and any(f in e for f in _LOGPROBS_FIELDS)  # noqa: E731
        redo = [i for i, a in enumerate(answers)
                if a.top_logprobs is None and (a.error is None or refused(a.error))]
        if redo:
            if self._scoring == "logprobs":
                _log.warning("the teacher at %s returned no log-probs for the score (%s); scoring "
                             "from written answers instead (--scoring=answer)", self._spec.teacher.endpoint,
                             answers[redo[0]].error or "a reply without logprobs")
                self._scoring = "answer"
            again = self._client.ask([answer_prompt(rubrics[i], texts[i]) for i in redo], counts)
            for i, answer in zip(redo, again):
                answers[i], modes[i] = answer, "answer"
            counts.add("logprobs_fallback", len(redo))
        return answers, modes

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
