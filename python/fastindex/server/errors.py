"""The one place where exceptions become HTTP answers.

Every error answer is JSON: `{"error": <kind>, "message": <text>}` (validation errors add the
field-level `detail` FastAPI gives). Tracebacks never leave the server.

JSON is written with `ensure_ascii`: a path that is not valid UTF-8 reaches Python as a `str`
with lone surrogates (`os.fsdecode`), and goes out as `\\udcXX` escapes, which `json.loads`
turns back into the same `str` (so `os.fsencode` gives the file's bytes back).
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request, WebSocket
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError, WebSocketRequestValidationError
from fastapi.responses import JSONResponse as _JSONResponse
from starlette.exceptions import HTTPException
from starlette.types import Receive, Scope, Send

from ..errors import (
    CancelledError,
    CocoError,
    DatasetExistsError,
    DatasetNotFoundError,
    EmbeddingError,
    FastIndexError,
    ImageError,
    InvalidArgumentError,
    NoEmbeddingsError,
    ObjectStoreError,
)

log = logging.getLogger("fastindex.server")


class NotFoundError(FastIndexError, LookupError):
    """No such sample (in that dataset), or its file is gone from the disk."""


class NotReadyError(FastIndexError):
    """The request needs work that has not happened yet: a sample not indexed, no embeddings."""


class ForbiddenError(FastIndexError, PermissionError):
    """The request reaches outside what the operator allowed: a folder outside the allowed
    roots, or a sample whose file now resolves outside its dataset's folder."""


class JSONResponse(_JSONResponse):
    """JSON in ASCII: lone surrogates (names that are not UTF-8) survive as escapes."""

    def render(self, content: Any) -> bytes:
        return json.dumps(
            content, ensure_ascii=True, allow_nan=False, indent=None, separators=(",", ":")
        ).encode("ascii")


#: Most specific first: the first class an exception is an instance of gives the status.
STATUS_OF: tuple[tuple[type[FastIndexError], int], ...] = (
    (CocoError, 422),
    (InvalidArgumentError, 400),  # PathNotFoundError too: a path in the body, not the URL
    (DatasetNotFoundError, 404),
    (NotFoundError, 404),
    (ForbiddenError, 403),
    (DatasetExistsError, 409),
    (NotReadyError, 409),
    (NoEmbeddingsError, 409),
    (EmbeddingError, 409),
    (CancelledError, 409),
    (ImageError, 422),
    # An object store behind the server that cannot be used (unreachable, credentials): the
    # server works, what it reads from does not.
    (ObjectStoreError, 502),
)


def status_of(exc: FastIndexError) -> int:
    """The HTTP status for a fastindex exception (500 for store failures and the unknown)."""
    for cls, code in STATUS_OF:
        if isinstance(exc, cls):
            return code
    return 500


def error_response(status: int, kind: str, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": kind, "message": message, **extra}, status_code=status)


async def refuse_websocket(
    scope: Scope,
    receive: Receive,
    send: Send,
    status: int,
    kind: str,
    message: str,
    *,
    close_code: int = 1008,
) -> None:
    """Refuse a WebSocket before accepting it: an HTTP `status` with the JSON error as the
    handshake's answer where the server can send one, else a close with `close_code` (which
    the client sees as a refused handshake)."""
    if "websocket.http.response" in scope.get("extensions", {}):
        await error_response(status, kind, message)(scope, receive, send)
    else:
        await send({"type": "websocket.close", "code": close_code, "reason": message[:120]})


def _validation_message(exc: RequestValidationError | WebSocketRequestValidationError) -> str:
    parts = []
    for e in exc.errors():
        loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body") or "request"
        parts.append(f"{loc}: {e.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


def install_error_handlers(app: FastAPI) -> None:
    """Map fastindex exceptions, validation errors and HTTP errors to JSON answers."""

    async def on_fastindex(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, FastIndexError)
        code = status_of(exc)
        if code >= 500:
            log.error("%s: %s", type(exc).__name__, exc)
        return error_response(code, type(exc).__name__, str(exc))

    async def on_validation(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        detail = jsonable_encoder(list(exc.errors()), exclude={"ctx", "input", "url"})
        return error_response(422, "ValidationError", _validation_message(exc), detail=detail)

    async def on_ws_validation(ws: WebSocket, exc: Exception) -> None:
        assert isinstance(exc, WebSocketRequestValidationError)
        await refuse_websocket(
            ws.scope, ws.receive, ws.send, 422, "ValidationError", _validation_message(exc)
        )

    async def on_http(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, HTTPException)
        resp = error_response(exc.status_code, "HTTPError", str(exc.detail))
        if exc.headers:
            resp.headers.update(exc.headers)
        return resp

    async def on_overflow(_: Request, exc: Exception) -> JSONResponse:
        # A number in the request that no id or offset can be (SQLite integers are 64-bit).
        return error_response(422, "ValidationError", f"number out of range: {exc}")

    async def on_unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.error("unexpected %s", type(exc).__name__, exc_info=exc)
        return error_response(500, "InternalError", f"internal error ({type(exc).__name__})")

    app.add_exception_handler(FastIndexError, on_fastindex)
    app.add_exception_handler(OverflowError, on_overflow)
    app.add_exception_handler(Exception, on_unexpected)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(WebSocketRequestValidationError, on_ws_validation)
    app.add_exception_handler(HTTPException, on_http)
