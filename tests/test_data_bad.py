"""Every bad-data case, in both modes: a clear error naming file and line, or a counted skip."""

import json

import pytest
from array_record.python import array_record_module

from phi_jax import tokenizer as tokenizer_lib
from phi_jax.data import pipeline
from phi_jax.data.documents import BadDataError

GOOD = ["good one", "good two"]


@pytest.fixture(scope="module")
def tok():
    return tokenizer_lib.train_bpe(GOOD * 3, vocab_size=280)


def _run(tok, seq_len=32, **overrides):
    """All batches of one epoch, and the iterator's counters."""
    cfg = pipeline.default_data_config()
    cfg.update(dict(num_epochs=1, drop_remainder=False, **overrides))
    it = iter(pipeline.build_dataset(cfg, tok, seq_len=seq_len, batch_size=2, seed=0))
    batches = list(it)
    segments = sorted(tuple(b["tokens"][r][b["segment_ids"][r] == s].tolist())
                      for b in batches for r in range(len(b["tokens"]))
                      for s in range(1, b["segment_ids"][r].max() + 1))
    return segments, pipeline.data_stats(it)


def _good_segments(tok):
    return sorted(tuple(tok.encode(t, add_eos=True)) for t in GOOD)


def _jsonl(tmp_path, bad_line: bytes):
    path = tmp_path / "data.jsonl"
    path.write_bytes(b"\n".join([json.dumps({"text": GOOD[0]}).encode(), bad_line,
                                 json.dumps({"text": GOOD[1]}).encode()]) + b"\n")
    return str(path)


JSONL_CASES = [
    ("bad_utf8", b'{"text": "caf\xe9"}'),
    ("bad_json", b'{"text": "unterminated'),
    ("bad_json", b'["a JSON list"]'),
    ("bad_json", b'{"text": 5}'),
    ("bad_json", b'{"tokens": ["a", 1]}'),
    ("bad_json", b'{"tokens": [1, 2], "loss_mask": [1]}'),
    ("missing_field", b'{"body": "no text field"}'),
    ("empty", b'{"text": ""}'),
    ("empty", b'{"prompt": "question", "completion": ""}'),
]


@pytest.mark.parametrize("reason,line", JSONL_CASES)
def test_jsonl_bad_line_error_names_file_and_line(tok, tmp_path, reason, line):
    path = _jsonl(tmp_path, line)
    with pytest.raises(BadDataError, match=f"{path}:2: .*bad_data='skip'.*{reason}"):
        _run(tok, source="jsonl", paths=path)


@pytest.mark.parametrize("reason,line", JSONL_CASES)
def test_jsonl_bad_line_skipped_and_counted(tok, tmp_path, reason, line):
    segments, stats = _run(tok, source="jsonl", paths=_jsonl(tmp_path, line), bad_data="skip")
    assert segments == _good_segments(tok)
    assert getattr(stats, reason) == 1 and stats.skipped == 1 and stats.documents == 2


def _text_files(tmp_path, bad: bytes):
    for i, text in enumerate(GOOD):
        (tmp_path / f"{i}.txt").write_text(text)
    (tmp_path / "bad.txt").write_bytes(bad)
    return f"{tmp_path}/*.txt", str(tmp_path / "bad.txt")


@pytest.mark.parametrize("reason,data", [("bad_utf8", b"\xff\xfe broken"), ("empty", b"")])
def test_text_file_bad_utf8_and_empty(tok, tmp_path, reason, data):
    glob, bad = _text_files(tmp_path, data)
    with pytest.raises(BadDataError, match=f"{bad}: "):
        _run(tok, source="text", paths=glob)
    segments, stats = _run(tok, source="text", paths=glob, bad_data="skip")
    assert segments == _good_segments(tok) and getattr(stats, reason) == 1


def test_empty_jsonl_file(tok, tmp_path):
    good = _jsonl(tmp_path, json.dumps({"text": "x"}).encode())
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")  # Only blank lines: no record.
    with pytest.raises(BadDataError, match=f"{empty}: empty file"):
        _run(tok, source="jsonl", paths=f"{good},{empty}")
    _, stats = _run(tok, source="jsonl", paths=f"{good},{empty}", bad_data="skip")
    assert stats.empty_files == 1 and stats.documents == 3


def test_array_record_bad_json_record(tok, tmp_path):
    path = str(tmp_path / "d.array_record")
    writer = array_record_module.ArrayRecordWriter(path, "group_size:1")
    for record in [json.dumps({"text": GOOD[0]}), "[1, 2]", json.dumps({"text": GOOD[1]})]:
        writer.write(record.encode())
    writer.close()
    with pytest.raises(BadDataError, match=r"d.array_record\[record 1\]: expected a JSON object"):
        _run(tok, source="arrayrecord", paths=path, record_format="json")
    segments, stats = _run(tok, source="arrayrecord", paths=path, record_format="json",
                           bad_data="skip")
    assert segments == _good_segments(tok) and stats.bad_json == 1


def test_long_documents(tok, tmp_path):
    long_text = "good one good two " * 10
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in GOOD + [long_text]))
    long_ids = tok.encode(long_text, add_eos=True)
    seq_len = 8
    assert len(long_ids) > seq_len >= max(len(tok.encode(t)) + 1 for t in GOOD)
    with pytest.raises(BadDataError, match=f"{path}:3: document has {len(long_ids)} tokens"):
        _run(tok, seq_len, source="jsonl", paths=str(path), long_documents="error")
    segments, stats = _run(tok, seq_len, source="jsonl", paths=str(path), long_documents="skip")
    assert segments == _good_segments(tok) and stats.too_long == 1
    segments, stats = _run(tok, seq_len, source="jsonl", paths=str(path), long_documents="split")
    chunks = [tuple(long_ids[i:i + seq_len]) for i in range(0, len(long_ids), seq_len)]
    assert segments == sorted(_good_segments(tok) + chunks) and stats.split_documents == 1


def test_all_documents_skipped_raises_instead_of_looping(tok, tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"body": 1}\n{"body": 2}\n')
    cfg = pipeline.default_data_config()
    cfg.update(dict(source="jsonl", paths=str(path), bad_data="skip"))  # Repeats forever.
    with pytest.raises(ValueError, match="all 2 documents .* were skipped"):
        next(iter(pipeline.build_dataset(cfg, tok, seq_len=8, batch_size=1)))


def test_config_and_path_errors(tok, tmp_path):
    cfg = pipeline.default_data_config()
    cfg.shuffel = False
    with pytest.raises(ValueError, match="unknown data config key.*shuffel"):
        pipeline.build_dataset(cfg, tok, seq_len=8, batch_size=1)
    with pytest.raises(ValueError, match="data.bad_data='ignore' is not one of"):
        pipeline.build_dataset({"bad_data": "ignore"}, tok, seq_len=8, batch_size=1)
    with pytest.raises(FileNotFoundError, match="nothing-here"):
        pipeline.build_dataset({"source": "jsonl", "paths": f"{tmp_path}/nothing-here*.jsonl"}, tok,
                               seq_len=8, batch_size=1)
    with pytest.raises(ValueError, match="data.paths is empty"):
        pipeline.build_dataset({"source": "text"}, tok, seq_len=8, batch_size=1)
    path = _jsonl(tmp_path, json.dumps({"text": "x"}).encode())
    with pytest.raises(ValueError, match="no documents for host 3 of 4"):
        pipeline.build_dataset({"source": "jsonl", "paths": path}, tok, seq_len=8, batch_size=1,
                               process_index=3, process_count=4)
