"""`phi-jax serve` as a real subprocess for tests: started on a free loopback port, waited for until
/health answers, and an OpenAI client pointed at it; terminated on exit."""

import contextlib
import os
import socket
import subprocess
import sys
import time

import httpx
import openai

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@contextlib.contextmanager
def served(*flags: str, name: str = "run", timeout: float = 300):
    """Yields (process, OpenAI client) for `phi-jax serve FLAGS --served-model-name=name`."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "phi_jax.cli", "serve", *flags, f"--port={port}", "--no-warmup",
         f"--served-model-name={name}"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + timeout
        while True:
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            assert time.monotonic() < deadline, f"the server did not come up in {timeout:.0f} s"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        yield proc, openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused",
                                  max_retries=0, timeout=120)
    finally:
        proc.terminate()
        proc.wait(60)
