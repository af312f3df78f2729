"""`phi-jax data dedup` on corpora built here, with near-duplicate pairs planted at measured Jaccard.

References: the exact Jaccard similarity of the pairs' word 5-gram sets (Python sets of strings),
`core.text.normalize`'s one-line definition, datasketch's choice of bands x rows, and the local
runner's own output (for Beam, worker processes and resumed runs).
"""

import json
import random
import string

import numpy as np
import pytest

from phi_jax import cli
from phi_jax.curation.core.runners import run_stage
from phi_jax.curation.core.text import normalize
from phi_jax.curation.dedup import index as dedup_index, minhash, remove as dedup, shingles
from phi_jax.data import records

pytest.importorskip("rensa")
THRESHOLD = 0.8


def _words(rng: random.Random, n: int) -> list[str]:
    return [f"w{rng.randrange(200_000)}" for _ in range(n)]


def _variant(rng: random.Random, words: list[str], edits: int) -> list[str]:
    """`edits` random word replacements, insertions or deletions."""
    out = list(words)
    for _ in range(edits):
        at, kind = rng.randrange(len(out)), rng.random()
        if kind < 0.5:
            out[at] = f"x{rng.randrange(10**9)}"
        elif kind < 0.75:
            out.insert(at, f"y{rng.randrange(10**9)}")
        elif len(out) > 10:
            del out[at]
    return out


def _grams(text: str, n: int = 5) -> set[str]:
    words = normalize(text).split()
    return {" ".join(words[i:i + n]) for i in range(max(len(words) - n + 1, 1))}


def exact_jaccard(a: str, b: str) -> float:
    x, y = _grams(a), _grams(b)
    return len(x & y) / len(x | y)


def _planted_corpus(seed: int = 0, pairs: int = 160, singles: int = 60):
    """Records (pair members at random positions) and [(doc a, doc b, exact Jaccard)]."""
    rng = random.Random(seed)
    texts, planted = [], []
    for p in range(pairs):
        base = _words(rng, rng.randrange(80, 160))
        edits = rng.choice([0, 1, 1, 2, 2, 3, 4, 6, 8, 10, 14, 20, 30])
        texts.append((" ".join(base), p, 0))
        texts.append((" ".join(_variant(rng, base, edits)), p, 1))
    texts += [(" ".join(_words(rng, rng.randrange(20, 160))), None, None) for _ in range(singles)]
    rng.shuffle(texts)
    where = {}
    for doc, (_, p, side) in enumerate(texts):
        if p is not None:
            where[(p, side)] = doc
    for p in range(pairs):
        a, b = sorted((where[(p, 0)], where[(p, 1)]))
        planted.append((a, b, exact_jaccard(texts[a][0], texts[b][0])))
    rows = [{"id": f"doc-{i}", "text": t, "meta": {"i": i}} for i, (t, _, _) in enumerate(texts)]
    return rows, planted


def _write(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _dedup(src: str, out, *extra: str) -> int:
    return cli.main(["data", "dedup", f"--input={src}", f"--output={out}", f"--threshold={THRESHOLD}",
                     "--shard-size=97", "--no-progress", *extra])


def _clusters(out) -> list[dict]:
    return [json.loads(line) for line in (out / "clusters.jsonl").read_text().splitlines()]


# --------------------------------------------------------------------------------- the kernels

def test_normalisation_and_ngram_hashes_match_their_python_definitions():
    rng = random.Random(1)
    alphabet = string.ascii_letters + string.digits + string.punctuation + " \t\n\x00\x01\x1c\x85\u00a0\u3000\u2028éß√中"
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 120))) for _ in range(200)]
    texts += ["Don't  PANIC!\n42", "", "   ", "a"]
    normalized = [normalize(t) for t in texts]
    table = str.maketrans(string.ascii_uppercase, string.ascii_lowercase, string.punctuation)
    assert normalized == [" ".join(t.translate(table).split()) for t in texts]
    assert normalize("Don't  PANIC!\n42") == "dont panic 42"
    for unit, n in (("word", 5), ("word", 2), ("char", 7)):
        grams = shingles.ngram_hashes(normalized, n, unit)
        seen: dict[str, int] = {}
        for d, text in enumerate(normalized):
            units = text.split() if unit == "word" else list(text)
            join = " ".join if unit == "word" else "".join
            expected = [join(units[i:i + n]) for i in range(len(units) - n + 1)] or ([join(units)] if units else [])
            got = grams.hashes[grams.offsets[d]:grams.offsets[d + 1]].tolist()
            assert len(got) == len(expected)
            for gram, h in zip(expected, got):  # equal n-grams hash equal, different ones differ
                assert seen.setdefault(gram, h) == h
        assert len(set(seen.values())) == len(seen)
    none = shingles.ngram_hashes(["a b c", "a b c d e"], 5, short=False)
    assert none.offsets.tolist() == [0, 0, 1]


def test_bands_and_rows_are_datasketchs_choice_and_the_curve_is_printed():
    lsh = pytest.importorskip("datasketch.lsh")
    for threshold in (0.5, 0.7, 0.8, 0.9):
        for num_perm in (128, 256):
            for weights in ((0.5, 0.5), (0.2, 0.8)):
                ours = minhash.LshParams.choose(threshold, num_perm, *weights)
                assert (ours.bands, ours.rows) == lsh._optimal_param(threshold, num_perm, *weights)
    chosen = minhash.LshParams.choose(THRESHOLD)
    assert (chosen.bands, chosen.rows) == (21, 12)
    curve = chosen.curve()
    assert curve["0.6"] <= 0.05 and curve["0.85"] >= 0.95  # the test below relies on this curve
    assert "21 bands x 12 rows" in chosen.describe() and "J=0.85: 0.960" in chosen.describe()


def test_jaccard_estimates_track_exact_jaccard():
    rows, planted = _planted_corpus(seed=2, pairs=80, singles=0)
    config = dedup.DedupConfig(THRESHOLD)
    sig, _, _ = dedup_index.sketch([r["text"] for r in rows], config)
    errors = []
    for a, b, j in planted:
        estimate = float(minhash.estimate_jaccard(sig[a], sig[b]))
        assert abs(estimate - j) <= 4 * minhash.standard_error(j, 256) + 1e-9, (a, b, j, estimate)
        errors.append(estimate - j)
    assert abs(np.mean(errors)) < 0.01 and np.mean(np.abs(errors)) < 0.025


def test_components_give_every_document_its_clusters_smallest_member():
    edges = np.array([[5, 3], [3, 9], [9, 1], [7, 8], [12, 11]], np.int64)
    label = dedup_index.components(14, lambda: [edges[:2], edges[2:]])
    assert label.tolist() == [0, 1, 2, 1, 4, 1, 6, 7, 7, 1, 10, 11, 11, 13]


# ---------------------------------------------------------------------------------- the command

def test_planted_pairs_recall_false_positives_and_clusters_through_the_cli(tmp_path, capsys):
    rows, planted = _planted_corpus()
    exact_copy = dict(rows[3], id="copy-of-3", text=rows[3]["text"].upper().replace(" ", " ,  "))
    src = _write(tmp_path / "in.jsonl", rows + [exact_copy])
    assert _dedup(src, tmp_path / "out") == 0
    printed = capsys.readouterr().out
    assert "21 bands x 12 rows" in printed and "P(candidate | J)" in printed
    clusters = _clusters(tmp_path / "out")
    together = {(m["doc"], c["kept"]["doc"]): m for c in clusters for m in c["removed"]}
    kept_of = {m["doc"]: c["kept"]["doc"] for c in clusters for m in c["removed"]}

    above = [(a, b, j) for a, b, j in planted if j >= THRESHOLD + 0.05]
    below = [(a, b, j) for a, b, j in planted if j <= THRESHOLD - 0.2]
    assert len(above) >= 50 and len(below) >= 30  # the planted pairs cover both sides
    caught = [kept_of.get(b) == a for a, b, _ in above]
    false = [kept_of.get(b) == a for a, b, _ in below]
    assert sum(caught) / len(caught) >= 0.95
    assert sum(false) / len(false) <= 0.05
    for a, b, j in planted:  # the estimate beside each removal tracks the exact Jaccard
        if (b, a) in together and together[(b, a)]["reason"] == "near":
            assert abs(together[(b, a)]["jaccard"] - j) <= 4 * minhash.standard_error(j, 256) + 1e-9
    # The kept document is the first of its cluster in input order; the rest are not in the output.
    assert all(c["kept"]["doc"] < min(m["doc"] for m in c["removed"]) for c in clusters)
    assert together[(len(rows), 3)] == {"id": "copy-of-3", "doc": len(rows), "reason": "exact", "jaccard": 1.0}
    out = list(records.iter_output(tmp_path / "out"))
    removed = {m["id"] for c in clusters for m in c["removed"]}
    assert [r["id"] for r in out] == [r["id"] for r in rows if r["id"] not in removed]
    assert out == [records.make_record(**r) for r in rows if r["id"] not in removed]  # unchanged
    manifest = records.read_manifest(tmp_path / "out")
    assert manifest["counts"]["dropped"] == {"exact_duplicate": manifest["global"]["counts"]["exact_duplicates"],
                                             "near_duplicate": manifest["global"]["counts"]["near_duplicates"]}
    assert manifest["parameters"]["bands"] == 21 and manifest["global"]["lsh"]["curve"]["0.85"] == 0.9601
    assert not (tmp_path / "out" / ".work").exists()


def test_the_library_function_decides_what_the_stage_decides(tmp_path):
    rows, _ = _planted_corpus(seed=3, pairs=40, singles=10)
    result = dedup.near_duplicates(rows, THRESHOLD)
    run_stage(dedup.dedup_stage(THRESHOLD), _write(tmp_path / "in.jsonl", rows), tmp_path / "out",
              shard_size=23, progress=False)
    assert result.clusters == _clusters(tmp_path / "out")
    assert [r["id"] for r in result.kept] == [r["id"] for r in records.iter_output(tmp_path / "out")]
    assert result.removed == len(rows) - len(result.kept) > 0


def test_short_empty_and_character_shingled_documents():
    rows = [{"id": str(i), "text": t} for i, t in enumerate(
        ["", "Hi!", "  ", "hi", "one two three", "One, two: three.", "x" * 3, "a different short one"])]
    result = dedup.near_duplicates(rows)
    assert [[c["kept"]["id"], [m["id"] for m in c["removed"]]] for c in result.clusters] == \
        [["0", ["2"]], ["1", ["3"]], ["4", ["5"]]]
    rng = random.Random(4)
    base = " ".join(_words(rng, 150))
    near = base[:300] + "Z" + base[301:]
    chars = dedup.near_duplicates([{"id": "a", "text": base}, {"id": "b", "text": near}],
                                  unit="char", ngram=24)
    assert [m["reason"] for c in chars.clusters for m in c["removed"]] == ["near"]


@pytest.mark.parametrize("flags, error", [
    (["--threshold=1.5"], "--threshold=1.5: a Jaccard similarity strictly between 0 and 1"),
    (["--threshold=0"], "--threshold=0.0: a Jaccard similarity strictly between 0 and 1"),
    (["--ngram=0"], "--ngram=0: give 1..1000 words per shingle"),
    (["--num-perm=1"], "--num-perm=1: give 2..4096 permutations"),
])
def test_bad_arguments_are_one_line_errors(tmp_path, capsys, flags, error):
    src = _write(tmp_path / "in.jsonl", [{"id": "a", "text": "x"}])
    assert _dedup(src, tmp_path / "out", *flags) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"phi-jax data: error: {error}") and "\n" not in err


def test_a_corrupt_input_line_is_one_line_naming_file_and_line(tmp_path, capsys):
    rows, _ = _planted_corpus(seed=7, pairs=10, singles=10)
    lines = [json.dumps(r) for r in rows]
    lines[13] = lines[13][:20]
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    assert _dedup(str(tmp_path / "in.jsonl"), tmp_path / "out") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"phi-jax data: error: {tmp_path / 'in.jsonl'}:14 (part-00000): not valid JSON")
    assert "\n" not in err


# ---------------------------------------------------------------------------- runners and resume

def _output_bytes(out) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.suffix == ".jsonl"}


def _interrupted(*args, **kwargs):
    raise KeyboardInterrupt


def test_workers_and_a_resumed_run_write_what_one_clean_run_writes(tmp_path, monkeypatch):
    rows, _ = _planted_corpus(seed=5, pairs=60, singles=20)
    src = _write(tmp_path / "in.jsonl", rows)
    assert _dedup(src, tmp_path / "clean") == 0
    clean = _output_bytes(tmp_path / "clean")
    assert _dedup(src, tmp_path / "two", "--workers=2") == 0
    assert _output_bytes(tmp_path / "two") == clean

    # Killed after the sketches and buckets, before the components: the rerun sketches nothing.
    real_cluster, real_sketch = dedup_index.cluster, dedup_index.sketch
    monkeypatch.setattr(dedup_index, "cluster", _interrupted)
    assert _dedup(src, tmp_path / "resumed") == 130  # the CLI's answer to ^C
    assert len(list((tmp_path / "resumed" / ".work" / "dedup" / "sketch").iterdir())) == 2
    monkeypatch.setattr(dedup_index, "cluster", real_cluster)
    calls = []
    monkeypatch.setattr(dedup_index, "sketch", lambda *a: calls.append(1) or real_sketch(*a))
    assert _dedup(src, tmp_path / "resumed") == 0
    assert calls == [] and _output_bytes(tmp_path / "resumed") == clean

    # A finished output missing one shard's marker redoes the passes and that shard, same bytes.
    (tmp_path / "clean" / ".shards" / "part-00001.json").unlink()
    assert _dedup(src, tmp_path / "clean") == 0
    assert _output_bytes(tmp_path / "clean") == clean
    manifest = records.read_manifest(tmp_path / "clean")
    assert [(r["shards_processed"], r["shards_resumed"]) for r in manifest["runs"]] == [(2, 0), (1, 1)]


@pytest.mark.slow  # Beam's import and pipeline start-up: ~5 s on 2 cores
def test_beam_writes_what_local_writes(tmp_path):
    pytest.importorskip("apache_beam")
    rows, _ = _planted_corpus(seed=6, pairs=50, singles=20)
    src = _write(tmp_path / "in.jsonl", rows)
    assert _dedup(src, tmp_path / "local") == 0
    assert _dedup(src, tmp_path / "beam", "--runner=beam") == 0
    local, beam = _output_bytes(tmp_path / "local"), _output_bytes(tmp_path / "beam")
    assert local == beam and "clusters.jsonl" in local and len(_clusters(tmp_path / "beam")) > 10
    m_local, m_beam = (records.read_manifest(tmp_path / d) for d in ("local", "beam"))
    assert m_local["outputs"] == m_beam["outputs"] and m_local["counts"] == m_beam["counts"]
    assert m_local["global"]["counts"] == m_beam["global"]["counts"]
    assert m_beam["runs"][-1]["runner"] == "beam"
