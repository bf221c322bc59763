"""The one place where exceptions become HTTP answers.

Every error answer is JSON: `{"error": <kind>, "message": <text>}` (validation errors add the
field-level `detail` FastAPI gives). Tracebacks never leave the server.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

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
)

log = logging.getLogger("fastindex.server")


class NotFoundError(FastIndexError, LookupError):
    """No such sample (in that dataset), or its file is gone from the disk."""


class NotReadyError(FastIndexError):
    """The request needs work that has not happened yet: a sample not indexed, no embeddings."""


#: Most specific first: the first class an exception is an instance of gives the status.
STATUS_OF: tuple[tuple[type[FastIndexError], int], ...] = (
    (CocoError, 422),
    (InvalidArgumentError, 400),  # PathNotFoundError too: a path in the body, not the URL
    (DatasetNotFoundError, 404),
    (NotFoundError, 404),
    (DatasetExistsError, 409),
    (NotReadyError, 409),
    (NoEmbeddingsError, 409),
    (EmbeddingError, 409),
    (CancelledError, 409),
    (ImageError, 422),
)


def status_of(exc: FastIndexError) -> int:
    """The HTTP status for a fastindex exception (500 for store failures and the unknown)."""
    for cls, code in STATUS_OF:
        if isinstance(exc, cls):
            return code
    return 500


def error_response(status: int, kind: str, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": kind, "message": message, **extra}, status_code=status)


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
        errors = list(exc.errors())
        parts = []
        for e in errors:
            loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body") or "request"
            parts.append(f"{loc}: {e.get('msg', 'invalid')}")
        detail = jsonable_encoder(errors, exclude={"ctx", "input", "url"})
        return error_response(
            422, "ValidationError", "; ".join(parts) or "invalid request", detail=detail
        )

    async def on_http(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, HTTPException)
        resp = error_response(exc.status_code, "HTTPError", str(exc.detail))
        if exc.headers:
            resp.headers.update(exc.headers)
        return resp

    app.add_exception_handler(FastIndexError, on_fastindex)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(HTTPException, on_http)
