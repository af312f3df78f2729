"""The lm-eval adapter, run through lm-eval's own evaluator on local tasks (nothing downloaded)."""

from __future__ import annotations

import json
import textwrap

import jax
import pytest

from phi_jax.config import preset
from phi_jax.evals import choice, perplexity
from phi_jax.inference import scoring
from phi_jax.inference.decode import generate
from phi_jax.model import Phi, init_params

lm_eval = pytest.importorskip("lm_eval")

DOCS = [
    {"context": "The sky is", "choices": [" blue", " green", " loud"], "label": 0,
     "text": "def add(a, b): return a + b"},
    {"context": "2 + 2 =", "choices": [" 4", " 5"], "label": 0, "text": "print('hello')"},
    {"context": "Python is a", "choices": [" language", " snake", " rock"], "label": 0,
     "text": "x = [i * i for i in range(3)]"},
]


class _AsciiTokenizer:
    bos_id = eos_id = 0
    pad_id = None
    vocab_size = 128

    def encode(self, text, add_bos=False, add_eos=False):
        return ([0] if add_bos else []) + [ord(ch) for ch in text]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids if i)


@pytest.fixture(scope="module")
def lm_and_results(tmp_path_factory, monkeypatch_module):
    from lm_eval.tasks import TaskManager

    from phi_jax.evals.lm_eval_adapter import PhiJaxLM

    monkeypatch_module.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch_module.setenv("HF_HUB_OFFLINE", "1")
    tmp = tmp_path_factory.mktemp("lm_eval_tasks")
    data = tmp / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    common = f"""
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {data}
        test_split: test
    """
    (tmp / "choice.yaml").write_text(textwrap.dedent(f"""
        task: phi_jax_tiny_choice{common}
        output_type: multiple_choice
        doc_to_text: "{{{{context}}}}"
        doc_to_choice: "{{{{choices}}}}"
        doc_to_target: "{{{{label}}}}"
        target_delimiter: ""
        metric_list:
          - metric: acc
          - metric: acc_norm
    """))
    (tmp / "rolling.yaml").write_text(textwrap.dedent(f"""
        task: phi_jax_tiny_rolling{common}
        output_type: loglikelihood_rolling
        doc_to_text: ""
        doc_to_target: "{{{{text}}}}"
        metric_list:
          - metric: word_perplexity
    """))
    (tmp / "gen.yaml").write_text(textwrap.dedent(f"""
        task: phi_jax_tiny_gen{common}
        output_type: generate_until
        doc_to_text: "{{{{context}}}}"
        doc_to_target: "{{{{choices[0]}}}}"
        generation_kwargs:
          until: ["zz"]
          max_gen_toks: 6
          do_sample: false
        metric_list:
          - metric: exact_match
    """))
    config = preset("test", max_len=32)
    model = Phi(config)
    variables = jax.jit(init_params, static_argnums=0)(config, jax.random.key(7))
    lm = PhiJaxLM(model=model, variables=variables, tokenizer=_AsciiTokenizer(), batch_size=4)
    out = lm_eval.simple_evaluate(
        model=lm, tasks=["phi_jax_tiny_choice", "phi_jax_tiny_rolling", "phi_jax_tiny_gen"],
        task_manager=TaskManager(include_path=str(tmp), include_defaults=False), log_samples=True, num_fewshot=0)
    return lm, out


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def _by_doc(samples):
    return {s["doc_id"]: s for s in samples}


@pytest.mark.slow
def test_registered_under_phi_jax():
    from lm_eval.api.registry import get_model

    from phi_jax.evals.lm_eval_adapter import PhiJaxLM

    assert get_model("phi_jax") is PhiJaxLM


@pytest.mark.slow
def test_choice_loglikelihoods_equal_phi_jax_scoring(lm_and_results):
    lm, out = lm_and_results
    samples = _by_doc(out["samples"]["phi_jax_tiny_choice"])
    ours = choice.evaluate(lm.model, lm.variables, lm.tokenizer, DOCS)
    for i, rec in enumerate(ours["examples"]):
        got = [r[0][0] for r in samples[i]["resps"]]  # (logprob, is_greedy) per choice
        assert got == pytest.approx(rec["logprobs"], abs=1e-5)
    assert out["results"]["phi_jax_tiny_choice"]["acc,none"] == pytest.approx(ours["acc"])
    assert out["results"]["phi_jax_tiny_choice"]["acc_norm,none"] == pytest.approx(
        ours["acc_norm"])


@pytest.mark.slow
def test_rolling_loglikelihood_equals_phi_jax_perplexity(lm_and_results):
    lm, out = lm_and_results
    samples = _by_doc(out["samples"]["phi_jax_tiny_rolling"])
    for i, doc in enumerate(DOCS):
        # lm-eval predicts every token after a prefix (BOS) token: perplexity with add_bos=True
        ref = perplexity.evaluate_texts(lm.model, lm.variables, lm.tokenizer, [doc["text"]],
                                        add_bos=True)
        assert samples[i]["resps"][0][0] == pytest.approx(-ref.nll, abs=1e-4)


@pytest.mark.slow
def test_generate_until_equals_phi_jax_generate(lm_and_results):
    lm, out = lm_and_results
    samples = _by_doc(out["samples"]["phi_jax_tiny_gen"])
    for i, doc in enumerate(DOCS):
        (ids,) = generate(lm.model, lm.variables, [lm.tokenizer.encode(doc["context"])],
                          max_new_tokens=6, temperature=0.0, stop_tokens=[0])
        expected = lm.tokenizer.decode(ids)
        expected = expected.split("zz")[0]
        assert samples[i]["resps"][0][0] == expected


@pytest.mark.slow
def test_long_text_rolling_windows_cover_every_token():
    """A text longer than max_len: the windows predict each token exactly once."""
    from lm_eval.api.instance import Instance

    from phi_jax.evals.lm_eval_adapter import PhiJaxLM

    config = preset("test", max_len=32)
    model = Phi(config)
    variables = jax.jit(init_params, static_argnums=0)(config, jax.random.key(7))
    tok = _AsciiTokenizer()
    lm = PhiJaxLM(model=model, variables=variables, tokenizer=tok, batch_size=4)
    text = "abcdefghij" * 8  # 80 tokens, 3 windows of <= 32 predictions
    req = Instance("loglikelihood_rolling", {}, (text,), 0)
    (total,) = lm.loglikelihood_rolling([req])
    ids = tok.encode(text)
    # lm-eval's disjoint windows (context_len=1): BOS then 32 tokens, one token of context then
    # 32 more, and the last 16 with the context that fills the window
    windows = [([0], ids[0:32]), ([ids[31]], ids[32:64]), (ids[47:64], ids[64:80])]
    assert [t for _, w in windows for t in w] == ids  # every token predicted exactly once
    ref = scoring.score_requests(model, variables, windows)
    assert total == pytest.approx(sum(s.logprob for s in ref), abs=1e-4)
