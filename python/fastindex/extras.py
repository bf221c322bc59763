"""The optional parts of fastindex and the pip extra that installs each.

A bare `pip install fastindex` indexes (phases 1 and 2) with numpy, Pillow and rich only.
The web server needs `fastindex[server]`, phase 3 (embeddings, search) `fastindex[embed]`, and
phase 3 on a Ray cluster `fastindex[ray]`.
A feature whose extra is missing raises `MissingExtraError`, whose one-line message says what to
install; the CLI prints it and exits 2.
"""

from __future__ import annotations

import importlib.util

from .errors import FastIndexError

#: Extra -> the modules it brings that fastindex imports (found, not imported, by `missing`).
EXTRAS: dict[str, tuple[str, ...]] = {
    "server": ("fastapi", "uvicorn"),
    "embed": ("torch", "open_clip"),
    "ray": ("ray",),
}

#: What each extra is for, as the start of the message.
_FEATURES = {
    "server": "the web server",
    "embed": "embeddings and search",
    "ray": "phase 3 on a Ray cluster",
}


class MissingExtraError(FastIndexError, ImportError):
    """A feature needs an optional part of fastindex that is not installed; the message names
    the extra: `... pip install 'fastindex[server]'`."""


def missing(extra: str) -> list[str]:
    """The modules of `extra` that are not installed (none: the extra is there). Looks them
    up without importing them (torch takes seconds to import)."""
    return [m for m in EXTRAS[extra] if importlib.util.find_spec(m) is None]


def require(extra: str) -> None:
    """Raise `MissingExtraError` naming `extra` when one of its modules is not installed."""
    absent = missing(extra)
    if absent:
        raise MissingExtraError(
            f"{_FEATURES[extra]} needs the {extra} extra ({', '.join(absent)} not installed): "
            f"pip install 'fastindex[{extra}]'",
            name=absent[0],
        )
