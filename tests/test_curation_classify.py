"""Embeddings, quality heads, and annotate -> train-classifier -> score -> filter through the CLI.

References: a forward pass of each text alone (embeddings), `hidden @ lm_head` = logits (the hidden
states), scikit-learn's own predict and metrics (heads, report), and a real `phi-jax serve` app on
a loopback port as the teacher.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from phi_jax import cli
from phi_jax.config import preset
from phi_jax.curation.quality import classify
from phi_jax.data import corpus, records
from phi_jax.inference import loader
from phi_jax.inference.embed import Embedder
from phi_jax.model import Phi, init_params
from phi_jax.tokenizer import train_bpe
from train_helpers import save_tiny_hf

pytest.importorskip("sklearn")
TEXTS = ["def add(a, b):\n    return a + b\n", "The quick brown fox jumps over the lazy dog.",
         "for i in range(3):\n    print(i)\n", "class A:\n    '''A thing.'''\n    pass\n"]
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    """A random tiny model saved as an HF checkpoint with a byte-level BPE tokenizer beside it."""
    return save_tiny_hf(tmp_path_factory.mktemp("hf"), TEXTS)


def test_return_hidden_is_what_the_lm_head_reads():
    config = preset("test")
    model, variables = Phi(config), jax.jit(init_params, static_argnums=0)(config, jax.random.key(1))
    tokens = jnp.array([[3, 1, 4, 1, 5], [9, 2, 6, 5, 3]])
    apply = jax.jit(model.apply, static_argnames="return_hidden")
    hidden, _ = apply(variables, tokens, return_hidden=True)
    logits, _ = apply(variables, tokens)
    head = variables["params"]["lm_head"]
    assert hidden.shape == (2, 5, config.d_model)
    np.testing.assert_allclose(hidden @ head["kernel"] + head["bias"], logits, atol=1e-5)


@pytest.mark.slow
def test_embeddings_are_each_texts_own_mean_hidden_state(tiny_hf):
    model, variables, tok = loader.load(tiny_hf)
    texts = TEXTS + ["", "x" * 400, "def f():\n    return 1\n" * 6]
    embedder = Embedder(model, variables, tok, max_tokens=24, batch_size=3)
    got = embedder(texts)
    expected_tokens = 0
    alone = jax.jit(lambda v, ids: model.apply(v, ids, return_hidden=True)[0])  # one text, no padding
    for text, row in zip(texts, got):
        ids = tok.encode(text)[:24] or [tok.eos_id]
        expected_tokens += len(ids)
        hidden = alone(variables, jnp.array([ids]))
        np.testing.assert_allclose(row, np.asarray(hidden[0]).mean(axis=0), atol=2e-5)
    assert embedder.tokens == expected_tokens
    np.testing.assert_allclose(Embedder(model, variables, tok, max_tokens=24, batch_size=1)(texts), got, atol=2e-5)


@pytest.mark.parametrize("head, classes", [("ridge", 6), ("logistic", 6), ("logistic", 2), ("forest", 6)])
def test_heads_predict_what_scikit_learn_predicts(head, classes):
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(0)
    x = rng.normal(size=(120, 8))
    y = np.clip(np.rint(x[:, 0] * 1.5 + 2.5 + rng.normal(scale=0.5, size=120)), 0, 5)
    if classes == 2:
        y = np.where(y >= 3, 5.0, 0.0)
    params = classify.fit_head(head, x[:90], y[:90], seed=0)
    z = StandardScaler().fit(x[:90]).transform(x[90:])
    model = params["_sklearn"]
    want = model.predict_proba(z) @ model.classes_ if head == "logistic" else model.predict(z)
    np.testing.assert_allclose(classify.predict(params, x[90:]), np.clip(want, 0, 5), atol=1e-9)


def test_binary_metrics_match_scikit_learn():
    from sklearn import metrics

    rng = np.random.default_rng(1)
    y, pred = rng.integers(0, 6, 200).astype(float), rng.uniform(0, 5, 200)
    got = classify.binary_metrics(y, pred, 3.0)
    p, r, f, _ = metrics.precision_recall_fscore_support(y >= 3, pred >= 3, average="binary")
    assert (got["precision"], got["recall"], got["f1"]) == pytest.approx((p, r, f))
    assert got["confusion"]["matrix"] == metrics.confusion_matrix(y >= 3, pred >= 3).tolist()
    assert np.sum(got["score_confusion"]["matrix"]) == 200


def _corpus_jsonl(path, n=80):
    names = [name for name in corpus.document_names() if name.endswith(".py")][:n]
    path.write_text("".join(json.dumps({"id": name, "text": corpus.read_document(name)}) + "\n" for name in names))
    return str(path)


@pytest.mark.slow
def test_annotate_train_score_filter_through_the_cli(tmp_path, tiny_hf, capsys):
    src = _corpus_jsonl(tmp_path / "in.jsonl")
    ann, clf, scored, kept = (tmp_path / n for n in ("ann", "clf", "scored", "kept"))

    def run(*argv):
        return cli.main(["data", *argv] + (["--no-progress"] if argv[0] != "train-classifier" else []))

    assert run("annotate", f"--input={src}", f"--output={ann}", "--teacher=heuristic", "--rubric=code") == 0
    assert run("train-classifier", f"--annotations={ann}", f"--embedder={tiny_hf}", "--head=ridge",
               f"--output={clf}", "--max-tokens=64") == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    report = json.loads((clf / "report.json").read_text())
    held = report["held_out"]
    assert report["train"] + report["test"] == 80 and held["n"] == report["test"] == 16
    assert sum(map(sum, held["confusion"]["matrix"])) == 16 and 0.0 <= held["f1"] <= 1.0
    assert printed["f1"] == round(held["f1"], 4) and report["embedding"]["tokens"] > 0
    assert (clf / "report.png").read_bytes()[:8] == PNG
    assert records.read_manifest(clf)["stage"] == "train-classifier"

    assert run("score", f"--input={ann}", f"--classifier={clf}", f"--output={scored}") == 0
    meta, params = classify.load_classifier(clf)
    model, variables, tok = loader.load(tiny_hf)
    embedder = Embedder(model, variables, tok, max_tokens=64)
    got = list(records.iter_output(scored))
    want = classify.predict(params, embedder([r["text"] for r in got]))
    np.testing.assert_allclose([r["meta"]["quality"] for r in got], want, atol=1e-4)
    assert all(r["meta"]["annotation"]["teacher"] == "heuristic" for r in got)  # earlier meta kept

    assert run("filter", f"--input={scored}", "--min-quality=2.5", f"--output={kept}") == 0
    passing = [r["id"] for r in got if r["meta"]["quality"] >= 2.5]
    assert [r["id"] for r in records.iter_output(kept)] == passing
    counts = records.read_manifest(kept)["counts"]
    assert counts["records_out"] == len(passing) and counts["dropped"].get("quality_below_min", 0) == 80 - len(passing)


def test_train_classifier_refuses_too_few_or_uniform_scores(tmp_path, tiny_hf, capsys):
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"id": str(i), "text": "x = 1\n"}) + "\n" for i in range(12)))
    assert cli.main(["data", "annotate", f"--input={src}", f"--output={tmp_path / 'a'}", "--teacher=heuristic",
                     "--rubric=code", "--no-progress"]) == 0
    rc = cli.main(["data", "train-classifier", f"--annotations={tmp_path / 'a'}", f"--embedder={tiny_hf}",
                   f"--output={tmp_path / 'c'}"])
    err = capsys.readouterr().err
    assert rc == 2 and "12 scored annotations with 1 distinct score(s)" in err
    assert not (tmp_path / "c").exists()


@pytest.fixture(scope="module")
def served_teacher():
    """A random tiny model behind `phi-jax serve`'s app on a loopback port (module-scoped: uvicorn
    configures logging when it starts, which must not happen inside a test's log capture)."""
    from phi_jax.serve import Engine, ServerConfig, ServerThread, create_app

    tok = train_bpe(TEXTS * 4, vocab_size=300)
    config = preset("test", vocab_size=tok.vocab_size, max_len=256, eos_token_id=tok.eos_id)
    variables = jax.jit(init_params, static_argnums=0)(config, jax.random.key(0))
    engine = Engine(Phi(config), variables, num_slots=4, max_len=256)
    with ServerThread(create_app(engine, tok, ServerConfig(model_name="tiny"))) as server:
        yield server.url + "/v1"


@pytest.mark.slow
def test_a_served_model_is_a_teacher_and_its_answers_are_cached(tmp_path, served_teacher):
    (tmp_path / "rubric.txt").write_text("Rate for a student: {text}\nEnd with: Educational score: N")
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"id": str(i), "text": t}) + "\n" for i, t in enumerate(TEXTS)))

    def annotate(out):
        return cli.main(["data", "annotate", f"--input={src}", f"--output={tmp_path / out}",
                         f"--teacher={served_teacher}", "--teacher-model=tiny", f"--rubric={tmp_path / 'rubric.txt'}",
                         "--max-tokens=8", "--concurrency=4", f"--teacher-cache={tmp_path / 'cache.sqlite'}",
                         "--no-progress"])

    assert annotate("first") == 0 and annotate("second") == 0
    first, second = records.read_manifest(tmp_path / "first"), records.read_manifest(tmp_path / "second")
    stage = first["counts"]["stage"]
    assert stage["teacher_answers"] == 4 and stage["teacher_prompt_tokens"] > 0
    assert 0 < stage["teacher_completion_tokens"] <= 4 * 8
    assert second["counts"]["stage"]["teacher_cache_hits"] == 4 and "teacher_requests" not in second["counts"]["stage"]
    for record in records.iter_output(tmp_path / "first"):
        a = record["meta"]["annotation"]
        assert a["teacher"] == "tiny" and isinstance(a["answer"], str)
        assert (a["status"] == "scored") == (a["reason"] is None)  # a random model rarely writes a score
    assert [r["meta"] for r in records.iter_output(tmp_path / "first")] == \
        [r["meta"] for r in records.iter_output(tmp_path / "second")]
