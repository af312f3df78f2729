"""HumanEval execution and pass@k: canonical solutions pass, wrong ones and exit tricks never do."""

from __future__ import annotations

import itertools
import json
import math
import os
from fractions import Fraction

import pytest

from phi_jax.evals import humaneval

ROOT = os.geteuid() == 0
# CI runs this beside other heavy tests on 2 cores: a sample that ends by itself (they take
# ~0.1-0.5 s here) gets a wall clock far beyond its need, so no verdict depends on the load.
# Only the infinite loop is meant to reach its (short) limit.
TIMEOUT_S = 120.0


@pytest.fixture(scope="module")
def problems():
    return humaneval.load_problems()


@pytest.mark.slow
def test_canonical_pass_empty_and_wrong_fail(problems, tmp_path):
    assert len(problems) == 164
    ids = list(problems)
    samples = [{"task_id": t, "completion": problems[t]["canonical_solution"]} for t in ids]
    samples += [{"task_id": t, "completion": ""} for t in ids]
    # "wrong": the next problem's canonical solution, which solves something else
    samples += [{"task_id": t, "completion": problems[ids[(i + 1) % len(ids)]]["canonical_solution"]}
                for i, t in enumerate(ids)]
    out = tmp_path / "samples.jsonl"
    res = humaneval.evaluate(problems, samples, ks=[1, 3], output_jsonl=str(out), progress=False,
                             timeout_s=TIMEOUT_S)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 3 * 164
    canonical, empty, wrong = records[:164], records[164:328], records[328:]
    assert [r["passed"] for r in canonical] == [True] * 164, [r for r in canonical if not r["passed"]]
    assert sum(r["passed"] for r in empty) == 0
    assert sum(r["passed"] for r in wrong) == 0
    assert all(r["reason"] and r["status"] in ("failed", "timeout") for r in empty + wrong)
    assert {r["completion_id"] for r in canonical} == {0}
    assert {r["completion_id"] for r in wrong} == {2}
    # every task has 1 of 3 samples right: pass@1 = 1/3, pass@3 = 1 exactly
    assert res["pass@1"] == pytest.approx(1 / 3) and res["pass@3"] == 1.0
    assert res["num_problems"] == 164 and res["num_passed"] == 164


TRICKS = {
    "os_exit_0": "    import os\n    os._exit(0)\n",
    "sys_exit_0_at_import": "    pass\nimport sys\nsys.exit(0)\n",
    "raise_system_exit": "    pass\nraise SystemExit(0)\n",
    "builtin_exit": "    pass\nexit()\n",
    "atexit_rewrites_status": ("    return None\nimport atexit, os\n"
                               "atexit.register(lambda: os._exit(0))\n"),
    "timer_thread_exits_0": ("    import threading, os, time\n"
                             "    threading.Timer(0.0, lambda: os._exit(0)).start()\n"
                             "    time.sleep(5)\n"),
    "forged_marker": ("    print('\\nPHI_JAX_CHECK_DONE ' + '0' * 32)\n"
                      "    import os\n    os._exit(0)\n"),
    "check_redefined_is_too_late": "    return None\ndef check(candidate):\n    pass\n",
    "infinite_loop": "    while True:\n        pass\n",
    "kill_own_process_group": "    import os, signal\n    os.killpg(0, signal.SIGKILL)\n",
}


@pytest.mark.parametrize("name", sorted(TRICKS))
def test_exit_tricks_never_pass(problems, name):
    problem = problems["HumanEval/0"]
    result = humaneval.check(problem, TRICKS[name],
                             timeout_s=3.0 if name == "infinite_loop" else TIMEOUT_S)
    assert not result.passed, result
    assert result.reason
    if name in ("os_exit_0", "sys_exit_0_at_import", "raise_system_exit", "builtin_exit",
                "atexit_rewrites_status", "timer_thread_exits_0", "forged_marker"):
        assert result.reason == "exited with status 0 before the tests completed", result
    if name == "infinite_loop":
        assert result.status == "timeout"
    if ROOT:
        assert "dedicated uid" in result.protections


def test_check_single_canonical_and_wrong(problems):
    p = problems["HumanEval/2"]
    ok = humaneval.check(p, p["canonical_solution"], timeout_s=TIMEOUT_S)
    assert ok.passed and ok.status == "passed" and ok.reason == "passed"
    bad = humaneval.check(p, "    return 0.0\n", timeout_s=TIMEOUT_S)
    assert not bad.passed and bad.status == "failed" and "AssertionError" in bad.reason


def test_check_on_fallback_backend(problems):
    p = problems["HumanEval/4"]
    assert humaneval.check(p, p["canonical_solution"], TIMEOUT_S, backend="fallback").passed
    early = humaneval.check(p, "    import sys\n    sys.exit(0)\n", TIMEOUT_S, backend="fallback")
    assert not early.passed and "before the tests completed" in early.reason


def _exact_pass_at_k(n, c, k):
    return 1 - Fraction(math.comb(n - c, k), math.comb(n, k))


def test_pass_at_k_matches_exact_combinatorics():
    # hand-computed: n=10, c=3, k=2 -> 1 - C(7,2)/C(10,2) = 1 - 21/45 = 8/15
    assert humaneval.pass_at_k(10, 3, 2) == pytest.approx(8 / 15, rel=1e-12)
    assert humaneval.pass_at_k(2, 1, 1) == pytest.approx(0.5)
    assert humaneval.pass_at_k(5, 0, 3) == 0.0
    assert humaneval.pass_at_k(5, 5, 1) == 1.0
    assert humaneval.pass_at_k(5, 3, 3) == 1.0  # n - c < k: any 3 samples contain a pass
    for n, c, k in itertools.product([1, 4, 20, 200], [0, 1, 3, 19], [1, 2, 10, 100]):
        if c <= n and k <= n:
            assert humaneval.pass_at_k(n, c, k) == pytest.approx(
                float(_exact_pass_at_k(n, c, k)), abs=1e-12), (n, c, k)
    # pass@1 is the plain success rate
    assert humaneval.pass_at_k(200, 37, 1) == pytest.approx(37 / 200)
    with pytest.raises(ValueError, match="k <= n"):
        humaneval.pass_at_k(3, 1, 5)


def test_mean_pass_at_k_skips_k_larger_than_samples():
    res = humaneval.mean_pass_at_k([(4, 1), (4, 0), (4, 4)], ks=[1, 2, 10])
    assert set(res) == {"pass@1", "pass@2"}
    assert res["pass@1"] == pytest.approx((0.25 + 0 + 1) / 3)
    assert res["pass@2"] == pytest.approx((0.5 + 0 + 1) / 3)  # 1 - C(3,2)/C(4,2) = 1/2


def test_truncate_at_stop_sequences():
    text = "    return x\n\ndef other():\n    pass\n"
    assert humaneval.truncate_at_stop(text) == "    return x\n"
    assert humaneval.truncate_at_stop("    a = 1\n    # fine\n#cut") == "    a = 1\n    # fine"
    assert humaneval.truncate_at_stop("    y = 2\nprint(y)") == "    y = 2"
    assert humaneval.truncate_at_stop("    if x:\n        pass") == "    if x:\n        pass"


class _CharTokenizer:
    """Characters as ids (ASCII < 128, the 'test' preset's vocab); id 0 is end of text."""

    eos_id, bos_id, pad_id, vocab_size = 0, 0, 0, 128

    def encode(self, text, add_bos=False, add_eos=False):
        return [min(ord(ch), 127) for ch in text] or [0]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids if i != 0)


def test_generate_samples_batches_truncates_and_round_trips(problems):
    """With a generator that returns the canonical solution, samples must pass: the plumbing
    (batching, ordering, stop truncation, decoding) keeps each completion on its own task."""
    subset = {t: problems[t] for t in ["HumanEval/0", "HumanEval/7", "HumanEval/23"]}
    tok = _CharTokenizer()
    by_prompt = {tuple(tok.encode(p["prompt"])): p["canonical_solution"] for p in subset.values()}
    calls = []

    def fake_generate(model, variables, prompts, max_new_tokens, temperature, top_p, seed,
                      stop_tokens):
        calls.append((len(prompts), seed, stop_tokens))
        return [tok.encode(by_prompt[tuple(p)] + "\ndef junk():\n    pass\n") for p in prompts]

    samples = humaneval.generate_samples(None, None, tok, subset, num_samples=2, batch_size=4,
                                         temperature=0.8, generate_fn=fake_generate,
                                         progress=False)
    assert [s["task_id"] for s in samples] == [t for t in subset for _ in range(2)]
    assert all("junk" not in s["completion"] for s in samples)
    assert [c[0] for c in calls] == [4, 2] and [c[1] for c in calls] == [0, 1]
    assert calls[0][2] == [0]
    res = humaneval.evaluate(subset, samples, ks=[1, 2], progress=False, timeout_s=TIMEOUT_S)
    assert res["pass@1"] == 1.0 and res["num_samples"] == 6


@pytest.mark.slow
def test_generate_samples_with_real_tiny_model(problems):
    """Through the real `phi_jax.generate` with a random tiny model: every sample is produced,
    decodes to text, and (being random) fails its tests with a reason."""
    import jax

    from phi_jax.config import preset
    from phi_jax.model import Phi, init_params

    config = preset("test", max_len=160)  # the shortest prompts, char-level: < 144 ids
    model = Phi(config)
    variables = jax.jit(init_params, static_argnums=0)(config, jax.random.key(0))
    subset = {t: problems[t] for t in ["HumanEval/53", "HumanEval/55"]}
    samples = humaneval.generate_samples(model, variables, _CharTokenizer(), subset,
                                         num_samples=2, temperature=1.0, max_new_tokens=8,
                                         batch_size=4, progress=False)
    assert len(samples) == 4 and all(isinstance(s["completion"], str) for s in samples)
    res = humaneval.evaluate(subset, samples, ks=[1], progress=False, timeout_s=TIMEOUT_S)
    assert res["pass@1"] == 0.0
    assert all(r["reason"] for r in res["results"])
