"""What a `POST /api/datasets` may index: folders (and COCO files) inside the roots the
operator allowed (`fastindex serve --allow-root DIR`, the folder of `fastindex index DIR
--serve`, or `create_app(allowed_roots=...)`). With none allowed, nothing is."""

from __future__ import annotations

import os
from collections.abc import Iterable

from ..errors import InvalidArgumentError
from .errors import ForbiddenError


def real_roots(roots: Iterable[str | os.PathLike[str]] | None) -> tuple[str, ...]:
    """The allowed roots as real paths (links resolved), so a check compares like with like."""
    return tuple(os.path.realpath(os.fspath(r)) for r in roots or ())


def is_inside(path: str, root: str) -> bool:
    """`path` is `root` or below it (both real paths)."""
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


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
    real = os.path.realpath(path)
    if not any(is_inside(real, root) for root in roots):
        raise ForbiddenError(f"{what}: {path} is outside the folders this server may index")
    return real
