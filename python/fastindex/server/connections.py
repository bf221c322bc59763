"""Connections: slow or idle clients are timed out and their number is capped, so that
holding sockets open cannot lock other clients out.

uvicorn times out only a connection that is idle after a response (`timeout_keep_alive`); a
client that opens a socket and sends nothing, or sends its headers one byte a second
(slow-loris), is kept for ever. `guarded_protocol` wraps uvicorn's HTTP protocol with:

- a request deadline: a request (its headers and body) must arrive whole within
  `request_timeout` seconds of the connection opening, or of its first byte on a kept-alive
  connection; else a 408 and the connection is closed;
- a header size cap: more than `max_header_bytes` before the headers end is a 431;
- a write stall limit: a client that stops reading an answer (the socket's send buffer stays
  full) for `write_timeout` seconds is disconnected;
- a connection cap: at `max_connections` open sockets (HTTP and WebSocket), a new
  connection closes the one that has waited longest for a request that has not arrived (a
  slow or idle client); if every connection is busy, the new one gets a 503 and is closed.

The cap stays below the process's open-file limit, so the store and the images can always be
opened.
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
import time
from typing import Any

log = logging.getLogger("fastindex.server")

#: Seconds a request may take to arrive whole (from the connection opening, or its first byte).
REQUEST_TIMEOUT = 10.0
#: Seconds a kept-alive connection may stay idle between requests (uvicorn closes it).
KEEP_ALIVE_TIMEOUT = 5
#: Seconds a client may leave an answer unread (the send buffer full) before it is dropped.
WRITE_TIMEOUT = 30.0
#: Bytes of request line and headers; more is a 431.
MAX_HEADER_BYTES = 64 << 10
#: Open connections (HTTP and WebSocket) at most; see `connection_cap`.
MAX_CONNECTIONS = 1000
#: Pending connections the kernel queues while the server is busy (the `listen` backlog).
BACKLOG = 1024
#: Open files kept free for the store, the images and the rest of the process.
FD_RESERVE = 256


def connection_cap(wanted: int = MAX_CONNECTIONS) -> int:
    """`wanted`, lowered to stay `FD_RESERVE` below this process's open-file limit."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return wanted
    return max(16, min(wanted, soft - FD_RESERVE))


def _answer(status: int, reason: str, kind: str, message: str) -> bytes:
    body = json.dumps({"error": kind, "message": message}).encode()
    return (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    ).encode() + body


def guarded_protocol(
    base: type[asyncio.Protocol],
    *,
    request_timeout: float = REQUEST_TIMEOUT,
    max_header_bytes: int = MAX_HEADER_BYTES,
    max_connections: int = MAX_CONNECTIONS,
    write_timeout: float = WRITE_TIMEOUT,
) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol class `base` (httptools or h11) with the guards above."""

    class Guarded(base):  # type: ignore[valid-type, misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._deadline: asyncio.TimerHandle | None = None
            self._stall: asyncio.TimerHandle | None = None
            self._header_bytes = 0
            self._refused = False
            #: When this connection began to wait for a request (None: one is being served).
            self.waiting_since: float | None = time.monotonic()

        # -- the request deadline -------------------------------------------------------------
        def _arm(self) -> None:
            if self._deadline is None:
                self._deadline = self.loop.call_later(request_timeout, self._timed_out)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _in_flight(self) -> bool:
            cycle = self.cycle
            return cycle is not None and not cycle.response_complete

        def _timed_out(self) -> None:
            self._deadline = None
            if self.transport is None or self.transport.is_closing():
                return
            if not self._in_flight():  # headers never ended: say why before closing
                self.transport.write(
                    _answer(
                        408, "Request Timeout", "RequestTimeout", "request not received in time"
                    )
                )
            self.transport.close()

        # -- the protocol's events ------------------------------------------------------------
        def connection_made(self, transport: asyncio.Transport) -> None:
            super().connection_made(transport)
            if len(self.connections) > max_connections and not self._make_room():
                log.warning("connection refused: %d connections open", len(self.connections))
                self._refuse_all()
                return
            self._arm()

        def _refuse_all(self) -> None:
            """Answer 503 and end the connection, reading (and dropping) what the client sends
            for a moment first: closing with unread data would reset the connection, and the
            client might lose the answer."""
            self.waiting_since = None
            self._refused = True
            self.transport.write(
                _answer(503, "Service Unavailable", "Busy", "too many connections; retry")
            )
            if self.transport.can_write_eof():
                self.transport.write_eof()
            self.loop.call_later(1.0, self.transport.close)

        def _make_room(self) -> bool:
            """Close the connection that has waited longest for a request; False if none."""
            idle = [
                c
                for c in self.connections
                if c is not self and getattr(c, "waiting_since", None) is not None
            ]
            if not idle:
                return False
            oldest = min(idle, key=lambda c: c.waiting_since)
            oldest.waiting_since = None
            oldest.transport.close()
            return True

        def data_received(self, data: bytes) -> None:
            if self._refused:
                return
            if not self._in_flight():
                self._header_bytes += len(data)
                self._arm()  # a new request began: it has `request_timeout` to arrive
            super().data_received(data)
            if self.transport.get_protocol() is not self:  # upgraded to a WebSocket
                self._disarm()
                self.waiting_since = None
                return
            if self._in_flight():
                self._header_bytes = 0
                self.waiting_since = None
                if not self.cycle.more_body:  # the whole request is here
                    self._disarm()
            elif self._header_bytes > max_header_bytes and not self.transport.is_closing():
                self.transport.write(
                    _answer(
                        431,
                        "Request Header Fields Too Large",
                        "HeadersTooLarge",
                        f"request headers over {max_header_bytes} bytes",
                    )
                )
                self.transport.close()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self.waiting_since = time.monotonic()  # idle now (uvicorn's keep-alive timer runs)

        def pause_writing(self) -> None:
            super().pause_writing()
            if self._stall is None:
                self._stall = self.loop.call_later(write_timeout, self._stalled)

        def resume_writing(self) -> None:
            super().resume_writing()
            if self._stall is not None:
                self._stall.cancel()
                self._stall = None

        def _stalled(self) -> None:
            self._stall = None
            if self.transport is not None and not self.transport.is_closing():
                log.info("dropping a client that stopped reading for %s s", write_timeout)
                self.transport.abort()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            if self._stall is not None:
                self._stall.cancel()
                self._stall = None
            self.waiting_since = None
            super().connection_lost(exc)

        def send_400_response(self, msg: str) -> None:  # a JSON answer, as every other error
            self.transport.write(_answer(400, "Bad Request", "BadRequest", msg))
            self.transport.close()

    Guarded.__name__ = Guarded.__qualname__ = f"Guarded{base.__name__}"
    return Guarded
