"""Reading image files, telling JPEGs by their magic, and the one-line reasons a file fails."""

from __future__ import annotations

import os

_JPEG_MAGIC = b"\xff\xd8\xff"


class _DecodeError(Exception):
    """An image that cannot be decoded: the message becomes the sample's error."""


def _reason(e: BaseException) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return f"cannot decode image: {msg}"


def _read(path: str) -> bytearray:
    # A bytearray: torch can wrap it without a copy (and without a read-only warning).
    with open(path, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        data = bytearray(size)
        n = f.readinto(data)
        if n != size:
            del data[n:]
        return data


def _try_read(path: str) -> tuple[bytearray | None, str | None]:
    try:
        return _read(path), None
    except OSError as e:
        return None, f"cannot read file: {e.strerror or e}"
