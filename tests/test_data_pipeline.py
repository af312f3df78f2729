"""Packing, determinism, checkpointing, per-host sharding and global batches of the Grain pipeline.

Most tests feed pre-tokenized JSONL records with known ids, so the expected packed output follows
from the input alone, independent of any tokenizer.
"""

import json
import os
import subprocess
import sys
import textwrap

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tokenizers
from jax.sharding import NamedSharding, PartitionSpec

from phi_jax import tokenizer as tokenizer_lib
from phi_jax.data import pipeline
from phi_jax.data.documents import BadDataError

EOS = 0


@pytest.fixture(scope="module")
def bpe():
    """Byte-level BPE with <|endoftext|> = 0 = EOS, for the tests that tokenize text."""
    return tokenizer_lib.train_bpe(["What is 2 + 2?", "It is 4."] * 4, vocab_size=400)


@pytest.fixture(scope="module")
def tok():
    """A 64k-id word-level vocabulary with EOS = 0, so pre-tokenized ids up to 64k are valid."""
    vocab = {f"<{i}>": i for i in range(1 << 16)}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<0>"))
    return tokenizer_lib.HFTokenizer(backend, {"eos_token": "<0>", "bos_token": None})


def _documents(n=40, seed=0, max_len=30):
    """Distinct documents of known ids (1000 * doc + position, never 0 = EOS)."""
    rng = np.random.default_rng(seed)
    return [[1000 * d + j + 1 for j in range(int(rng.integers(1, max_len)))] for d in range(n)]


def _write_jsonl(path, docs, **extra):
    with open(path, "w") as f:
        for d in docs:
            f.write(json.dumps({"tokens": d, **extra}) + "\n")
    return str(path)


def _cfg(path, **overrides):
    cfg = pipeline.default_data_config()
    cfg.update(dict(source="jsonl", paths=path, **overrides))
    return cfg


def _segments(batch):
    """(tokens, positions, loss_mask, targets) of every segment, in row order."""
    out = []
    for row in range(batch["tokens"].shape[0]):
        segs = batch["segment_ids"][row]
        for s in range(1, segs.max() + 1):
            sel = segs == s
            out.append(tuple(tuple(batch[k][row][sel].tolist())
                             for k in ("tokens", "positions", "loss_mask", "targets")))
    return out


def _chunks(docs, seq_len):
    return [tuple(d[i:i + seq_len]) for d in (d + [EOS] for d in docs)
            for i in range(0, len(d), seq_len)]


def test_packing_layout(tok, tmp_path):
    seq_len, docs = 16, _documents()
    cfg = _cfg(_write_jsonl(tmp_path / "d.jsonl", docs), num_epochs=1, drop_remainder=False)
    batches = list(pipeline.build_dataset(cfg, tok, seq_len=seq_len, batch_size=3, seed=1))
    for b in batches:
        assert {k: (v.shape, v.dtype) for k, v in b.items()} == {
            "tokens": ((3, 16), np.int32), "segment_ids": ((3, 16), np.int32),
            "positions": ((3, 16), np.int32), "targets": ((3, 16), np.int32),
            "loss_mask": ((3, 16), np.float32)}
        for row in range(3):
            segs, pos = b["segment_ids"][row], b["positions"][row]
            used = segs > 0
            # Segments are contiguous, numbered 1, 2, ... from the left; padding (0) only at the end.
            assert np.all(np.diff(segs[used]) >= 0) and np.all(used[:used.sum()])
            assert (b["loss_mask"][row][~used] == 0).all() and (pos[~used] == 0).all()
            assert (b["targets"][row][~used] == 0).all()
    segments = [s for b in batches for s in _segments(b)]
    for tokens, positions, loss_mask, targets in segments:
        assert positions == tuple(range(len(tokens)))  # Restart at 0 per document (chunk).
        # Every token but the segment's last predicts its successor in the same segment.
        assert loss_mask == (1.0,) * (len(tokens) - 1) + (0.0,)
        assert targets == tokens[1:] + (0,)
    # Every document (+EOS), cut into seq_len chunks when longer, appears exactly once, in order.
    assert sorted(s[0] for s in segments) == sorted(_chunks(docs, seq_len))
    assert any(len(d) + 1 > seq_len for d in docs)  # The split path was exercised.


def test_text_documents_are_tokenized_with_eos(bpe, tmp_path):
    tok = bpe
    texts = ["What is 2 + 2?", "It is 4.", "Ünïcode 😀\n"]
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    cfg = _cfg(str(path), num_epochs=1, drop_remainder=False, shuffle=False)
    batches = list(pipeline.build_dataset(cfg, tok, seq_len=64, batch_size=1))
    assert sorted(s[0] for b in batches for s in _segments(b)) == sorted(
        tuple(tok.encode(t, add_eos=True)) for t in texts)


def test_instruction_loss_mask(bpe, tmp_path):
    tok = bpe
    path = tmp_path / "sft.jsonl"
    with open(path, "w") as f:
        f.write(json.dumps({"prompt": "What is 2 + 2?", "completion": " It is 4."}) + "\n")
        f.write(json.dumps({"tokens": [5, 6, 7, 8], "loss_mask": [0, 0, 1, 1]}) + "\n")
    cfg = _cfg(str(path), num_epochs=1, drop_remainder=False, shuffle=False)
    (batch,) = list(pipeline.build_dataset(cfg, tok, seq_len=64, batch_size=1))
    prompt, completion = tok.encode("What is 2 + 2?"), tok.encode(" It is 4.")
    got = {s[0]: s[2] for s in _segments(batch)}
    # Input t is trained iff token t+1 is a trainable target: the completion and EOS, never the prompt.
    p, c = len(prompt), len(completion)
    assert got[tuple(prompt + completion + [EOS])] == (0.0,) * (p - 1) + (1.0,) * (c + 1) + (0.0,)
    assert got[(5, 6, 7, 8, EOS)] == (0.0, 1.0, 1.0, 1.0, 0.0)


def test_deterministic_given_seed_and_epochs(tok, tmp_path):
    docs = _documents(30)
    path = _write_jsonl(tmp_path / "d.jsonl", docs)

    def take(seed, n=8, **kw):
        it = iter(pipeline.build_dataset(_cfg(path, **kw), tok, seq_len=32, batch_size=2, seed=seed))
        return [next(it) for _ in range(n)]

    a, b, c = take(0), take(0), take(1)
    assert all(np.array_equal(x[k], y[k]) for x, y in zip(a, b) for k in x)
    assert not all(np.array_equal(x["tokens"], y["tokens"]) for x, y in zip(a, c))
    # Two epochs hold every document exactly twice; a finite pipeline ends.
    two = list(pipeline.build_dataset(_cfg(path, num_epochs=2, drop_remainder=False), tok,
                                      seq_len=32, batch_size=2, seed=0))
    assert sorted(s[0] for b in two for s in _segments(b)) == sorted(_chunks(docs, 32) * 2)


def _assert_same(xs, ys):
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys):
        assert x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)


@pytest.mark.parametrize("seq_len", [8, 64])  # 8: checkpoints land inside split documents.
def test_get_set_state_resumes_exactly(tok, tmp_path, seq_len):
    path = _write_jsonl(tmp_path / "d.jsonl", _documents(8))
    path_bad = tmp_path / "bad.jsonl"  # A skipped record, so the counters are exercised too.
    path_bad.write_text('{"nope": 1}\n')
    ds = pipeline.build_dataset(_cfg(f"{path},{path_bad}", bad_data="skip"), tok,
                                seq_len=seq_len, batch_size=2, seed=5)
    it = iter(ds)
    for _ in range(7):
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # Survives JSON, as checkpoints store it.
    expected = [next(it) for _ in range(12)]
    restored = iter(ds)
    restored.set_state(state)
    _assert_same([next(restored) for _ in range(12)], expected)
    # The counters are part of the state, so the restored iterator counts exactly the same.
    assert pipeline.data_stats(restored).as_dict() == pipeline.data_stats(it).as_dict()
    assert pipeline.data_stats(it).missing_field >= 2


def test_orbax_checkpoint_round_trip(tok, tmp_path):
    ds = pipeline.build_dataset(_cfg(_write_jsonl(tmp_path / "d.jsonl", _documents(25))), tok,
                                seq_len=16, batch_size=2, seed=2)
    it = iter(ds)
    for _ in range(5):
        next(it)
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        manager.save(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
        manager.wait_until_finished()
    expected = [next(it) for _ in range(6)]
    restored = iter(ds)
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        manager.restore(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(restored)))
    _assert_same([next(restored) for _ in range(6)], expected)


@pytest.mark.parametrize("process_count", [2, 4])
def test_host_shards_are_disjoint_and_cover(tok, tmp_path, process_count):
    docs = _documents(37, max_len=10)
    path = _write_jsonl(tmp_path / "d.jsonl", docs)
    shards = []
    for index in range(process_count):
        ds = pipeline.build_dataset(_cfg(path, num_epochs=1, drop_remainder=False), tok, seq_len=16,
                                    batch_size=2, seed=0, process_index=index,
                                    process_count=process_count)
        shards.append({s[0] for b in ds for s in _segments(b)})
    for i in range(process_count):
        for j in range(i + 1, process_count):
            assert not shards[i] & shards[j]
    assert sorted(set().union(*shards)) == sorted(_chunks(docs, 16))


@pytest.mark.slow
def test_worker_processes_match_checkpoint_and_cover(tok, tmp_path):
    """num_workers=2: tokenization in spawned Grain workers; same data, deterministic, resumable."""
    docs = _documents(20)
    path = _write_jsonl(tmp_path / "d.jsonl", docs)
    cfg = _cfg(path, num_epochs=1, drop_remainder=False, num_workers=2)
    ds = pipeline.build_dataset(cfg, tok, seq_len=16, batch_size=2, seed=0)
    it = iter(ds)
    first = [next(it) for _ in range(3)]
    state = it.get_state()
    rest = list(it)
    it.close()
    assert sorted(s[0] for b in first + rest for s in _segments(b)) == sorted(_chunks(docs, 16))
    again = iter(ds)
    again.set_state(state)
    _assert_same(list(again), rest)
    again.close()
    # A bad record inside a worker surfaces in the trainer's process with its origin.
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"tokens": [1, 2]}\n{"text": "caf\xe9"}\n')
    failing = iter(pipeline.build_dataset(_cfg(str(bad), num_workers=1), tok, seq_len=16,
                                          batch_size=2))
    with pytest.raises(BadDataError, match=f"{bad}:2: invalid UTF-8"):
        next(failing)
    failing.close()


def test_global_batch_on_fake_devices(tok, tmp_path):
    """Single process: the global array is the host batch, row-sharded over the 8 devices."""
    assert jax.device_count() == 8
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    sharding = NamedSharding(mesh, PartitionSpec("data"))
    ds = pipeline.build_dataset(_cfg(_write_jsonl(tmp_path / "d.jsonl", _documents(30))), tok,
                                seq_len=16, batch_size=8, seed=0)
    batch = next(iter(ds))
    global_batch = pipeline.to_global_batch(batch, sharding)
    for key, value in batch.items():
        assert global_batch[key].shape == value.shape and global_batch[key].dtype == value.dtype
        np.testing.assert_array_equal(np.asarray(global_batch[key]), value)
        for shard in global_batch[key].addressable_shards:
            np.testing.assert_array_equal(np.asarray(shard.data), value[shard.index])


_TWO_HOSTS = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.config.update("jax_num_cpu_devices", 4)
    index, port, path, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=index)
    from jax.experimental import multihost_utils
    from jax.sharding import NamedSharding, PartitionSpec
    from phi_jax import tokenizer as tokenizer_lib
    from phi_jax.data import pipeline
    tok = tokenizer_lib.Tokenizer.from_pretrained(sys.argv[5])
    cfg = pipeline.default_data_config()
    cfg.update(dict(source="jsonl", paths=path))
    ds = pipeline.build_dataset(cfg, tok, seq_len=16, batch_size=4, seed=0,
                                process_index=jax.process_index(), process_count=2)
    batch = next(iter(ds))
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    g = pipeline.to_global_batch(batch, NamedSharding(mesh, PartitionSpec("data")))
    full = {k: multihost_utils.process_allgather(v, tiled=True) for k, v in g.items()}
    np.savez(out, **{k: np.asarray(v) for k, v in full.items()})
    jax.distributed.shutdown()
""")


@pytest.mark.slow
def test_global_batch_two_processes(tok, tmp_path):
    """Two real processes x 4 devices: the global batch is host 0's batch then host 1's."""
    import portpicker
    path = _write_jsonl(tmp_path / "d.jsonl", _documents(30))
    tok.save(tmp_path / "tok")
    script = tmp_path / "host.py"
    script.write_text(_TWO_HOSTS)
    port = str(portpicker.pick_unused_port())
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = os.pathsep.join([os.getcwd(), env.get("PYTHONPATH", "")])
    procs = [subprocess.Popen([sys.executable, str(script), str(i), port, path,
                               str(tmp_path / f"out{i}.npz"), str(tmp_path / "tok")], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for i in range(2)]
    for p in procs:
        out, _ = p.communicate(timeout=240)
        assert p.returncode == 0, out.decode()[-3000:]
    hosts = [next(iter(pipeline.build_dataset(_cfg(path), tok, seq_len=16, batch_size=4, seed=0,
                                              process_index=i, process_count=2)))
             for i in range(2)]
    for i in range(2):
        got = np.load(tmp_path / f"out{i}.npz")
        for key in hosts[0]:
            np.testing.assert_array_equal(got[key], np.concatenate([hosts[0][key], hosts[1][key]]))


@pytest.mark.slow
def test_packed_rows_give_the_logits_of_each_document_alone(tmp_path):
    """No token attends across a segment: the model on a packed row equals the model per document."""
    from phi_jax.config import preset
    from phi_jax.model import Phi
    config = preset("test")
    vocab = {f"<{i}>": i for i in range(config.vocab_size)}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<0>"))
    tok = tokenizer_lib.HFTokenizer(backend, {"eos_token": "<0>", "bos_token": None})
    rng = np.random.default_rng(0)
    docs = [rng.integers(1, config.vocab_size, int(rng.integers(3, 14))).tolist() for _ in range(8)]
    seq_len = 32
    cfg = _cfg(_write_jsonl(tmp_path / "d.jsonl", docs), shuffle=False)
    batch = next(iter(pipeline.build_dataset(cfg, tok, seq_len=seq_len, batch_size=2, seed=0)))
    assert batch["segment_ids"].max() >= 2  # Rows really hold several documents.
    rows, segs, alone_tokens, alone_segments = [], [], [], []
    for row in range(2):
        for s in range(1, batch["segment_ids"][row].max() + 1):
            tokens = batch["tokens"][row][batch["segment_ids"][row] == s]
            rows.append(row), segs.append(s)
            alone_tokens.append(np.pad(tokens, (0, seq_len - len(tokens))))
            alone_segments.append((np.arange(seq_len) < len(tokens)).astype(np.int32))
    # One call (one compilation): the packed rows, then each document alone at positions 0, 1, ...
    n = len(alone_tokens)
    model = Phi(config)
    variables = jax.jit(model.init)(jax.random.key(0), batch["tokens"][:1, :8])
    logits, _ = jax.jit(model.apply)(
        variables, np.concatenate([batch["tokens"], np.stack(alone_tokens)]),
        positions=np.concatenate([batch["positions"], np.tile(np.arange(seq_len), (n, 1))]),
        segment_ids=np.concatenate([batch["segment_ids"], np.stack(alone_segments)]))
    packed, alone = logits[:2], logits[2:]
    for i, (row, s) in enumerate(zip(rows, segs)):
        sel = batch["segment_ids"][row] == s
        # float32 with highest matmul precision (conftest): only summation order differs.
        np.testing.assert_allclose(np.asarray(packed[row][sel]), np.asarray(alone[i][:sel.sum()]),
                                   atol=1e-5, rtol=1e-5)


def test_small_dataset_shuffle_is_a_new_permutation_every_epoch():
    n = 7
    shuffled = pipeline._PermutedMapDataset(grain.MapDataset.range(n), seed=3).repeat(3)
    epochs = [[shuffled[e * n + i] for i in range(n)] for e in range(3)]
    assert all(sorted(epoch) == list(range(n)) for epoch in epochs)
    assert epochs[0] != epochs[1] and epochs[1] != epochs[2] and epochs[0] != list(range(n))
    again = pipeline._PermutedMapDataset(grain.MapDataset.range(n), seed=3).repeat(3)
    assert [again[i] for i in range(3 * n)] == sum(epochs, [])  # Deterministic.
