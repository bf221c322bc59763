"""Run the app under uvicorn: in the foreground (`fastindex serve`) or in a background thread
(`fastindex index --serve`, tests, benchmarks)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from typing import TYPE_CHECKING, Any

import uvicorn
from uvicorn.protocols.http.auto import AutoHTTPProtocol

from ..errors import InvalidArgumentError
from .app import LOCAL_HOSTS, create_app
from .connections import (
    BACKLOG,
    KEEP_ALIVE_TIMEOUT,
    MAX_CONNECTIONS,
    REQUEST_TIMEOUT,
    WRITE_TIMEOUT,
    connection_cap,
    guarded_protocol,
)

if TYPE_CHECKING:
    import os

    from fastapi import FastAPI


def _bind(host: str, port: int) -> socket.socket:
    """A listening socket; port 0 takes a free port.

    Raises:
        InvalidArgumentError: the address cannot be listened on (in use, not local...).
    """
    if not 0 <= port <= 65535:
        raise InvalidArgumentError(f"port {port}: expected 0 to 65535")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host.strip("[]"), port))
        sock.listen(BACKLOG)
        sock.set_inheritable(True)
    except OSError as e:
        sock.close()
        raise InvalidArgumentError(f"cannot listen on {host}:{port}: {e.strerror or e}") from e
    return sock


def _url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


def _allowed_hosts(host: str) -> list[str]:
    # Bound to every interface: any Host header may be right. Else the loopback names and the
    # address bound to.
    if host in ("0.0.0.0", "::", ""):
        return ["*"]
    return [*LOCAL_HOSTS, host]


class _Server(uvicorn.Server):
    """Ends the progress streams first when asked to stop, so shutdown does not wait on them."""

    def __init__(self, app: FastAPI, config: uvicorn.Config) -> None:
        super().__init__(config)
        self._hub = app.state.hub

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self._hub.close()
        await super().shutdown(sockets=sockets)


def _config(
    app: FastAPI,
    log_level: str,
    *,
    request_timeout: float,
    write_timeout: float,
    max_connections: int,
) -> uvicorn.Config:
    protocol = guarded_protocol(
        AutoHTTPProtocol,
        request_timeout=request_timeout,
        write_timeout=write_timeout,
        max_connections=connection_cap(max_connections),
    )
    return uvicorn.Config(
        app,
        http=protocol,
        log_level=log_level,
        access_log=False,
        timeout_graceful_shutdown=2,
        timeout_keep_alive=KEEP_ALIVE_TIMEOUT,
        backlog=BACKLOG,
        # A WebSocket whose peer vanished without closing is found by its unanswered ping.
        ws_ping_interval=20.0,
        ws_ping_timeout=20.0,
    )


def _serving(
    db: str | os.PathLike[str],
    host: str,
    port: int,
    log_level: str,
    app_options: dict[str, Any],
    **limits: Any,
) -> tuple[FastAPI, socket.socket, _Server]:
    """The app, its listening socket and the server that will run it (`run_server` and
    `start_server` differ only in where it runs); `limits` are `_config`'s."""
    app = create_app(db, allowed_hosts=_allowed_hosts(host), **app_options)
    sock = _bind(host, port)
    config = _config(app, log_level, **limits)
    return app, sock, _Server(app, config)


def run_server(
    db: str | os.PathLike[str],
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    log_level: str = "info",
    request_timeout: float = REQUEST_TIMEOUT,
    write_timeout: float = WRITE_TIMEOUT,
    max_connections: int = MAX_CONNECTIONS,
    **app_options: Any,
) -> None:
    """Serve a store's datasets and the web page until Ctrl-C. Blocks.

    Binds to 127.0.0.1 unless told otherwise; `app_options` go to `create_app` (among them
    `allowed_roots`, the folders a `POST /api/datasets` may index). A request must arrive
    whole within `request_timeout` seconds, a client that leaves an answer unread for
    `write_timeout` seconds is dropped, and at most `max_connections` are open at once (see
    `fastindex.server.connections`).
    """
    app, sock, server = _serving(
        db,
        host,
        port,
        log_level,
        app_options,
        request_timeout=request_timeout,
        write_timeout=write_timeout,
        max_connections=max_connections,
    )
    print(f"fastindex serving {db} at {_url(sock)}", flush=True)
    roots = app.state.allowed_roots
    if roots:
        print(f"the page may index folders under: {', '.join(roots)}", flush=True)
    else:
        print("the page may not index folders (allow some with --allow-root DIR)", flush=True)
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn re-raises the signal once it has shut down
        pass
    finally:
        app.state.fastindex.close(cancel=True)
        sock.close()


class ServerHandle:
    """A server running in a background thread. `url` is where it listens."""

    def __init__(self, app: FastAPI, server: uvicorn.Server, sock: socket.socket) -> None:
        self.app = app
        self.url = _url(sock)
        self._server = server
        self._sock = sock
        self._thread = threading.Thread(target=self._serve, name="fastindex-server", daemon=True)
        self._error: BaseException | None = None

    def _serve(self) -> None:
        try:
            self._server.run(sockets=[self._sock])
        except BaseException as e:  # reported by start()/stop()
            self._error = e

    def _start(self, timeout: float) -> None:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the server did not start: {self._error!r}")
            time.sleep(0.01)

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def stop(self, *, cancel: bool = True, timeout: float = 10.0) -> None:
        """End the streams, stop the server and wait for it; with `cancel`, also stop the
        background indexing it started (the rows stay; it resumes on the next load)."""
        self._server.should_exit = True
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        with contextlib.suppress(OSError):
            self._sock.close()
        self.app.state.fastindex.close(cancel=cancel)

    def __enter__(self) -> ServerHandle:
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<ServerHandle {self.url} {'running' if self.running else 'stopped'}>"


def start_server(
    db: str | os.PathLike[str],
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    log_level: str = "warning",
    request_timeout: float = REQUEST_TIMEOUT,
    write_timeout: float = WRITE_TIMEOUT,
    max_connections: int = MAX_CONNECTIONS,
    **app_options: Any,
) -> ServerHandle:
    """Start serving in a background thread and return once it listens.

    Port 0 takes a free port (see `.url`). Stop it with `.stop()` or a `with` block. The
    options are those of `run_server`.
    """
    app, sock, server = _serving(
        db,
        host,
        port,
        log_level,
        app_options,
        request_timeout=request_timeout,
        write_timeout=write_timeout,
        max_connections=max_connections,
    )
    handle = ServerHandle(app, server, sock)
    handle._start(timeout=30.0)
    return handle
