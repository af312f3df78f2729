"""uvicorn's HTTP/1.1 protocol with a deadline for reading a request's headers.

uvicorn times out idle keep-alive connections only *after* a response; a connection that opens
and sends nothing, or trickles a request's headers a byte at a time (slowloris), is kept forever,
and enough of them exhaust `--max-connections`. Here a connection must deliver complete request
headers within `header_timeout` seconds of opening (or of its previous response), or it is
closed. Bodies have their own deadline in the app (`ServerConfig.body_timeout_s`).
"""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.h11_impl import H11Protocol

HEADER_TIMEOUT_S = 10.0


class DeadlineH11Protocol(H11Protocol):
    """H11Protocol that closes connections which do not send request headers in time."""

    header_timeout = HEADER_TIMEOUT_S

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_deadline: asyncio.TimerHandle | None = None
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._waiting_for_request():
            self._arm()
        else:
            self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _waiting_for_request(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def _arm(self) -> None:
        if self._header_deadline is None and not self.transport.is_closing():
            self._header_deadline = self.loop.call_later(self.header_timeout, self._expire)

    def _disarm(self) -> None:
        if getattr(self, "_header_deadline", None) is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _expire(self) -> None:
        self._header_deadline = None
        if self._waiting_for_request() and not self.transport.is_closing():
            self.transport.close()
