"""fastindex: make a folder of a million images browsable, searchable and embedded in seconds.

```python
import fastindex
ds = fastindex.Dataset.load_or_create("holiday", db="fastindex.db")
job = ds.add_images_from_path("photos/")   # returns once every file has a `pending` row
job.wait()
ds.samples(status="failed")
```
"""

from __future__ import annotations

import os

from . import _core
from ._core import IMAGE_EXTENSIONS, SCHEMA_VERSION, STATUSES
from .dataset import DEFAULT_DB, DEFAULT_PAGE, Dataset, list_datasets
from .errors import (
    CancelledError,
    CocoError,
    DatasetExistsError,
    DatasetNotFoundError,
    EmbeddingError,
    FastIndexError,
    ImageError,
    InvalidArgumentError,
    LeaseLostError,
    NoEmbeddingsError,
    ObjectStoreError,
    PathNotFoundError,
    SchemaVersionError,
    StoreError,
)
from .jobs import Job
from .sample import Annotation, Sample
from .watch import Watcher

__version__: str = _core.__version__


def image_size(path: str | bytes | os.PathLike[str] | os.PathLike[bytes]) -> tuple[int, int]:
    """`(width, height)` read from the file's header, without decoding pixels.

    Equals `PIL.Image.open(path).size` for every JPEG, PNG, GIF, BMP, WebP and TIFF file
    Pillow opens. Blocks on the read; releases the GIL.

    Raises:
        ImageError: the file is not a readable image of a supported format.
    """
    return _core.image_size(os.fspath(path))


def probe_image(path: str | bytes | os.PathLike[str] | os.PathLike[bytes]) -> dict[str, object]:
    """`{"width", "height", "format", "orientation"}` from the header (see `image_size`)."""
    return _core.probe_image(os.fspath(path))


def __getattr__(name: str) -> object:
    # The embedding model pulls in torch: import it only when asked for.
    if name == "EmbeddingModel":
        from .embed import EmbeddingModel

        return EmbeddingModel
    if name == "RayEngine":  # imports no ray until a run starts
        from .ray_engine import RayEngine

        return RayEngine
    raise AttributeError(f"module 'fastindex' has no attribute {name!r}")


__all__ = [
    "DEFAULT_DB",
    "DEFAULT_PAGE",
    "IMAGE_EXTENSIONS",
    "SCHEMA_VERSION",
    "STATUSES",
    "Annotation",
    "CancelledError",
    "CocoError",
    "Dataset",
    "DatasetExistsError",
    "DatasetNotFoundError",
    "EmbeddingError",
    "EmbeddingModel",
    "FastIndexError",
    "ImageError",
    "InvalidArgumentError",
    "Job",
    "LeaseLostError",
    "NoEmbeddingsError",
    "ObjectStoreError",
    "PathNotFoundError",
    "RayEngine",
    "Sample",
    "SchemaVersionError",
    "StoreError",
    "Watcher",
    "image_size",
    "list_datasets",
    "probe_image",
]
