"""`phi-jax serve` as users start it: the argparse wiring, and a real server subprocess on loopback."""

import jax
import pytest

import phi_jax
from phi_jax import cli
from phi_jax.cli import main as cli_main
from phi_jax.config import preset
from phi_jax.inference.decode import generate
from phi_jax.model import init_params
from phi_jax.tokenizer import train_bpe

from served import served


def test_serve_arguments_and_model_aliases():
    parser = cli.build_parser()
    args = parser.parse_args(["serve", "--checkpoint=runs/x"])
    assert args.model == "runs/x"
    assert (args.host, args.port, args.num_slots, args.warmup) == ("127.0.0.1", 8000, 8, True)
    args = parser.parse_args(["serve", "--workdir=runs/y", "--port=9001", "--no-warmup", "--max-len=128"])
    assert (args.model, args.port, args.warmup, args.max_len) == ("runs/y", 9001, False, 128)
    assert parser.parse_args(["serve", "--hf=d"]).model == parser.parse_args(["serve", "--model=d"]).model


@pytest.mark.slow
def test_serve_subprocess_from_a_training_workdir(tmp_path):
    hf_dir, workdir = tmp_path / "hf", tmp_path / "run"
    tokenizer = train_bpe(["def add(a, b):\n    return a + b\n" * 20, "class A:\n    pass\n" * 20],
                          vocab_size=300)
    config = preset("test", vocab_size=tokenizer.vocab_size, eos_token_id=tokenizer.eos_id)
    phi_jax.save_pretrained(hf_dir, config, init_params(config, jax.random.key(3)))
    tokenizer.save(hf_dir)
    assert cli_main(["convert", str(hf_dir), str(workdir)]) == 0

    with served(f"--checkpoint={workdir}", "--num-slots=2", "--max-len=64") as (proc, client):
        r = client.completions.create(model="run", prompt="def add(", max_tokens=10, temperature=0)
        model, variables = phi_jax.from_pretrained(hf_dir)
        want = generate(model, variables, [tokenizer.encode("def add(")], max_new_tokens=10,
                        stop_tokens=[tokenizer.eos_id])[0]
        assert r.choices[0].text == tokenizer.decode(want)
    assert proc.returncode is not None
