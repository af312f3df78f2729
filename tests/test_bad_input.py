"""Bad input, as a user would give it: one line naming the problem, the right exit code, nothing lost.

Each row of CLI_CASES is one case: the argv of `phi-jax` (run as a real subprocess), the exit code,
and a regex the single error line must match. Placeholders: {tiny} configs/tiny.py, {tmp} a fresh
directory for the case, {hf} a tiny HF model with a tokenizer, {wd} a phi_jax workdir of it, {fx}
a directory of broken files (see `fixtures`). A case may name paths under PROTECT whose contents
must be byte-identical afterwards. HTTP_CASES do the same for the server (see test_serve_errors.py
for the protocol-level field validation, ~40 more cases).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import jax
import pytest

import phi_jax
from phi_jax import checkpoint
from phi_jax.config import preset
from phi_jax.model import init_params
from phi_jax.tokenizer import train_bpe

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.py")
FINETUNE = str(ROOT / "configs" / "finetune_smollm2_lora.py") + ":runlocal"
TEXTS = ["def add(a, b):\n    return a + b\n" * 20, "class A:\n    pass\n" * 20]

# (id, argv, exit code, regex of the error line)
T = ["train", "--config={tiny}", "--workdir={tmp}/run"]
S = ["sample", "--model={hf}", "--prompt=def"]
F = ["finetune", "--config={ft}", "--model={hf}", "--workdir={tmp}/run"]
CLI_CASES = [
    # ---------------------------------------------------------------- train: config keys/values
    ("unknown key", T + ["--config.train.stepz=3"], 2,
     r"config key train\.stepz does not exist; did you mean --config\.train\.steps\?$"),
    ("key in the wrong section", T + ["--config.mesh.data=2"], 2,
     r"config key mesh\.data does not exist; did you mean --config\.mesh\.shape\.data\?"),
    ("missing config file", ["train", "--config={tmp}/nope.py", "--workdir={tmp}/run"], 2,
     r"config file '.*nope\.py' does not exist; pass --config="),
    ("config file with a syntax error", ["train", "--config={fx}/bad_syntax.py", "--workdir={tmp}/run"], 2,
     r"bad_syntax\.py failed to load \(SyntaxError"),
    ("config file without get_config", ["train", "--config={fx}/no_get_config.py",
                                        "--workdir={tmp}/run"], 2, r"has no get_config\(arg\) function"),
    ("negative steps", T + ["--config.train.steps=-5"], 2, r"--config\.train\.steps=-5 is invalid: must be an integer >= 1"),
    ("zero checkpoint_every", T + ["--config.train.checkpoint_every=0"], 2, r"checkpoint_every=0 is invalid"),
    ("zero log_every", T + ["--config.train.log_every=0"], 2, r"log_every=0 is invalid"),
    ("negative learning rate", T + ["--config.optimizer.lr=-0.1"], 2, r"optimizer\.lr=-0\.1 is invalid: the learning rate must be a positive"),
    ("nan learning rate", T + ["--config.optimizer.lr=nan"], 2, r"optimizer\.lr=nan is invalid"),
    ("learning rate past float32", T + ["--config.optimizer.lr=1e39"], 2, r"optimizer\.lr=1e\+39 is invalid"),
    ("string where an int goes", T + ["--config.model.d_model=abc"], 2, r"--config\.model\.d_model=abc: expected an integer"),
    ("heads do not divide d_model", T + ["--config.model.n_heads=3"], 2, r"--config\.model\.n_heads: 3 heads do not divide d_model=256"),
    ("batch not divisible by the mesh", T + ["--config.train.batch_size=3"], 2, r"batch_size=3 must be divisible by the batch shards \(8\)"),
    ("seq_len past max_len", T + ["--config.train.seq_len=4096"], 2, r"seq_len=4096 exceeds model\.max_len=512"),
    ("a section set as a value", T + ["--config.train=3"], 2, r"--config\.train is a section, not a value"),
    ("a bool that is not one", T + ["--config.train.async_checkpoint=maybe"], 2, r"async_checkpoint=maybe: expected true or false"),
    ("unknown data source", T + ["--config.data.source=parquet"], 2, r"data\.source='parquet' is not one of"),
    ("data path matching nothing", T + ["--config.data.source=jsonl", "--config.data.paths={tmp}/none.jsonl"], 2,
     r"data path '.*none\.jsonl' matches no file"),
    ("zero mesh axis", T + ["--config.mesh.shape.data=0"], 2, r"mesh\.shape\.data=0 is invalid"),
    ("unknown mesh axis in a rule", T + ["--config.mesh.rules.embed=bogus"], 2, r"mesh\.rules\.embed maps to unknown mesh axes"),
    ("held-out fraction of 1.5", T + ["--config.data.heldout_fraction=1.5"], 2, r"heldout_fraction=1\.5: must be in \[0, 1\)"),
    ("max_to_keep 0", T + ["--config.train.max_to_keep=0"], 2, r"max_to_keep=0 is invalid"),
    ("unknown curation key", T + ["--config.curation.dedup.treshold=0.5"], 2,
     r"config key curation\.dedup\.treshold does not exist; did you mean --config\.curation\.dedup\.threshold\?"),
    ("curation score out of range", T + ["--config.curation.filter.min_score=7"], 2,
     r"--config\.curation\.filter\.min_score=7\.0 is invalid: must be a score in \[0, 5\]"),
    ("curation threshold out of range", T + ["--config.curation.dedup.threshold=1.5"], 2,
     r"--config\.curation\.dedup\.threshold=1\.5 is invalid: must be a Jaccard similarity in \(0, 1\]"),
    ("curation runner unknown", T + ["--config.curation.runner=spark"], 2,
     r"--config\.curation\.runner='spark' is invalid: must be local or beam"),
    ("curation filter without annotations", T + ["--config.curation.annotate.enabled=False"], 2,
     r"--config\.curation\.filter\.enabled=True is invalid: the filter reads annotation\.score"),
    ("recipe with an unknown key", ["recipe", "--config={recipe}", "--workdir={tmp}/run", "--config.annotate.sampel=3"],
     2, r"config key annotate\.sampel does not exist; did you mean --config\.annotate\.sample\?"),
    ("recipe score out of range", ["recipe", "--config={recipe}", "--workdir={tmp}/run",
                                   "--config.filter.min_quality=9"], 2,
     r"--config\.filter\.min_quality=9\.0 is invalid: must be a score in \[0, 5\]"),
    ("recipe without a workdir", ["recipe", "--config={recipe}"], 2, r"needs --workdir=DIR"),
    ("train without a workdir", ["train", "--config={tiny}"], 2, r"needs --workdir=DIR"),
    ("override without a value", T + ["--config.train.steps"], 2, r"--config\.train\.steps has no value"),
    ("not an override", T + ["--bogus=1"], 2, r"unrecognized argument '--bogus=1'"),
    # ---------------------------------------------------------------------- train: data records
    ("JSONL line that is not JSON",
     T + ["--config.data.source=jsonl", "--config.data.paths={fx}/bad.jsonl", "--config.tokenizer.path={hf}",
          "--config.model.vocab_size=300", "--config.data.heldout_fraction=0"], 2,
     r"bad\.jsonl:2: not valid JSON .*set data\.bad_data='skip'"),
    ("empty JSONL file",
     T + ["--config.data.source=jsonl", "--config.data.paths={fx}/empty.jsonl", "--config.tokenizer.path={hf}",
          "--config.model.vocab_size=300"], 2, r"empty\.jsonl: empty file \(no records\)"),
    ("JSONL record without the text field",
     T + ["--config.data.source=jsonl", "--config.data.paths={fx}/nofield.jsonl", "--config.tokenizer.path={hf}",
          "--config.model.vocab_size=300", "--config.data.heldout_fraction=0"], 2,
     r"nofield\.jsonl:1: record has no field 'text' .*data\.jsonl_field"),
    ("tokenizer larger than the model", T + ["--config.tokenizer.path={hf}", "--config.model.vocab_size=100"], 2,
     r"the tokenizer has \d+ tokens but model\.vocab_size is 100"),
    # ---------------------------------------------------------------------------- finetune
    ("finetune without --data", F, 2, r"the following arguments are required: --data"),
    ("finetune data that does not exist", F + ["--data={tmp}/none"], 2,
     r"--data=.*none does not exist; pass the output directory of `phi-jax data instruct`"),
    ("finetune data without conversations", F + ["--data={fx}/nochat"], 2,
     r"record 'r1' has no meta\.messages conversation; .*make them with `phi-jax data instruct`"),
    ("negative LoRA rank", F + ["--data={fx}/chat", "--config.lora.rank=-1"], 2,
     r"--config\.lora\.rank=-1 is invalid: must be an integer >= 0 \(0 = full fine-tuning"),
    ("unknown LoRA target module", F + ["--data={fx}/chat", "--config.lora.targets=q_proj,bogus"], 2,
     r"--config\.lora\.targets='q_proj,bogus': unknown module\(s\) \['bogus'\] for a phi model; use "
     r"some of \['q_proj', 'k_proj', 'v_proj', 'dense', 'fc1', 'fc2'\]"),
    ("adapter directory without an adapter", S + ["--adapter={fx}"], 2,
     r"no adapter_config\.json in .*; --adapter must be a directory written by `phi-jax finetune`"),
    # ------------------------------------------------------------------------------ sample
    ("model path that does not exist", ["sample", "--model={tmp}/nope", "--prompt=x"], 2, r"model path '.*nope' does not exist"),
    ("model path that is no model", ["sample", "--model={fx}", "--prompt=x"], 2, r"is neither an HF checkpoint .* nor a \.gguf file"),
    ("model path that is some other file", ["sample", "--model={fx}/bad.jsonl", "--prompt=x"], 2, r"is a file but not a \.gguf"),
    ("negative temperature", S + ["--temperature=-1"], 2, r"--temperature=-1\.0 is invalid: must be a finite number >= 0"),
    ("top_p above 1", S + ["--top-p=2"], 2, r"--top-p=2\.0 is invalid: must be in \(0, 1\]"),
    ("top_p of 0", S + ["--top-p=0"], 2, r"--top-p=0\.0 is invalid"),
    ("top_k below -1", S + ["--top-k=-5"], 2, r"--top-k=-5 is invalid: must be an integer >= 0"),
    ("zero new tokens", S + ["--max-new-tokens=0"], 2, r"--max-new-tokens=0 is invalid: must be an integer >= 1"),
    ("new tokens past the context", S + ["--max-new-tokens=5000"], 2, r"context is 128, so at most \d+ new tokens fit"),
    ("zero samples", S + ["--num-samples=0"], 2, r"--num-samples=0: must be >= 1"),
    ("step on an HF directory", S + ["--step=3"], 2, r"--step=3 applies to phi_jax workdirs only"),
    ("step the workdir does not have", ["sample", "--model={wd}", "--prompt=x", "--step=99"], 2,
     r"has no checkpoint step 99; it has steps \[0\]"),
    ("corrupt tokenizer.json", ["sample", "--model={fx}/badtok", "--prompt=x"], 2, r"badtok/tokenizer\.json is not a readable tokenizer\.json .*copy it again"),
    ("config.json that is not JSON", ["sample", "--model={fx}/badconfig", "--prompt=x"], 2, r"badconfig.*config\.json"),
    ("truncated safetensors", ["sample", "--model={fx}/truncated", "--prompt=x"], 2, r"truncated.*model\.safetensors"),
    ("pickle-only checkpoint", ["sample", "--model={fx}/pickle", "--prompt=x"], 2, r"never unpickles"),
    ("tokenizer that is not there", S + ["--tokenizer={tmp}/none"], 2, r"none"),
    # ----------------------------------------------------------------------------- convert
    ("convert an unknown source", ["convert", "{fx}/nonempty", "{tmp}/out"], 2, r"is neither an HF checkpoint"),
    ("convert into a non-empty directory", ["convert", "{hf}", "{fx}/nonempty"], 2,
     r"nonempty already exists and is not empty; .*--overwrite"),
    ("convert onto a file", ["convert", "{hf}", "{fx}/bad.jsonl"], 2, r"exists and is a file"),
    ("convert onto itself", ["convert", "{wd}", "{wd}"], 2, r"is SRC"),
    ("convert with zero shard size", ["convert", "{wd}", "{tmp}/out", "--max-shard-size-gb=0"], 2, r"must be > 0"),
    # ------------------------------------------------------------------------------- serve
    ("serve on port 70000", ["serve", "--model={hf}", "--port=70000"], 2, r"--port=70000: must be in \[1, 65535\]"),
    ("serve a missing chat template", ["serve", "--model={hf}", "--chat-template={tmp}/t.jinja"], 2, r"t\.jinja: no such file"),
    ("serve zero slots", ["serve", "--model={hf}", "--num-slots=0", "--no-warmup"], 2, r"need num_slots >= 1"),
    ("serve a context past the model's", ["serve", "--model={hf}", "--max-len=100000", "--no-warmup"], 2,
     r"max_len=100000 must be in \[2, 128\]"),
    ("serve a zero decode chunk", ["serve", "--model={hf}", "--decode-chunk=0", "--no-warmup"], 2, r"decode_chunk >= 1"),
    # -------------------------------------------------------------------------------- eval
    ("choice data that does not exist", ["eval", "choice", "--model={hf}", "--output={tmp}/o",
                                         "--data={tmp}/none.jsonl"], 2, r"none\.jsonl: cannot read the choice data"),
    ("choice line that is not JSON", ["eval", "choice", "--model={hf}", "--output={tmp}/o",
                                      "--data={fx}/choice_badjson.jsonl"], 2, r"choice_badjson\.jsonl:1: not valid JSON"),
    ("choice label out of range", ["eval", "choice", "--model={hf}", "--output={tmp}/o",
                                   "--data={fx}/choice_bad.jsonl"], 2, r"choice_bad\.jsonl:1: label 5 is not an index"),
    ("eval batch size 0", ["eval", "choice", "--model={hf}", "--output={tmp}/o", "--data={fx}/choice_bad.jsonl",
                           "--batch-size=0"], 2, r"--batch-size=0: must be >= 1"),
    ("eval output that is a file", ["eval", "choice", "--model={hf}", "--output={fx}/bad.jsonl",
                                    "--data={fx}/choice_bad.jsonl"], 2, r"is a file; give a directory"),
    ("perplexity over missing data", ["eval", "perplexity", "--model={hf}", "--output={tmp}/o", "--source=jsonl",
                                      "--paths={tmp}/none.jsonl"], 2, r"none\.jsonl' matches no file"),
    # -------------------------------------------------------------------------------- plan, cli
    ("plan on zero devices", ["plan", "--devices", "0"], 2, r"--devices \[0\]: device counts must be >= 1"),
    ("plan with an unknown key", ["plan", "--config.train.stepz=1"], 2, r"config key train\.stepz does not exist"),
    ("unknown command", ["bogus"], 2, r"invalid choice: 'bogus'"),
    ("a command's unknown flag", ["sample", "--model=x", "--prompt=x", "--bogus"], 2, r"unrecognized arguments: --bogus"),
]
# Cases whose directories must come out byte-identical.
PROTECT = {"convert into a non-empty directory": ["{fx}/nonempty"],
           "convert onto itself": ["{wd}"]}
# Train cases that fail only once records are read (the workdir exists by then).
FOUND_WHILE_READING = {"JSONL line that is not JSON", "JSONL record without the text field"}


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_input")
    tokenizer = train_bpe(TEXTS, vocab_size=300)
    config = preset("test", vocab_size=300, eos_token_id=tokenizer.eos_id)
    hf = root / "hf"
    phi_jax.save_pretrained(hf, config, init_params(config, jax.random.key(0)))
    tokenizer.save(hf)
    wd = root / "wd"
    manager = checkpoint.make_manager(wd, async_save=False)
    checkpoint.save(manager, 0, params=init_params(config, jax.random.key(0))["params"],
                    meta={"model_config": config.to_dict()})
    manager.wait_until_finished()
    tokenizer.save(wd / "tokenizer")
    fx = root / "fx"
    fx.mkdir()
    (fx / "bad_syntax.py").write_text("def get_config(:\n")
    (fx / "no_get_config.py").write_text("x = 1\n")
    (fx / "bad.jsonl").write_text('{"text": "def f():\\n    return 1\\n"}\n{not json\n')
    (fx / "empty.jsonl").write_text("")
    (fx / "nofield.jsonl").write_text('{"body": "x"}\n')
    (fx / "choice_bad.jsonl").write_text('{"context": "a", "choices": [" b"], "label": 5}\n')
    (fx / "choice_badjson.jsonl").write_text("{oops\n")
    for name in ("badtok", "badconfig", "truncated", "pickle"):
        shutil.copytree(hf, fx / name)
    (fx / "badtok" / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    (fx / "badconfig" / "config.json").write_text("{not json")
    weights = fx / "truncated" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    (fx / "pickle" / "model.safetensors").unlink()
    (fx / "pickle" / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    (fx / "nonempty").mkdir()
    (fx / "nonempty" / "keep.txt").write_text("precious")
    for name, meta in (("chat", {"messages": [{"role": "user", "content": "hi"},
                                              {"role": "assistant", "content": "hello"}]}),
                       ("nochat", {"split": "train"})):
        (fx / name).mkdir()
        (fx / name / "part-00000.jsonl").write_text(json.dumps({"id": "r1", "text": "hi", "meta": meta}) + "\n")
    return {"tiny": TINY, "recipe": str(ROOT / "configs" / "recipe_phi1_tiny.py"), "hf": str(hf),
            "wd": str(wd), "fx": str(fx), "ft": FINETUNE}


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(path)).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def _phi_jax(argv, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "phi_jax.cli", *argv], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env=dict(os.environ, **(env or {})))


@pytest.mark.parametrize("name, argv, code, pattern", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_cli_bad_input(fixtures, tmp_path, name, argv, code, pattern):
    import re

    values = dict(fixtures, tmp=str(tmp_path))
    argv = [a.format(**values) for a in argv]
    protected = [Path(p.format(**values)) for p in PROTECT.get(name, [])]
    before = [_digest(p) for p in protected]
    result = _phi_jax(argv)
    assert result.returncode == code, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    error = [line for line in result.stderr.splitlines() if line.strip()][-1]
    assert re.match(r"phi-jax( \S+)?: error: ", error), error
    assert re.search(pattern, error), error
    assert [_digest(p) for p in protected] == before
    if argv[0] in ("train", "finetune", "recipe") and name not in FOUND_WHILE_READING:
        assert not (tmp_path / "run").exists(), "a config error must leave no workdir behind"


def test_every_subcommand_answers_help():
    from phi_jax.cli import SUBCOMMANDS

    for command in SUBCOMMANDS + ("",):
        result = _phi_jax([command, "--help"] if command else ["--help"], timeout=60)
        assert result.returncode == 0 and "usage: phi-jax" in result.stdout, (command, result.stderr)


def test_debug_shows_the_traceback(fixtures, tmp_path):
    argv = ["sample", f"--model={tmp_path}/nope", "--prompt=x"]
    assert "Traceback" in _phi_jax(argv + ["--debug"]).stderr
    assert "Traceback" in _phi_jax(argv, env={"PHI_JAX_DEBUG": "1"}).stderr


def test_convert_overwrite_replaces_only_once_complete(fixtures, tmp_path):
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "old.txt").write_text("old")
    result = _phi_jax(["convert", fixtures["wd"], str(dst), "--overwrite"])
    assert result.returncode == 0, result.stderr[-2000:]
    assert not (dst / "old.txt").exists() and (dst / "config.json").exists()
    _, original = phi_jax.from_pretrained(fixtures["hf"])
    _, converted = phi_jax.from_pretrained(dst)
    assert all(bool((a == b).all()) for a, b in zip(jax.tree.leaves(original), jax.tree.leaves(converted)))
    assert [p.name for p in tmp_path.iterdir()] == ["dst"]  # no temporary sibling left behind


@pytest.mark.slow
def test_a_poisoned_learning_rate_never_reaches_a_checkpoint(tmp_path, fixtures):
    """lr 3e38 is a valid float32, but its first update overflows: every step is refused, the run
    stops naming the last good step, and no checkpoint with a non-finite value is ever written."""
    import numpy as np

    run = tmp_path / "run"
    result = _phi_jax(["train", f"--config={TINY}:runlocal", f"--workdir={run}", "--config.optimizer.lr=3e38",
                       "--config.optimizer.warmup_steps=0", "--config.train.max_nonfinite_streak=2",
                       f"--config.tokenizer.path={fixtures['hf']}", "--config.model.vocab_size=300"])
    assert result.returncode == 1, result.stderr[-3000:]
    error = result.stderr.strip().splitlines()[-1]
    assert "2 steps in a row had a non-finite loss, gradient or update" in error
    assert "Last good checkpoint: none (no checkpoint was written yet)" in error
    manager = checkpoint.make_manager(run, read_only=True)
    for step in manager.all_steps():
        params = checkpoint.load_params_for_inference(run, step=step)[1]
        assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))


# ------------------------------------------------------------------------------------- server
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Server:
    """`phi-jax serve` as a subprocess on a free loopback port."""

    def __init__(self, model: str, env=None, *extra):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "phi_jax.cli", "serve", f"--model={model}", f"--port={self.port}",
             "--num-slots=2", "--max-len=64", "--no-warmup", "--served-model-name=m", *extra],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=dict(os.environ, **(env or {})))
        deadline = time.monotonic() + 240
        while True:
            assert self.proc.poll() is None, self.proc.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "the server did not come up"
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)

    def complete(self, **body):
        return httpx.post(f"{self.url}/v1/completions", json={"model": "m", **body}, timeout=120)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(30)


GREEDY = {"prompt": "def add(", "max_tokens": 8, "temperature": 0}
# (id, request body or raw bytes, status, regex of error.message); every case is followed by a
# good request that must give the same greedy text as before.
HTTP_CASES = [
    ("top_k past int32", dict(GREEDY, top_k=10**12, temperature=0.5, seed=1), 200, None),
    ("top_k past int64", dict(GREEDY, top_k=10**30), 200, None),
    ("seed past int64", dict(GREEDY, seed=2**70), 400, r"seed=.* is invalid: must be a 64-bit integer"),
    ("negative seed", dict(GREEDY, seed=-5, temperature=0.7), 200, None),
    ("200k-deep JSON", b'{"model": "m", "prompt": ' + b"[" * 200_000 + b"]" * 200_000 + b"}", 400,
     r"nested more than 32 levels"),
    ("40-deep JSON", json.dumps({"model": "m", "prompt": "x", "user": None, "stop":
                                 json.loads("[" * 40 + "]" * 40)}).encode(), 400, r"nested more than 32"),
    ("NaN temperature", b'{"model": "m", "prompt": "x", "temperature": NaN}', 400, r"temperature"),
    ("Infinity max_tokens", b'{"model": "m", "prompt": "x", "max_tokens": Infinity}', 400, r"max_tokens"),
    ("body past the size limit", {"prompt": "x" * (5 * 2**20)}, 413, r"larger than"),
    ("stop id list with 9 strings", dict(GREEDY, stop=list("abcdefghi")), 400, r"stop"),
]


@pytest.fixture(scope="module")
def server(fixtures):
    srv = _Server(fixtures["hf"])
    try:
        srv.expected = srv.complete(**GREEDY).json()["choices"][0]["text"]
        yield srv
    finally:
        srv.stop()


@pytest.mark.parametrize("name, body, status, pattern", HTTP_CASES, ids=[c[0] for c in HTTP_CASES])
def test_http_bad_input(server, name, body, status, pattern):
    import re

    if isinstance(body, bytes):
        r = httpx.post(f"{server.url}/v1/completions", content=body,
                       headers={"Content-Type": "application/json"}, timeout=120)
    else:
        r = httpx.post(f"{server.url}/v1/completions", json={"model": "m", **body}, timeout=120)
    assert r.status_code == status, r.text[:2000]
    if pattern:
        assert re.search(pattern, r.json()["error"]["message"]), r.text[:2000]
    assert server.complete(**GREEDY).json()["choices"][0]["text"] == server.expected
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200


def test_idle_and_half_sent_connections_are_closed(server):
    """Slowloris: a connection that never completes its request headers is closed (10 s)."""
    idle = socket.create_connection(("127.0.0.1", server.port))
    trickle = socket.create_connection(("127.0.0.1", server.port))
    trickle.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
    start = time.monotonic()
    for sock in (idle, trickle):
        sock.settimeout(30)
        assert sock.recv(1024) == b""  # closed by the server
    assert time.monotonic() - start < 25
    assert server.complete(**GREEDY).json()["choices"][0]["text"] == server.expected


@pytest.mark.slow
def test_a_request_that_fails_gets_an_error_and_the_rest_carry_on(fixtures):
    tokenizer = phi_jax.Tokenizer.from_pretrained(fixtures["hf"])
    poisoned = tokenizer.encode("class A")
    srv = _Server(fixtures["hf"], {"PHI_JAX_FAULTS": json.dumps({"engine_fail_prefill_of": poisoned})})
    try:
        good = srv.complete(**GREEDY)
        bad = srv.complete(prompt="class A", max_tokens=4)
        assert bad.status_code == 500 and "generation failed for this request" in bad.text
        again = srv.complete(**GREEDY)
        assert again.status_code == 200 and again.json() ["choices"][0]["text"] == \
            good.json()["choices"][0]["text"]
    finally:
        srv.stop()


@pytest.mark.slow
def test_a_dead_engine_fails_health_and_exits_the_process(fixtures):
    srv = _Server(fixtures["hf"], {"PHI_JAX_FAULTS": json.dumps({"engine_fail_at_decode": 1})})
    try:
        r = srv.complete(**GREEDY)
        assert r.status_code in (500, 503)
        srv.proc.wait(60)  # the process exits by itself
        assert srv.proc.returncode == 1
        error = srv.proc.stderr.read().strip().splitlines()[-1]
        assert error.startswith("phi-jax serve: error: the generation engine failed (InjectedFault")
    finally:
        srv.stop()


@pytest.mark.slow
def test_sigterm_stops_the_server_even_mid_request(fixtures):
    import signal
    import threading

    srv = _Server(fixtures["hf"])
    try:
        slow = threading.Thread(target=lambda: srv.complete(prompt="x", max_tokens=60, temperature=0),
                                daemon=True)
        slow.start()
        time.sleep(0.5)
        srv.proc.terminate()
        srv.proc.wait(30)  # graceful shutdown, then uvicorn re-raises SIGTERM to end the process
        assert srv.proc.returncode in (0, -signal.SIGTERM)
        assert "Finished server process" in srv.proc.stderr.read()
    finally:
        srv.stop()
