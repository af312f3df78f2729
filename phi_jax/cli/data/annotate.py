r"""`phi-jax data annotate`: a teacher scores every record against a rubric (0-5).

    phi-jax data annotate --input=default --output=out/ann --rubric=code \
        --teacher=http://127.0.0.1:8000/v1 --teacher-model=SmolLM2-135M-Instruct --concurrency=8
    phi-jax data annotate --input='docs/*.jsonl' --output=out/ann --rubric=my_rubric.txt --teacher=URL ...
    phi-jax data annotate --input=default --output=out/ann-h --rubric=code --teacher=heuristic

Each record gets meta.annotation (status scored / uncertain / unparsed / refused, the score, the
teacher's answer). --scoring=logprobs (the default) asks for one token after the rubric's score line
and records the expected score over the score tokens' top-20 log-probs, their distribution and the
probability mass they carried (below --min-score-mass: `uncertain`); --scoring=answer parses the
score line the teacher writes. An endpoint that returns no log-probs falls back to answer, warned. Answers are cached in OUTPUT/teacher_cache.sqlite (or --teacher-cache) before
they are used: a killed run, rerun with the same command, never asks for an answer twice.
--teacher=heuristic is an offline stand-in computed from the text itself, named as such in every
output. The API key, if the endpoint needs one, is read from $PHI_JAX_TEACHER_API_KEY or $OPENAI_API_KEY.
"""

from __future__ import annotations

import argparse

from phi_jax.cli.data.common import add_run_arguments, add_teacher_arguments, run, teacher_config


def register(sub) -> None:
    p = sub.add_parser("annotate", help="score records with a teacher (or the offline heuristic)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(p)
    add_teacher_arguments(p, heuristic=True)
    p.add_argument("--rubric", default="edu",
                   help="edu (FineWeb-Edu's 0-5 educational value), code (phi-1's value for learning to "
                        "code), or a prompt file with {text}")
    p.add_argument("--prose-rubric", default="",
                   help="another rubric for records marked meta.kind=prose (the corpus's language "
                        "reference), e.g. --rubric=code --prose-rubric=edu")
    p.add_argument("--max-chars", type=int, default=4000,
                   help="characters of each document shown to the teacher")
    p.add_argument("--scoring", default="logprobs",
                   help="logprobs (expected score from the score token's top-20 log-probs; falls back "
                        "to answer when the endpoint returns none) or answer (parse the written score)")
    p.add_argument("--min-score-mass", type=float, default=0.5,
                   help="with --scoring=logprobs: the least probability the score tokens 0-5 must carry, "
                        "else the record is `uncertain` (never silently scored)")
    p.set_defaults(func=_run)


def _run(args) -> int:
    from phi_jax.curation.quality.annotate import HEURISTIC, annotate_stage, load_rubric
    from phi_jax.curation.teacher.client import default_cache_path

    rubric = load_rubric(args.rubric)
    prose = load_rubric(args.prose_rubric) if args.prose_rubric else None
    if args.teacher == HEURISTIC:
        stage = annotate_stage(rubric, None, cache=None, max_chars=args.max_chars, prose_rubric=prose)
    else:
        teacher = teacher_config(args)
        cache = args.teacher_cache or default_cache_path(args.output)
        stage = annotate_stage(rubric, teacher, cache=cache, max_chars=args.max_chars, prose_rubric=prose,
                               scoring=args.scoring, min_mass=args.min_score_mass)
    return run(args, stage)
