"""Object-store roots (`s3://bucket/prefix/`, and the other schemes the Rust reader knows):
how a sample's location is told from a file's, and one place that names them."""

from __future__ import annotations

import os

#: URI schemes of object stores, as the Rust core reads them (`remote::scheme_of`, any
#: case): must match it (tests/test_s3_app.py checks a root of each).
OBJECT_SCHEMES = ("s3", "s3a", "gs", "gcs", "az", "azure", "abfs")


def is_object_uri(path: str | os.PathLike[str] | bytes) -> bool:
    """`path` names a bucket, a prefix or an object (`s3://bucket/key`), not a file."""
    text = os.fsdecode(path) if isinstance(path, bytes) else os.fspath(path)
    scheme, sep, _ = text.partition("://")
    return bool(sep) and scheme.lower() in OBJECT_SCHEMES


def object_uri(root: str, path: str) -> str:
    """The URI of the object at `path` (relative to its root, `/`-separated) under `root`."""
    return root + path if root.endswith("/") else f"{root}/{path}"


def bucket_of(uri: str) -> str:
    """`s3://bucket/a/b` -> `s3://bucket` (what one-line errors name)."""
    scheme, _, rest = uri.partition("://")
    return f"{scheme}://{rest.split('/', 1)[0]}"
