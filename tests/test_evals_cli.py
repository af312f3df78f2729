"""`phi-jax eval ...` end to end on a tiny HF checkpoint with its tokenizer (and a converted workdir)."""

from __future__ import annotations

import json

import pytest

import phi_jax
from phi_jax.config import preset
from phi_jax import cli
from phi_jax.evals import choice, perplexity
from phi_jax.inference import loader
from train_helpers import save_tiny_hf

TEXTS = ["def add(a, b):\n    return a + b\n", "The quick brown fox jumps over the lazy dog.",
         "for i in range(3):\n    print(i)\n"]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A random tiny model saved as an HF checkpoint, with a byte-level BPE tokenizer beside it."""
    return save_tiny_hf(tmp_path_factory.mktemp("hf"), TEXTS, max_len=512)


def _parse(argv):
    return cli.build_parser().parse_args(argv)


@pytest.mark.slow
def test_eval_humaneval_writes_results_samples_and_png(hf_dir, tmp_path):
    out = tmp_path / "out"
    args = _parse(["eval", "humaneval", f"--hf={hf_dir}", f"--output={out}", "--limit=2",
                   "--num-samples=3", "--temperature=0.8", "--max-new-tokens=4", "--k=1,2",
                   "--timeout=5", "--batch-size=8"])
    assert args.func(args) == 0
    res = json.loads((out / "humaneval_results.json").read_text())
    lines = [json.loads(x) for x in (out / "humaneval_samples.jsonl").read_text().splitlines()]
    assert len(lines) == 6 and {r["task_id"] for r in lines} == {"HumanEval/0", "HumanEval/1"}
    assert all(r["reason"] and r["status"] in ("passed", "failed", "timeout") for r in lines)
    passed = sum(r["passed"] for r in lines)
    assert res["metrics"]["num_passed"] == passed
    assert set(res["metrics"]["pass_at_k_curve"]) == {"pass@1", "pass@2", "pass@3"}
    assert res["metrics"]["pass@1"] == pytest.approx(passed / 6)
    assert res["metrics"]["sandbox"]  # which protections were active
    png = (out / "humaneval_pass_at_k.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 1000


@pytest.mark.slow
def test_eval_perplexity_and_choice_match_the_library(hf_dir, tmp_path):
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    out = tmp_path / "out"
    args = _parse(["eval", "perplexity", f"--hf={hf_dir}", f"--output={out}", "--source=jsonl",
                   f"--paths={data}", "--seq-len=64", "--batch-size=2"])
    assert args.func(args) == 0
    got = json.loads((out / "perplexity_results.json").read_text())["metrics"]
    model, variables = phi_jax.from_pretrained(hf_dir)
    tok = loader.load_tokenizer(hf_dir)
    docs = [tok.encode(t) + [tok.eos_id] for t in TEXTS]  # the pipeline ends documents with EOS
    ref = perplexity.evaluate_token_lists(model, variables, docs, row_len=64)
    assert got["num_tokens"] == ref.num_tokens
    assert got["loss"] == pytest.approx(ref.loss, rel=1e-5)

    examples = [{"context": "def add(a, b):", "choices": ["\n    return a + b", " pass"],
                 "label": 0},
                {"context": "The quick brown", "choices": [" fox", " dog", " cat"], "label": 0}]
    cdata = tmp_path / "choice.jsonl"
    cdata.write_text("".join(json.dumps(e) + "\n" for e in examples))
    args = _parse(["eval", "choice", f"--hf={hf_dir}", f"--output={out}", f"--data={cdata}"])
    assert args.func(args) == 0
    got = json.loads((out / "choice_results.json").read_text())["metrics"]
    ref = choice.evaluate(model, variables, tok, examples)
    assert got["num_examples"] == 2
    assert got["acc"] == ref["acc"] and got["acc_norm"] == ref["acc_norm"]
    assert len((out / "choice_examples.jsonl").read_text().splitlines()) == 2


def test_a_workdir_model_goes_through_the_checkpoint_loader(monkeypatch, tmp_path):
    """--model=WORKDIR (alias --checkpoint) goes through phi_jax.checkpoint.load_params_for_inference."""
    from phi_jax import checkpoint

    config = preset("test")
    seen = {}

    def fake_loader(workdir, *, step=None, dtype=None):
        seen["workdir"], seen["step"] = str(workdir), step
        return config, {"params": {}}, 7

    (tmp_path / "checkpoints").mkdir()
    monkeypatch.setattr(checkpoint, "load_params_for_inference", fake_loader)
    loaded = loader.load(tmp_path, step=7, layout="training")
    assert seen == {"workdir": str(tmp_path), "step": 7} and loaded.model.config == config
    assert loaded.metadata == {"source": "workdir", "path": str(tmp_path), "step": 7}
    assert _parse(["eval", "choice", f"--checkpoint={tmp_path}", "--output=x", "--data=y"]).model \
        == str(tmp_path)
    with pytest.raises(SystemExit):
        _parse(["eval", "choice", "--output=x", "--data=y"])  # no --model
