"""What a `POST /api/datasets` may index: folders (and COCO files) inside the roots the
operator allowed (`fastindex serve --allow-root DIR`, the folder of `fastindex index DIR
--serve`, or `create_app(allowed_roots=...)`). With none allowed, nothing is.

An allowed root may be a bucket prefix (`s3://bucket/photos/`): then prefixes and objects
below it may be indexed. Object keys have no links and `..` means nothing to a store, so a
URI is compared as text, segment by segment, and one with a `.` or `..` segment is refused
(it would name another key than it seems to)."""

from __future__ import annotations

import os
from collections.abc import Iterable

from ..errors import InvalidArgumentError
from ..objects import is_object_uri
from .errors import ForbiddenError


def real_roots(roots: Iterable[str | os.PathLike[str]] | None) -> tuple[str, ...]:
    """The allowed roots as real paths (links resolved), so a check compares like with like;
    bucket prefixes as URIs with one trailing `/`."""
    return tuple(
        _object_root(os.fspath(r))
        if is_object_uri(os.fspath(r))
        else os.path.realpath(os.fspath(r))
        for r in roots or ()
    )


def _object_root(uri: str) -> str:
    return uri.rstrip("/") + "/"


def is_inside(path: str, root: str) -> bool:
    """`path` is `root` or below it (both real paths, or both URIs)."""
    if is_object_uri(root):
        return is_object_uri(path) and _object_root(path).startswith(root)
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _check_uri(what: str, uri: str) -> str:
    parts = uri.partition("://")[2].split("/")
    if not parts[0] or any(p in (".", "..") for p in parts):
        raise InvalidArgumentError(f"{what}: {uri} is not a plain bucket URI")
    return uri


def allowed_path(what: str, path: str, roots: tuple[str, ...]) -> str:
    """The real path of `path` (`..` and links resolved), if it lies inside an allowed root.

    Checked before anything else, so a request learns nothing about files outside (not
    even whether they exist).

    Raises:
        ForbiddenError: no root is allowed, or `path` is outside all of them.
        InvalidArgumentError: `path` contains NUL.
    """
    if not roots:
        raise ForbiddenError(
            f"{what}: this server indexes no folder on request "
            "(start it with --allow-root DIR to allow one)"
        )
    if "\0" in path:
        raise InvalidArgumentError(f"{what}: a path may not contain NUL")
    real = _check_uri(what, path) if is_object_uri(path) else os.path.realpath(path)
    if not any(is_inside(real, root) for root in roots):
        raise ForbiddenError(f"{what}: {path} is outside the folders this server may index")
    return real
