"""uvicorn in a background thread on a loopback port: for tests, benchmarks and local teachers.

Binding the socket ourselves (port 0 = any free port) and handing it to uvicorn avoids the race of
"find a free port, then bind it", and lets the caller learn the port before the server starts.
"""

from __future__ import annotations

import socket
import threading
import time


class ServerThread:
    """`with ServerThread(app) as server: requests to server.url ...`; stops on exit.

    Args:
      app: an ASGI app (`create_app(...)`).
      host: a loopback address by default; the server is for this machine only unless told otherwise.
      port: 0 picks a free port.
      startup_timeout: seconds to wait for startup (the app's lifespan starts the engine).
    """

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, startup_timeout: float = 60.0):
        import uvicorn

        self._socket = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind((host, port))
        self.host, self.port = host, self._socket.getsockname()[1]
        self._server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on",
                                                     timeout_graceful_shutdown=5))
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._socket]},
                                        name="phi-jax-uvicorn", daemon=True)
        self._startup_timeout = startup_timeout

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self) -> "ServerThread":
        self._thread.start()
        deadline = time.monotonic() + self._startup_timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server on {self.url} did not start within "
                                   f"{self._startup_timeout} s; see the log above")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self._server.should_exit = True
        self._thread.join(timeout)
        self._socket.close()

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
