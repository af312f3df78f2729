"""Serve a tiny model with `phi-jax serve` and query it twice with the official `openai` client: the
two prompts share a long head (as every annotation prompt shares its rubric), so the second one
reuses the first one's KV from the server's prefix cache. Prints the answers and the hit rate.

    python examples/serve_and_query.py            # a random tiny model; well under a minute on CPU
    python examples/serve_and_query.py --model=path/to/model   # any model `phi-jax serve` loads
"""

import argparse
import socket
import subprocess
import sys
import tempfile
import time

import httpx
import openai

RUBRIC = ("Rate how useful the following code is for teaching Python, from 0 to 5. A 5 is a short, "
          "correct, documented function a student can read in one sitting; a 0 is boilerplate. ")


def tiny_model(directory: str) -> str:
    """A random tiny Llama-style model with a small BPE tokenizer, saved as an HF directory."""
    import jax

    import phi_jax
    from phi_jax.config import preset
    from phi_jax.model import init_params
    from phi_jax.tokenizer import train_bpe

    tokenizer = train_bpe([RUBRIC * 5, "def add(a, b):\n    return a + b\n" * 20], vocab_size=300)
    config = preset("test-llama", vocab_size=tokenizer.vocab_size, eos_token_id=tokenizer.eos_id)
    phi_jax.save_pretrained(directory, config, init_params(config, jax.random.key(0)))
    tokenizer.save(directory)
    return directory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", help="default: a random tiny model made here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or tiny_model(tmp)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server = subprocess.Popen([sys.executable, "-m", "phi_jax.cli", "serve", f"--model={model}",
                                   "--host=127.0.0.1", f"--port={port}", "--served-model-name=tiny",
                                   "--num-slots=2", "--max-len=256", "--prefix-cache-tokens=1024"])
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 120
            while True:  # /health answers once the model is loaded and the first programs compiled
                if server.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("the server did not start; see its log above")
                try:
                    if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.2)
            client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused")
            for document in ("def add(a, b):\n    return a + b\n", "x = 1\ny = 2\n"):
                answer = client.completions.create(model="tiny", prompt=RUBRIC + document,
                                                   max_tokens=8, temperature=0)
                print(f"{document!r} -> {answer.choices[0].text!r}")
            metrics = {line.split()[0]: float(line.split()[1])
                       for line in httpx.get(f"{base}/metrics").text.splitlines()
                       if line and not line.startswith("#")}
            print(f"prefix cache: {metrics['phi_jax_prefix_cache_hit_rate']:.0%} of prompt tokens "
                  f"reused ({metrics['phi_jax_prefill_tokens_reused_total']:.0f} reused, "
                  f"{metrics['phi_jax_prefill_tokens_computed_total']:.0f} computed)")
        finally:
            server.terminate()
            server.wait(60)


if __name__ == "__main__":
    main()
