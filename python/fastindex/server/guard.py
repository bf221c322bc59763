"""Who may talk to the server: the `Host` a request names (against DNS rebinding), the
`Origin` of a WebSocket or of a request that changes something (against other web pages),
and static files that only answer for the page's own folder."""

from __future__ import annotations

from collections.abc import Sequence
from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.responses import Response
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send

from .errors import error_response, refuse_websocket

#: Methods a page elsewhere may send without the browser asking first; they change nothing.
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def _name_of(host: str) -> str:
    """The host name of a `Host` header value, without its port (`[::1]:80` -> `[::1]`)."""
    host = host.strip().lower()
    if host.startswith("["):
        end = host.find("]")
        return host[: end + 1] if end > 0 else host
    if host.count(":") == 1:
        return host.split(":", 1)[0]
    return host


def host_allowed(host: str | None, hosts: Sequence[str]) -> bool:
    """`host` (a `Host` header value or a bare name) is one of `hosts` (`*` allows any,
    `*.example.org` any name below it)."""
    if "*" in hosts:
        return True
    if not host:
        return False
    name = _name_of(host)
    bare = name.strip("[]")
    for allowed in hosts:
        allowed = allowed.lower()
        if allowed in (name, bare, f"[{bare}]"):
            return True
        if allowed.startswith("*.") and name.endswith(allowed[1:]):
            return True
    return False


def origin_allowed(origin: str | None, hosts: Sequence[str]) -> bool:
    """A request without `Origin` comes from no web page (curl, scripts) and may pass; one with
    an `Origin` must come from a page this server would serve (`null` never does)."""
    if origin is None or "*" in hosts:
        return True
    try:
        host = urlsplit(origin).hostname
    except ValueError:
        return False
    return host is not None and host_allowed(host, hosts)


class LocalOnly:
    """Refuses a request whose `Host` is not an allowed name (400), and a WebSocket or a
    request that changes something (POST...) sent by a page of another origin (403)."""

    def __init__(self, app: ASGIApp, allowed_hosts: Sequence[str]) -> None:
        self.app = app
        self.hosts = list(allowed_hosts)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        if not host_allowed(headers.get("host"), self.hosts):
            await self._refuse(scope, receive, send, 400, "HostNotAllowed", "host not allowed")
            return
        changes = kind == "websocket" or scope["method"] not in SAFE_METHODS
        if changes and not origin_allowed(headers.get("origin"), self.hosts):
            await self._refuse(scope, receive, send, 403, "OriginNotAllowed", "origin not allowed")
            return
        await self.app(scope, receive, send)

    @staticmethod
    async def _refuse(
        scope: Scope, receive: Receive, send: Send, status: int, kind: str, message: str
    ) -> None:
        if scope["type"] == "websocket":
            await refuse_websocket(scope, receive, send, status, kind, message)
            return
        await error_response(status, kind, message)(scope, receive, send)


class SafeStaticFiles(StaticFiles):
    """`StaticFiles` whose odd paths (a NUL, a name too long) are a 404, not a 500."""

    async def get_response(self, path: str, scope: Scope) -> Response:
        if "\0" in path or "\\" in path:
            raise HTTPException(status_code=404)
        try:
            return await super().get_response(path, scope)
        except (ValueError, OSError) as e:
            raise HTTPException(status_code=404) from e
