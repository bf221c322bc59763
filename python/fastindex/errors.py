"""The exceptions fastindex raises. The Rust core maps its errors onto these by name."""

from __future__ import annotations


class FastIndexError(Exception):
    """Base class of every fastindex error."""


class InvalidArgumentError(FastIndexError, ValueError):
    """An argument is unusable (a file where a folder is needed, a bad option value...).

    Raised before anything is written to the store.
    """


class PathNotFoundError(InvalidArgumentError, FileNotFoundError):
    """A file or folder named by the caller does not exist."""


class DatasetNotFoundError(FastIndexError, LookupError):
    """No dataset of that name (or id) in the store."""


class DatasetExistsError(FastIndexError):
    """`Dataset.create` was given a name that is taken."""


class ImageError(FastIndexError):
    """A file is not a readable image (corrupt, truncated or of an unsupported format)."""


class CocoError(InvalidArgumentError):
    """A COCO annotations file is malformed; nothing was written."""


class StoreError(FastIndexError):
    """The store cannot be opened or written (not a fastindex database, a folder, damaged,
    read-only, locked, disk full). The message names the file."""


class LeaseLostError(StoreError):
    """Another process took over this phase's lease; nothing of this batch was written."""


class SchemaVersionError(StoreError):
    """The store was written by a fastindex with another schema version."""


class ObjectStoreError(FastIndexError, OSError):
    """An object store (`s3://`, `gs://`, `az://`) cannot be used: the bucket does not exist,
    the credentials are refused, the endpoint cannot be reached, or (from `read_object`) the
    object is not there. The one-line message names the bucket (or the object) and the
    status, e.g. `s3://photos: credentials refused (403 InvalidAccessKeyId): ...`.

    Raised before anything is written when a bucket is added; raised by phase 2 when the
    store becomes unusable part way (its rows stay `pending` for the next run).
    """


class CancelledError(FastIndexError):
    """The work was cancelled."""


class EmbeddingError(FastIndexError):
    """Phase 3 cannot run: the model or its weights cannot be loaded."""


class NoEmbeddingsError(FastIndexError, LookupError):
    """A search needs embeddings that are not there (yet): the dataset has no embedding
    model, nothing was embedded with that model, or the sample is not `ready`."""


__all__ = [
    "CancelledError",
    "CocoError",
    "DatasetExistsError",
    "DatasetNotFoundError",
    "EmbeddingError",
    "FastIndexError",
    "ImageError",
    "InvalidArgumentError",
    "LeaseLostError",
    "NoEmbeddingsError",
    "ObjectStoreError",
    "PathNotFoundError",
    "SchemaVersionError",
    "StoreError",
]
