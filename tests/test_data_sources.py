"""Every source type feeds the pipeline the documents it holds; the embedded default corpus."""

import hashlib
import json
import os
import pathlib

import pytest
import tensorflow_datasets as tfds
from array_record.python import array_record_module

from phi_jax import tokenizer as tokenizer_lib
from phi_jax.data import corpus, pipeline

DOCS = ["def add(a, b):\n    return a + b\n", "Ünïcödé prose, 日本語 and 😀.\n\n", "x\ty\n",
        "{not json, just text starting with a brace}", "short"]
SEQ_LEN = 24


@pytest.fixture(scope="module")
def tok():
    return tokenizer_lib.train_bpe(DOCS * 3, vocab_size=300)


def _segments(batches):
    """Token runs of each (row, segment id) of packed batches, in row order."""
    out = []
    for batch in batches:
        for tokens, segs in zip(batch["tokens"], batch["segment_ids"]):
            for s in range(1, segs.max() + 1):
                out.append(tuple(tokens[segs == s].tolist()))
    return out


def _expected(tok, texts, seq_len=SEQ_LEN):
    chunks = []
    for text in texts:
        ids = tok.encode(text, add_eos=True)
        chunks += [tuple(ids[i:i + seq_len]) for i in range(0, len(ids), seq_len)]
    return sorted(chunks)


def _read_all(cfg_overrides, tok, seq_len=SEQ_LEN):
    cfg = pipeline.default_data_config()
    cfg.update(dict(num_epochs=1, drop_remainder=False, **cfg_overrides))
    it = iter(pipeline.build_dataset(cfg, tok, seq_len=seq_len, batch_size=2, seed=3))
    return sorted(_segments(list(it))), pipeline.data_stats(it)


def test_text_files_one_document_per_file(tok, tmp_path):
    for i, doc in enumerate(DOCS):
        (tmp_path / f"sub{i % 2}").mkdir(exist_ok=True)
        (tmp_path / f"sub{i % 2}" / f"doc{i}.txt").write_text(doc, encoding="utf-8")
    (tmp_path / "ignored.md").write_text("not matched by the glob")
    got, stats = _read_all({"source": "text", "paths": f"{tmp_path}/**/*.txt"}, tok)
    assert got == _expected(tok, DOCS)
    assert stats.documents == len(DOCS)


def test_jsonl_field_blank_lines_and_crlf(tok, tmp_path):
    lines = [json.dumps({"body": d, "id": i}, ensure_ascii=i % 2 == 0) for i, d in enumerate(DOCS)]
    (tmp_path / "a.jsonl").write_bytes(("\n".join(lines[:3]) + "\n\n\r\n").encode())
    (tmp_path / "b.jsonl").write_bytes(("\r\n".join(lines[3:])).encode())  # No final newline.
    got, _ = _read_all({"source": "jsonl", "paths": f"{tmp_path}/a.jsonl,{tmp_path}/b.jsonl",
                        "jsonl_field": "body"}, tok)
    assert got == _expected(tok, DOCS)


@pytest.mark.parametrize("record_format", ["auto", "text", "json"])
def test_array_record(tok, tmp_path, record_format):
    """json: every record is an object; auto: objects and plain text mixed; text: records verbatim."""
    path = str(tmp_path / "docs.array_record")
    writer = array_record_module.ArrayRecordWriter(path, "group_size:1")
    records = [json.dumps({"text": doc}) if record_format == "json" or i % 2 == 0 else doc
               for i, doc in enumerate(DOCS)]
    for record in records:
        writer.write(record.encode())
    writer.close()
    got, _ = _read_all({"source": "arrayrecord", "paths": path, "record_format": record_format}, tok)
    assert got == _expected(tok, records if record_format == "text" else DOCS)


class TinyText(tfds.core.GeneratorBasedBuilder):
    """A local TFDS dataset; nothing is downloaded."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
            {"text": tfds.features.Text(), "label": tfds.features.ClassLabel(num_classes=2)}))

    def _split_generators(self, dl_manager):
        del dl_manager
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for i, doc in enumerate(DOCS):
            yield i, {"text": doc, "label": i % 2}


def test_tfds(tok, tmp_path):
    TinyText(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    got, _ = _read_all({"source": "tfds", "tfds_name": "tiny_text", "tfds_split": "train",
                        "tfds_data_dir": str(tmp_path)}, tok)
    assert got == _expected(tok, DOCS)
    with pytest.raises(FileNotFoundError, match="tfds:tiny_text/validation"):
        _read_all({"source": "tfds", "tfds_name": "tiny_text", "tfds_split": "validation",
                   "tfds_data_dir": str(tmp_path)}, tok)


def test_default_corpus_source(tok):
    names = corpus.document_names()[:6]
    got, stats = _read_all({"source": "default", "max_documents": 6}, tok, seq_len=512)
    texts = [(pathlib.Path(corpus.stdlib_dir()) / n).read_text(encoding="utf-8") for n in names]
    assert got == _expected(tok, texts, seq_len=512)
    assert stats.documents == 6
    assert stats.tokens == sum(len(tok.encode(t)) + 1 for t in texts)


def test_default_corpus_content():
    names = corpus.document_names()
    assert names == corpus.document_names() and len(set(names)) == len(names)
    files = [n for n in names if not n.startswith("pydoc_data.topics:")]
    topics = [n for n in names if n.startswith("pydoc_data.topics:")]
    assert files == sorted(files) and names == tuple(files + topics)
    assert {"os.py", "json/__init__.py", "asyncio/tasks.py"} <= set(files)
    for n in files:
        parts = n.split("/")
        assert not {"test", "tests", "idlelib", "site-packages"} & set(parts[:-1]), n
        assert not parts[-1].startswith("_sysconfigdata") and n != "pydoc_data/topics.py"
    from pydoc_data import topics as pydoc_topics
    assert [t.split(":", 1)[1] for t in topics] == sorted(pydoc_topics.topics)
    source = corpus.DefaultCorpusSource()
    assert source[len(files)]["data"] == pydoc_topics.topics[sorted(pydoc_topics.topics)[0]]


def _fake_stdlib(root: pathlib.Path) -> None:
    files = {"a.py": "A = 1\n", "pkg/__init__.py": "\n", "pkg/c.py": "# c\n",
             "pkg/b.py": "def b():\n    '''doc'''\n", "test/test_a.py": "skip",
             "pkg/tests/t.py": "skip", "idlelib/x.py": "skip", "site-packages/m.py": "skip",
             "_sysconfigdata__linux.py": "skip", "pydoc_data/topics.py": "skip",
             "notes.txt": "not python"}
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    (root / "latin1.py").write_bytes(b"s = '\xe9'\n")  # Not UTF-8: left out.


@pytest.fixture
def fake_stdlib(tmp_path, monkeypatch):
    root = tmp_path / "stdlib"
    _fake_stdlib(root)
    monkeypatch.setattr(corpus, "stdlib_dir", lambda: root)
    monkeypatch.setattr(corpus, "_topics", lambda: {"z": "Zed prose.", "if": "The if statement."})
    for cached in (corpus.document_names, corpus.corpus_hash):
        cached.cache_clear()
    yield root
    for cached in (corpus.document_names, corpus.corpus_hash):
        cached.cache_clear()


def test_corpus_selection_and_hash(fake_stdlib):
    assert corpus.document_names() == ("a.py", "pkg/b.py", "pkg/c.py",  # Empty files left out.
                                       "pydoc_data.topics:if", "pydoc_data.topics:z")
    expected = hashlib.sha256()
    for name, text in [("a.py", "A = 1\n"), ("pkg/b.py", "def b():\n    '''doc'''\n"),
                       ("pkg/c.py", "# c\n"),
                       ("pydoc_data.topics:if", "The if statement."),
                       ("pydoc_data.topics:z", "Zed prose.")]:
        expected.update(f"{name}\0{text}\0".encode())
    assert corpus.corpus_hash() == expected.hexdigest()
    (fake_stdlib / "a.py").write_text("A = 2\n")
    corpus.corpus_hash.cache_clear()
    assert corpus.corpus_hash() != expected.hexdigest()
    assert pipeline.describe({"source": "default"})["corpus_sha256"] == corpus.corpus_hash()


def test_get_or_train_tokenizer_caches(fake_stdlib, tmp_path, monkeypatch):
    workdir = tmp_path / "run"
    tok = corpus.get_or_train_tokenizer(workdir, vocab_size=300)
    assert 258 < tok.vocab_size <= 300  # A tiny corpus runs out of pairs to merge.
    assert tok.eos_id == tok.bos_id == 0 and tok.pad_id == 1
    assert sorted(p.name for p in workdir.iterdir()) == ["tokenizer"]  # No temp dir left behind.
    meta = json.loads((workdir / "tokenizer" / "phi_jax_tokenizer.json").read_text())
    assert meta["corpus_sha256"] == corpus.corpus_hash() and meta["vocab_size"] == 300

    def no_training(*args, **kwargs):
        raise AssertionError("the cached tokenizer should be reused")

    monkeypatch.setattr(tokenizer_lib, "train_bpe", no_training)
    again = corpus.get_or_train_tokenizer(workdir, vocab_size=300)
    text = "def b():\n    return A\n"
    assert again.encode(text) == tok.encode(text)
    with pytest.raises(ValueError, match="vocab_size=300"):
        corpus.get_or_train_tokenizer(workdir, vocab_size=512)
    assert os.listdir(workdir) == ["tokenizer"]
