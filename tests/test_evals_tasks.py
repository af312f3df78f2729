"""`phi-jax eval tasks` / `evaluate_tasks` on a tiny random model: the before/after evaluation.

Reference: each held-out prompt rendered and generated alone (batch 1, `phi_jax.generate`); the
tasks' references are those answers for half the tasks and wrong for the rest, so the known score
is exactly one half, per type and overall.
"""

from __future__ import annotations

import json

import pytest

from phi_jax import cli
from phi_jax.data.tasks import GENERIC_SYSTEM_MESSAGE
from phi_jax.evals.tasks import evaluate_tasks, tasks_report
from phi_jax.inference import loader
from phi_jax.inference.decode import generate
from phi_jax.chat import render_chat
from train_helpers import save_tiny_hf

TEXTS = ["def add(a, b):\n    return a + b\n", "What does add(1, 2) return? Answer: 3",
         "Which function has this docstring? A. add B. sub"]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return save_tiny_hf(tmp_path_factory.mktemp("hf"), TEXTS)


def _alone(loaded, prompt: str, max_new_tokens: int = 6) -> str:
    messages = [{"role": "system", "content": GENERIC_SYSTEM_MESSAGE}, {"role": "user", "content": prompt}]
    ids = loaded.tokenizer.encode(render_chat(messages, loaded.chat_template,
                                              **loaded.tokenizer.special_tokens_map))
    eos = loaded.tokenizer.eos_id
    (new,) = generate(loaded.model, loaded.variables, [ids], max_new_tokens, stop_tokens=[eos])
    return loaded.tokenizer.decode([t for t in new if t != eos]).strip()


@pytest.mark.slow
def test_eval_tasks_scores_the_known_half_and_the_report_compares_models(hf_dir, tmp_path):
    loaded = loader.load(hf_dir)
    prompts = [f"What does add({i}, {i + 1}) return?" for i in range(6)]
    answers = [_alone(loaded, p) for p in prompts]
    tasks = [{"id": f"t{i}", "type": "even" if i % 2 == 0 else "odd", "prompt": p, "split": "heldout",
              "answer": answers[i] if i < 3 and answers[i] else f"not-{i}"} for i, p in enumerate(prompts)]
    tasks.append({"id": "train-only", "type": "even", "prompt": "add(0, 0)?", "answer": "0",
                  "split": "train"})
    path = tmp_path / "tasks.jsonl"
    path.write_text("".join(json.dumps(t) + "\n" for t in tasks))
    out = tmp_path / "out"
    assert cli.main(["eval", "tasks", f"--model={hf_dir}", f"--tasks={path}", f"--output={out}",
                     "--max-new-tokens=6", "--batch-size=3"]) == 0
    metrics = json.loads((out / "tasks_results.json").read_text())["metrics"]
    examples = [json.loads(line) for line in (out / "tasks_examples.jsonl").read_text().splitlines()]
    hits = sum(bool(answers[i]) for i in range(3))
    assert [e["answer"] for e in examples] == answers  # batched answers equal each prompt generated alone
    assert [e["score"] for e in examples] == [float(i < 3 and bool(answers[i])) for i in range(6)]
    assert metrics["num_scored"] == 6 and metrics["score"] == pytest.approx(hits / 6)
    assert metrics["by_type"]["even"]["num_scored"] == 3  # the train task is not evaluated

    report = tasks_report({"base": metrics, "tuned": {**metrics, "score": 1.0}}, tmp_path / "report")
    assert set(report) == {"base", "tuned"} and report["tuned"]["by_type"] == metrics["by_type"]
    assert (tmp_path / "report" / "tasks_report.png").read_bytes().startswith(b"\x89PNG")


def test_evaluate_tasks_skips_tasks_without_a_reference_or_room_to_answer():
    class Tok:
        eos_id = 0

        def encode(self, text, add_bos=False):
            return [1] * len(text)

    class Model:
        class config:
            max_len = 20

    def never(*args, **kwargs):
        raise AssertionError("nothing to generate")

    tasks = [{"id": "a", "type": "t", "prompt": "p"},
             {"id": "b", "type": "t", "prompt": "x" * 30, "answer": "1"}]
    result = evaluate_tasks(Model(), {}, Tok(), tasks, render=lambda m: m[-1]["content"], max_new_tokens=4,
                            generate_fn=never)
    assert result["skipped"] == {"no_reference": 1, "prompt_too_long": 1} and result["num_scored"] == 0
