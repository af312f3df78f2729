"""Records, shards, manifests and the local runner: what a stage's output directory promises.

References are the inputs themselves (every record comes back once, unchanged but for `meta`),
`json` for the bytes of JSONL, and the filter's own threshold for what it keeps.
"""

import fcntl
import json
import re
from pathlib import Path

import pytest

from phi_jax.curation.core.runners import run_stage, summary
from phi_jax.curation.core.stage import Stage
from phi_jax.curation.quality.filter import filter_stage
from phi_jax.data import corpus, records
from phi_jax.errors import InputError, RunError


def _jsonl(path: Path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _rows(n, start=0):
    return [{"id": f"r{i}", "text": f"text {i}", "meta": {"quality": i % 5}} for i in range(start, start + n)]


def test_plan_cuts_each_input_into_shards_that_read_back_every_record(tmp_path):
    a = _jsonl(tmp_path / "a.jsonl", _rows(25))
    b = _jsonl(tmp_path / "b.jsonl", [{"text": "no id here"}, {"text": "nor here", "meta": {"k": 1}}])
    (tmp_path / "t").mkdir()
    for i in range(3):
        (tmp_path / "t" / f"{i}.txt").write_text(f"plain {i}")
    shards = records.plan_shards(f"{a},{b},{tmp_path}/t/*.txt", shard_size=10)
    assert [(s.kind, s.start, s.stop) for s in shards] == [
        ("jsonl", 0, 10), ("jsonl", 10, 20), ("jsonl", 20, 25), ("jsonl", 0, 2), ("text", 0, 3)]
    got = [r for s in shards for r in s.read()]
    assert got[:25] == [records.make_record(**r) for r in _rows(25)]
    assert got[25] == {"id": f"{b}:1", "text": "no id here", "meta": {}}  # foreign line: file:line
    assert got[26] == {"id": f"{b}:2", "text": "nor here", "meta": {"k": 1}}
    assert [r["text"] for r in got[27:]] == ["plain 0", "plain 1", "plain 2"]
    assert [s.name for s in shards] == [f"part-{i:05d}" for i in range(5)]


def test_the_default_corpus_is_one_record_per_document_with_a_stable_id():
    shards = records.plan_shards("default", shard_size=300)
    names = corpus.document_names()
    assert sum(s.size for s in shards) == len(names)
    first = next(shards[0].read())
    assert first["id"] == f"stdlib:{names[0]}" and first["text"] == corpus.read_document(names[0])
    assert first["meta"] == {"source": "stdlib", "kind": "code"}
    (inputs,) = records.input_fingerprints(shards)
    assert inputs["sha256"] == corpus.corpus_hash()


@pytest.mark.parametrize("line, error", [
    (b'{"id": "x", "text": "a', "a.jsonl:2 (part-00000): not valid JSON"),
    (b'{"id": "x", "txt": "a"}', "a.jsonl:2 (part-00000): no string field 'text'"),
    (b'["x"]', "a.jsonl:2 (part-00000): a record must be a JSON object"),
    (b'{"id": "x", "text": "\xff"}', "a.jsonl:2 (part-00000): invalid UTF-8 at byte 21"),
    (b'{"id": "", "text": "a"}', "'id' must be a non-empty string"),
    (b'{"id": "x", "text": "a", "meta": 3}', "'meta' must be a JSON object"),
])
def test_a_corrupt_record_is_an_error_naming_file_line_and_shard(tmp_path, line, error):
    (tmp_path / "a.jsonl").write_bytes(b'{"id": "ok", "text": "fine"}\n' + line + b"\n")
    (shard,) = records.plan_shards(str(tmp_path / "a.jsonl"))
    with pytest.raises(InputError, match="^" + re.escape(str(tmp_path))) as e:
        list(shard.read())
    assert error in str(e.value)


def test_missing_inputs_are_one_line_errors(tmp_path):
    with pytest.raises(InputError, match="matches no file"):
        records.plan_shards(str(tmp_path / "nope*.jsonl"))
    with pytest.raises(InputError, match="directory without manifest.json"):
        records.plan_shards(str(tmp_path))
    (tmp_path / "x.arrayrecord").write_bytes(b"garbage" * 10)
    with pytest.raises(InputError, match="x.arrayrecord: not a readable ArrayRecord file"):
        records.plan_shards(str(tmp_path / "x.arrayrecord"))


def test_shard_writer_publishes_whole_files_only(tmp_path):
    writer = records.ShardWriter(tmp_path / "part-00000.jsonl", "jsonl")
    writer.write(records.make_record("a", "x"))
    assert not (tmp_path / "part-00000.jsonl").exists()
    info = writer.commit()
    assert (tmp_path / "part-00000.jsonl").read_text() == '{"id":"a","text":"x","meta":{}}\n'
    assert info["records"] == 1 and info["sha256"] == records.file_sha256(tmp_path / "part-00000.jsonl")
    aborted = records.ShardWriter(tmp_path / "part-00001.jsonl", "jsonl")
    aborted.write(records.make_record("b", "y"))
    aborted.abort()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["part-00000.jsonl"]


def test_arrayrecord_output_holds_the_same_records_as_jsonl(tmp_path):
    src = _jsonl(tmp_path / "in.jsonl", _rows(30))
    for fmt in ("jsonl", "arrayrecord"):
        run_stage(filter_stage(0), src, tmp_path / fmt, output_format=fmt, shard_size=8, progress=False)
    as_jsonl, as_ar = list(records.iter_output(tmp_path / "jsonl")), list(records.iter_output(tmp_path / "arrayrecord"))
    assert as_jsonl == as_ar == [records.make_record(**r) for r in _rows(30)]
    assert [o["sha256"] for o in records.read_manifest(tmp_path / "jsonl")["outputs"]] == \
        [o["sha256"] for o in records.read_manifest(tmp_path / "arrayrecord")["outputs"]]


def test_filter_counts_every_drop_by_reason_and_workers_do_not_change_the_output(tmp_path):
    rows = _rows(40) + [{"id": "none", "text": "t", "meta": {}}, {"id": "str", "text": "t", "meta": {"quality": "4"}}]
    src = _jsonl(tmp_path / "in.jsonl", rows)
    one = run_stage(filter_stage(3), src, tmp_path / "one", shard_size=7, progress=False)
    two = run_stage(filter_stage(3), src, tmp_path / "two", shard_size=7, workers=2, progress=False)
    kept = [r["id"] for r in records.iter_output(tmp_path / "one")]
    assert kept == [r["id"] for r in rows if isinstance(r["meta"].get("quality"), int) and r["meta"]["quality"] >= 3]
    assert one["counts"] == two["counts"] == {
        "records_in": 42, "records_out": 16, "dropped": {"quality_below_min": 24, "missing_quality": 2},
        "stage": {"kept": 16}}
    assert [o["sha256"] for o in one["outputs"]] == [o["sha256"] for o in two["outputs"]]
    text = summary(one, tmp_path / "one")
    assert "42 in, 16 out" in text and "quality_below_min" in text


def test_resume_keeps_finished_shards_and_refuses_other_parameters(tmp_path):
    src = _jsonl(tmp_path / "in.jsonl", _rows(30))
    out = tmp_path / "out"
    run_stage(filter_stage(2), src, out, shard_size=10, progress=False)
    (out / ".shards" / "part-00001.json").unlink()  # as if killed before that shard's marker
    (out / ".part-00001.jsonl.tmp-x").write_text("half")
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*")}
    manifest = run_stage(filter_stage(2), src, out, shard_size=10, progress=False)
    run = manifest["runs"][-1]
    assert (run["shards_processed"], run["shards_resumed"]) == (1, 2) and len(manifest["runs"]) == 2
    assert stamps["part-00000.jsonl"] == (out / "part-00000.jsonl").stat().st_mtime_ns
    assert not (out / ".part-00001.jsonl.tmp-x").exists()
    with pytest.raises(InputError, match=r"min_quality: 2.0 -> 3.0.*--overwrite"):
        run_stage(filter_stage(3), src, out, shard_size=10, progress=False)
    _jsonl(tmp_path / "in.jsonl", _rows(31))
    with pytest.raises(InputError, match="inputs changed"):
        run_stage(filter_stage(2), src, out, shard_size=10, progress=False)
    replaced = run_stage(filter_stage(3), src, out, shard_size=10, overwrite=True, progress=False)
    assert replaced["parameters"]["min_quality"] == 3.0 and len(replaced["runs"]) == 1


def test_an_output_another_run_is_writing_is_refused(tmp_path):
    src = _jsonl(tmp_path / "in.jsonl", _rows(3))
    (tmp_path / "out").mkdir()
    with open(tmp_path / "out" / ".lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(InputError, match="another phi-jax run is writing"):
            run_stage(filter_stage(0), src, tmp_path / "out", progress=False)


def test_a_directory_of_other_files_is_not_taken_over(tmp_path):
    src = _jsonl(tmp_path / "in.jsonl", _rows(3))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="not a phi-jax data output"):
        run_stage(filter_stage(0), src, tmp_path / "out", progress=False, overwrite=True)


def _lossy_step():
    return lambda batch, counts: batch[1:]


def test_a_step_that_loses_records_without_counting_them_fails(tmp_path):
    src = _jsonl(tmp_path / "in.jsonl", _rows(3))
    with pytest.raises(RunError, match="returned 2 of 3 records .* counted 0 as dropped"):
        run_stage(Stage("lossy", _lossy_step, {}), src, tmp_path / "out", progress=False)
    assert not list((tmp_path / "out").glob("part-*"))


def test_a_stage_output_is_the_next_stage_input(tmp_path):
    src = _jsonl(tmp_path / "in.jsonl", _rows(20))
    run_stage(filter_stage(1), src, tmp_path / "a", shard_size=6, progress=False)
    manifest = run_stage(filter_stage(3), str(tmp_path / "a"), tmp_path / "b", progress=False)
    assert [i["path"] for i in manifest["inputs"]] == [str(tmp_path / "a" / f"part-0000{i}.jsonl") for i in range(4)]
    assert [r["meta"]["quality"] for r in records.iter_output(tmp_path / "b")] == [3, 4] * 4


def test_max_records_takes_the_first_records_in_input_order(tmp_path):
    a = _jsonl(tmp_path / "a.jsonl", _rows(7))
    b = _jsonl(tmp_path / "b.jsonl", _rows(7, start=7))
    shards = records.plan_shards(f"{a},{b}", shard_size=3, max_records=8)
    assert [(s.paths[0][-7:], s.start, s.stop) for s in shards] == [
        ("a.jsonl", 0, 3), ("a.jsonl", 3, 6), ("a.jsonl", 6, 7), ("b.jsonl", 0, 1)]
    assert [r["id"] for s in shards for r in s.read()] == [f"r{i}" for i in range(8)]
    manifest = run_stage(filter_stage(0), f"{a},{b}", tmp_path / "out", max_records=8, progress=False)
    assert manifest["counts"]["records_in"] == 8 and manifest["parameters"]["max_records"] == 8
