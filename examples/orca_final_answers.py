"""Orca-2 answers held to a final line the scorer reads: the structured-output regex of a task.

    python examples/orca_final_answers.py

`phi-jax data instruct` asks the teacher for every task with a reference answer with
`structured_outputs: {"regex": final_answer_regex(task)}`: free reasoning, then a last line
`Answer: <one line>` (for a choice task, `Answer: <one of its letters>`). This prints the regex of
a free and of a choice task, and scores answers that match them the way strategy selection does.
A task without a reference gets no constraint (None).
"""

import re

from phi_jax.data.answers import final_answer_regex, load_scorer
from phi_jax.data.tasks import Task


def main() -> None:
    score = load_scorer("auto")
    tasks = [Task("r1", "return_value", "What does len('abc') return?", answer="3"),
             Task("m1", "multiple_choice", "Which function removes common leading whitespace?",
                  answer="A", choices=("textwrap.dedent", "textwrap.indent", "textwrap.fill")),
             Task("s1", "topic_summary", "Summarise the with statement.")]
    answers = ["1. len counts the characters: a, b, c.\nAnswer: 3",
               "dedent removes it; indent adds a prefix; fill wraps.\nAnswer: A",
               "It runs a block inside a context manager."]
    for task, answer in zip(tasks, answers):
        regex = final_answer_regex(task)
        print(f"{task.id}: regex {regex!r}")
        if regex is None:
            print("    no reference: asked without a constraint")
            continue
        assert re.fullmatch(regex, answer), answer
        print(f"    {answer.splitlines()[-1]!r} -> score {score(answer, task)}")


if __name__ == "__main__":
    main()
