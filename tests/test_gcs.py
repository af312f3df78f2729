"""gs:// everywhere, against a local fake GCS (tests/gcs_fixture.py): the path layer, training
killed mid-save and resumed from a bucket (bit-exact, never from an uncommitted step), curation
from and to a bucket (resumable per shard), `convert` both ways and `serve --model=gs://...`, and
the one-line errors for a missing bucket or object.
"""

import json
import os
import subprocess
import sys

import pytest

from phi_jax import checkpoint, fileio
from phi_jax.cli import main as cli_main
from phi_jax.errors import InputError

from served import served
from train_helpers import ROOT, params_equal, save_tiny_hf


def _fs():
    return fileio._fs("gs://")  # the client phi_jax uses (no cached listings: subprocesses write too)


def _put_text(url: str, text: str) -> str:
    fileio.atomic_write_text(url, text)
    return url


# ----------------------------------------------------------------------------------- fileio
def test_paths_globs_atomic_writes_and_local_copies(gcs, tmp_path, monkeypatch):
    root = gcs.url("io")
    _put_text(f"{root}/a/x.jsonl", "1\n")
    _put_text(f"{root}/a/b/y.jsonl", "2\n")
    _put_text(f"{root}/a/b/z.txt", "3\n")
    assert fileio.glob(f"{root}/**/*.jsonl") == [f"{root}/a/b/y.jsonl", f"{root}/a/x.jsonl"]
    assert fileio.glob(f"{root}/a/*.jsonl") == [f"{root}/a/x.jsonl"]
    assert fileio.glob(f"{root}/*/b/*.txt") == [f"{root}/a/b/z.txt"]
    assert fileio.as_path(f"{root}/a").is_dir() and fileio.size(f"{root}/a/x.jsonl") == 2
    assert fileio.as_path(f"{root}/a/x.jsonl").read_text() == "1\n"

    monkeypatch.setenv("PHI_JAX_CACHE", str(tmp_path / "cache"))
    local = fileio.local_copy(f"{root}/a")
    assert sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()) == [
        "b/y.jsonl", "b/z.txt", "x.jsonl"]
    assert fileio.local_copy(f"{root}/a") == local  # unchanged objects: the cached copy
    _put_text(f"{root}/a/x.jsonl", "changed\n")
    assert (fileio.local_copy(f"{root}/a") / "x.jsonl").read_text() == "changed\n"

    # staged_directory on a bucket: the publishing object (config.json) is uploaded last, and an
    # old output loses its publishing object before anything else is replaced.
    order = []
    real = fileio.upload_file
    monkeypatch.setattr(fileio, "upload_file", lambda s, d: (order.append(str(d)), real(s, d)))
    with fileio.staged_directory(f"{root}/hf") as tmp:
        (tmp / "config.json").write_text("{}")
        (tmp / "model.safetensors").write_bytes(b"w")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "t.txt").write_text("t")
    assert order[-1] == f"{root}/hf/config.json" and len(order) == 3
    with pytest.raises(InputError, match="already exists"):
        with fileio.staged_directory(f"{root}/hf"):
            pass
    with fileio.staged_directory(f"{root}/hf", overwrite=True) as tmp:  # replaced whole
        (tmp / "config.json").write_text('{"new": 1}')
    assert [p.name for p in fileio.as_path(f"{root}/hf").iterdir()] == ["config.json"]
    with pytest.raises(RuntimeError):  # a failure while filling it publishes nothing
        with fileio.staged_directory(f"{root}/hf2") as tmp:
            (tmp / "config.json").write_text("{}")
            raise RuntimeError("killed")
    assert not fileio.as_path(f"{root}/hf2").exists()


def test_gs_goes_through_gcsfs_even_when_tensorflow_is_importable(monkeypatch):
    """epath picks TensorFlow's gfile whenever tensorflow is importable; `import phi_jax` sets
    EPATH_USE_TF=false so phi_jax and Orbax share one client (gcsfs) either way."""
    import importlib.util

    from etils.epath import backend, gpath

    assert os.environ["EPATH_USE_TF"] == "false"
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "tensorflow" else real(name, *a))
    gpath._is_tf_installed.cache_clear()
    try:
        assert fileio.as_path("gs://bucket/x")._backend is backend.fsspec_backend
    finally:
        gpath._is_tf_installed.cache_clear()


def test_lora_saves_return_the_bucket_path_and_reload(gcs):
    """save_adapter / save_merged return the path layer's path: `gs://bucket/...` whole (a
    pathlib.Path folded it into `gs:/bucket/...`, a local directory of that name), and what they
    wrote loads back from that returned path as the same model."""
    import jax
    import numpy as np

    import phi_jax
    from phi_jax import lora
    from phi_jax.config import preset
    from phi_jax.model import Phi, init_params

    config = preset("test-llama")
    variables = init_params(config, jax.random.key(0))
    lora_config = lora.with_lora(config, 2, 4.0, ["q_proj", "v_proj"])
    tuned = lora.add_lora_params(lora_config, variables, jax.random.key(1))
    tuned = jax.tree_util.tree_map_with_path(  # lora_b is zeros at init: give the adapter an effect
        lambda path, a: a + 0.05 if "lora_b" in jax.tree_util.keystr(path) else a, tuned)
    tokens = np.arange(12).reshape(2, 6) % config.vocab_size
    want = np.asarray(Phi(lora_config).apply(tuned, tokens)[0])

    root = gcs.url("lora")
    adapter = lora.save_adapter(f"{root}/adapter", lora_config, tuned)
    assert str(adapter) == f"{root}/adapter" and fileio.is_remote(adapter)
    assert _fs().exists(f"{root}/adapter/adapter_model.safetensors")
    got_config, got = lora.load_adapter(fileio.local_copy(adapter), config, variables)
    np.testing.assert_allclose(np.asarray(Phi(got_config).apply(got, tokens)[0]), want, atol=1e-5)

    merged = lora.save_merged(f"{root}/merged", lora_config, tuned)
    assert str(merged) == f"{root}/merged"
    model, reloaded = phi_jax.from_pretrained(merged)
    np.testing.assert_allclose(np.asarray(model.apply(reloaded, tokens)[0]), want, atol=1e-4)


def test_gguf_and_tokenizer_files_in_a_bucket(gcs, tmp_path):
    from gguf_fixtures import write_gguf

    from phi_jax.inference.loader import source_kind
    from phi_jax.tokenizer import Tokenizer

    path = write_gguf(tmp_path / "t.gguf", "llama", {}, {}, vocab_size=256)
    root = gcs.url("gguf")
    fileio.upload_file(path, f"{root}/t.gguf")
    assert source_kind(f"{root}/t.gguf") == "gguf" and source_kind(root) == "gguf"
    text = "def f(x):\n    return 12345"
    assert Tokenizer.from_pretrained(f"{root}/t.gguf").encode(text) == Tokenizer.from_pretrained(path).encode(text)


# --------------------------------------------------------------------------------- training
STEPS, EVERY, KILL_AT = 20, 5, 10


def _train_args(workdir, tok, data):
    return [f"--config={ROOT / 'configs/tiny.py'}:runlocal", f"--workdir={workdir}",
            f"--config.train.steps={STEPS}", f"--config.train.checkpoint_every={EVERY}",
            f"--config.tokenizer.path={tok}", "--config.data.source=jsonl", f"--config.data.paths={data}",
            "--config.data.heldout_fraction=0.0"]


def _train_subprocess(workdir, tok, data, faults=None):
    env = dict(os.environ, **({"PHI_JAX_FAULTS": json.dumps(faults)} if faults else {}))
    return subprocess.run([sys.executable, "-m", "phi_jax.cli", "train", *_train_args(workdir, tok, data)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def bucket_inputs(gcs, tmp_path_factory):
    """A tokenizer directory and JSONL training data, both in the bucket."""
    from phi_jax.data import corpus

    local = tmp_path_factory.mktemp("tok")
    corpus.get_or_train_tokenizer(local, vocab_size=512)
    tok = gcs.url("tokenizer")
    fileio.upload_tree(local / "tokenizer", tok)
    names = corpus.document_names()[:48]
    data = _put_text(gcs.url("data/docs.jsonl"), "".join(
        json.dumps({"text": corpus.read_document(n)}) + "\n" for n in names))
    return tok, data


@pytest.mark.slow
def test_train_killed_mid_save_on_gcs_resumes_bit_exact_from_committed_steps(gcs, bucket_inputs, tmp_path):
    from phi_jax.cli.train import load_validated
    from phi_jax.cli import build_parser
    from phi_jax.training.loop import train

    tok, data = bucket_inputs
    args, extra = build_parser().parse_known_args(["train", *_train_args(tmp_path / "ref", tok, data)])
    args.config_overrides = extra
    reference = train(load_validated(args), tmp_path / "ref")  # a local workdir, never stopped

    workdir = gcs.url("run")
    killed = _train_subprocess(workdir, tok, data, faults={"kill_after_save_start": KILL_AT})
    assert killed.returncode == -9, killed.stderr[-3000:]
    ckpts = f"{workdir}/checkpoints"
    committed = {int(p.rsplit("/", 1)[-1]) for p in _fs().ls(ckpts) if p.rsplit("/", 1)[-1].isdigit()
                 and _fs().exists(f"{p}/commit_success.txt")}
    assert committed and max(committed) <= KILL_AT
    # A step directory without its commit marker (a save killed earlier, whatever it holds) is
    # neither listed nor restored: copy a committed step to step 15, minus the marker.
    src = f"{ckpts}/{max(committed)}".split("://", 1)[1]
    dst = f"{ckpts}/15".split("://", 1)[1]
    for name in _fs().find(src):
        if not name.endswith("commit_success.txt"):
            _fs().copy(name, name.replace(f"{src}/", f"{dst}/", 1))
    manager = checkpoint.make_manager(workdir, read_only=True)
    assert 15 not in manager.all_steps() and set(manager.all_steps()) <= committed | {KILL_AT}

    resumed = _train_subprocess(workdir, tok, data)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    result = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert result["start_step"] in committed | {KILL_AT} and result["end_step"] == STEPS
    assert params_equal(checkpoint.load_params_for_inference(workdir)[1],
                        checkpoint.load_params_for_inference(tmp_path / "ref")[1])
    lines = [json.loads(l) for l in fileio.as_path(f"{workdir}/metrics.jsonl").read_text().splitlines()]
    losses = {l["step"]: l["loss"] for l in lines if "loss" in l}  # the resumed run's steps win
    assert [losses[s] for s in range(STEPS)] == reference["losses"]
    assert fileio.glob(f"{workdir}/tensorboard/*tfevents*")


# --------------------------------------------------------------------------------- curation
def _rows(n):
    return [{"id": f"r{i}", "text": f"text {i}", "meta": {"quality": i % 5}} for i in range(n)]


def test_curate_from_and_to_gcs_resumes_per_shard_and_chains(gcs, tmp_path):
    from phi_jax.curation.core.runners import run_stage
    from phi_jax.curation.quality.filter import filter_stage
    from phi_jax.data import records

    text = "".join(json.dumps(r) + "\n" for r in _rows(35))
    (tmp_path / "in.jsonl").write_text(text)
    root = gcs.url("curate")
    _put_text(f"{root}/in/deep/in.jsonl", text)
    local = run_stage(filter_stage(2), str(tmp_path / "in.jsonl"), tmp_path / "out", shard_size=10,
                      progress=False)
    out = f"{root}/out"
    remote = run_stage(filter_stage(2), f"{root}/in/**/*.jsonl", out, shard_size=10, progress=False)
    assert remote["status"] == "complete" and remote["counts"] == local["counts"]
    for shard in local["outputs"]:  # the same bytes, wherever they were written
        assert fileio.as_path(f"{out}/{shard['path']}").read_bytes() == (tmp_path / "out" / shard["path"]).read_bytes()

    # A run killed after one shard's output but before its marker: only that shard is redone.
    fileio.as_path(f"{out}/.shards/part-00002.json").unlink()
    manifest = records.read_manifest(out)
    manifest["status"] = "running"
    records.write_manifest(out, manifest)
    again = run_stage(filter_stage(2), f"{root}/in/**/*.jsonl", out, shard_size=10, progress=False)
    assert again["runs"][-1]["shards_processed"] == 1 and again["counts"] == local["counts"]

    # Chained: the bucket output as the next stage's input, written as ArrayRecord (uploaded
    # whole) and read back through Grain straight from the bucket.
    chained = run_stage(filter_stage(3), out, f"{root}/hq", shard_size=100, output_format="arrayrecord",
                        progress=False)
    got = list(records.iter_output(f"{root}/hq"))
    want = [records.make_record(**r) for r in _rows(35) if r["meta"]["quality"] >= 3]
    assert got == want and chained["counts"]["records_out"] == len(want)


def test_dedup_from_and_to_gcs_decides_what_the_library_decides(gcs):
    pytest.importorskip("rensa")
    import random

    from phi_jax.curation.core.runners import run_stage
    from phi_jax.curation.dedup import remove as dedup
    from phi_jax.data import records

    rng, rows = random.Random(0), []
    for i in range(30):
        words = [f"w{rng.randrange(10**6)}" for _ in range(60)]
        rows.append({"id": f"a{i}", "text": " ".join(words)})
        if i % 3 == 0:  # a near duplicate
            rows.append({"id": f"b{i}", "text": " ".join(words[:-1] + ["changed"])})
    url = _put_text(gcs.url("dedup/in.jsonl"), "".join(json.dumps(r) + "\n" for r in rows))
    out = gcs.url("dedup/out")
    run_stage(dedup.dedup_stage(0.8), url, out, shard_size=7, progress=False)
    result = dedup.near_duplicates(rows, 0.8)
    assert [r["id"] for r in result.kept] == [r["id"] for r in records.iter_output(out)]
    assert result.removed == 10 and fileio.as_path(f"{out}/clusters.jsonl").is_file()


def test_cli_data_stage_on_gcs_and_bad_bucket_paths_are_one_line_errors(gcs, capsys):
    root = gcs.url("cli")
    _put_text(f"{root}/in.jsonl", "".join(json.dumps(r) + "\n" for r in _rows(12)))
    assert cli_main(["data", "filter", f"--input={root}/in.jsonl", f"--output={root}/out",
                     "--min-quality=2", "--no-progress"]) == 0
    assert records_out(f"{root}/out") == 6
    capsys.readouterr()
    cases = [
        (["data", "filter", "--input=gs://no-such-bucket-x/in.jsonl", f"--output={root}/o2", "--min-quality=1"],
         "no-such-bucket-x"),
        (["data", "filter", f"--input={root}/missing.jsonl", f"--output={root}/o3", "--min-quality=1"],
         f"{root}/missing.jsonl"),
        (["data", "filter", f"--input={root}/in.jsonl", "--output=gs://no-such-bucket-x/out", "--min-quality=1"],
         "no-such-bucket-x"),
        (["sample", "--model=gs://no-such-bucket-x/run", "--prompt=a"], "no-such-bucket-x"),
        (["sample", f"--model={root}/no-model", "--prompt=a"], f"{root}/no-model"),
        (["convert", f"{root}/no-model", f"{root}/dst"], f"{root}/no-model"),
        (["train", f"--config={ROOT / 'configs/tiny.py'}:runlocal", "--workdir=gs://no-such-bucket-x/run"],
         "no-such-bucket-x"),
    ]
    for argv, named in cases:
        assert cli_main(argv) == 2, argv
        err = capsys.readouterr().err
        (line,) = [l for l in err.splitlines() if ": error: " in l]  # the one error line
        assert named in line and "Traceback" not in err, (argv, err)
        if "no-such-bucket-x" in named:
            assert "does not exist" in line and "gcloud" in line


def records_out(directory: str) -> int:
    from phi_jax.data import records

    return records.read_manifest(directory)["counts"]["records_out"]


# ------------------------------------------------------------------------- convert and serve
@pytest.mark.slow
def test_convert_both_ways_and_serve_a_workdir_from_gcs(gcs, tmp_path):
    import phi_jax
    from phi_jax.inference.decode import generate
    from phi_jax.tokenizer import Tokenizer

    texts = ["def add(a, b):\n    return a + b\n" * 20, "class A:\n    pass\n" * 20]
    hf_local = save_tiny_hf(tmp_path / "hf", texts)
    root = gcs.url("convert")
    fileio.upload_tree(hf_local, f"{root}/hf")
    assert cli_main(["convert", f"{root}/hf", f"{root}/wd"]) == 0      # HF (bucket) -> workdir (bucket)
    assert cli_main(["convert", f"{root}/wd", f"{root}/hf2"]) == 0     # workdir (bucket) -> HF (bucket)
    assert cli_main(["convert", f"{root}/wd", f"{root}/hf2"]) == 2     # never over an output silently
    _, want = phi_jax.from_pretrained(hf_local)
    _, got = phi_jax.from_pretrained(f"{root}/hf2")
    assert params_equal(got, want)
    assert _fs().exists(f"{root}/wd/checkpoints/0/commit_success.txt")

    # eval: model and data from the bucket, results to it; the same numbers as all-local
    ppl = _put_text(f"{root}/ppl.jsonl", "".join(json.dumps({"text": t}) + "\n" for t in texts))
    (tmp_path / "ppl.jsonl").write_text(fileio.as_path(ppl).read_text())
    common = ["--source=jsonl", "--seq-len=64"]
    assert cli_main(["eval", "perplexity", f"--model={root}/wd", f"--output={root}/eval",
                     f"--paths={ppl}", *common]) == 0
    assert cli_main(["eval", "perplexity", f"--model={hf_local}", f"--output={tmp_path / 'eval'}",
                     f"--paths={tmp_path / 'ppl.jsonl'}", *common]) == 0
    remote = json.loads(fileio.as_path(f"{root}/eval/perplexity_results.json").read_text())["metrics"]
    local = json.loads((tmp_path / "eval" / "perplexity_results.json").read_text())["metrics"]
    assert remote["num_tokens"] == local["num_tokens"] > 0
    assert remote["loss"] == pytest.approx(local["loss"], rel=1e-6)

    tokenizer = Tokenizer.from_pretrained(hf_local)
    with served(f"--model={root}/wd", "--num-slots=2", "--max-len=64") as (_, client):
        r = client.completions.create(model="run", prompt="def add(", max_tokens=10, temperature=0)
        model, variables = phi_jax.from_pretrained(hf_local)
        ids = generate(model, variables, [tokenizer.encode("def add(")], max_new_tokens=10,
                       stop_tokens=[tokenizer.eos_id])[0]
        assert r.choices[0].text == tokenizer.decode(ids)
