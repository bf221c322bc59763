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


#: Object reads the embedder keeps in flight at once (each a whole object, many a batch).
OBJECT_READS_IN_FLIGHT = 64


def _try_read_objects(uris: list[str]) -> list[tuple[bytes | None, str | None]]:
    """Whole objects, many requests in flight (Rust, the GIL released); per URI the bytes
    or why not. Blocks.

    Raises:
        ObjectStoreError: the store itself cannot be used (credentials, no such bucket, no
            network): the phase stops with it instead of failing every row.
    """
    from .. import _core
    from ..errors import ObjectStoreError

    out: list[tuple[bytes | None, str | None]] = []
    for got in _core.read_objects(uris, max_in_flight=OBJECT_READS_IN_FLIGHT):
        if isinstance(got, str):
            if got.startswith(_STORE_WIDE):
                # Not this object's fault: failing every row for a network outage would lose
                # the work; the phase stops, its rows go back to `indexed` for the next run.
                raise ObjectStoreError(got)
            out.append((None, f"cannot read object: {got}"))
        else:
            out.append((got, None))
    return out


#: How the reader's one-line reasons start when the store as a whole cannot be used (must
#: match `remote::failure::Failure::headline` for `Kind::Unreachable` and `Credentials`).
_STORE_WIDE = ("cannot reach the object store", "credentials refused")
