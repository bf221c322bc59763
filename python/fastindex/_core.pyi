"""The Rust core. Private: use `fastindex` instead.

Every call releases the GIL while it works. Calls on one `Store` take turns (one SQLite
connection each); open one `Store` per thread that writes.
"""

from os import PathLike
from pathlib import Path
from typing import Any, Final, final

__all__ = [
    "IMAGE_EXTENSIONS",
    "SCHEMA_VERSION",
    "STATUSES",
    "StopFlag",
    "Store",
    "__version__",
    "image_size",
    "probe_bytes",
    "probe_image",
]
__version__: Final[str]
SCHEMA_VERSION: Final[int]
STATUSES: Final[list[str]]
IMAGE_EXTENSIONS: Final[list[str]]

def image_size(path: str | bytes | PathLike[str] | PathLike[bytes]) -> tuple[int, int]:
    """`(width, height)` from the header. Raises `ImageError`."""

def probe_image(path: str | bytes | PathLike[str] | PathLike[bytes]) -> dict[str, Any]:
    """`{"width", "height", "format", "orientation"}` from the header. Raises `ImageError`."""

def probe_bytes(data: bytes) -> dict[str, Any]:
    """The same for an image in memory. Raises `ImageError`."""

@final
class StopFlag:
    """Set it to cancel a long call that was given it; `done` counts rows processed."""

    def __init__(self) -> None: ...
    def set(self) -> None: ...
    def is_set(self) -> bool: ...
    @property
    def done(self) -> int: ...

@final
class Store:
    """One connection to a store (created on first open; the schema version is checked).

    Raises:
        StoreError: not a fastindex store, or SQLite failed.
        SchemaVersionError: written by another schema version.
    """

    @property
    def path(self) -> str: ...
    def __new__(cls, path: str) -> Store: ...
    def create_dataset(self, name: str) -> int: ...
    def delete_dataset(self, dataset_id: int) -> None: ...
    def find_dataset(self, name: str) -> tuple[int, str, float, str | None] | None: ...
    def dataset(self, dataset_id: int) -> tuple[int, str, float, str | None] | None: ...
    def list_datasets(self) -> list[tuple[int, str, float, str | None]]: ...
    def scan(
        self,
        dataset_id: int,
        root: str | bytes | PathLike[str] | PathLike[bytes],
        *,
        include_hidden: bool = False,
        follow_links: bool = False,
        stop: StopFlag | None = None,
    ) -> dict[str, Any]:
        """Phase 1: walk `root`, insert a `pending` row per new image file; blocks until
        committed. Names are taken byte for byte (a `str` root is os.fsencode'd). What the
        walk cannot take (a broken link, a link loop, an unreadable folder) becomes a
        `failed` row with its reason. Returns `{"job_id", "found", "added", "existing",
        "errors"}` (the counts include those rows)."""

    def ingest_coco(
        self,
        dataset_id: int,
        annotations_json: str,
        images_root: str,
        *,
        stop: StopFlag | None = None,
    ) -> dict[str, Any]:
        """Parse, check and ingest a COCO file; headers are read in the same pass. Returns
        `{"job_id", "images", "added", "existing", "annotations", "categories", "missing",
        "annotations_skipped"}` (boxes of missing images, not stored).
        Raises `CocoError` before writing anything when the file is malformed."""

    def probe_pending(
        self,
        dataset_id: int,
        *,
        stop: StopFlag | None = None,
        lease: tuple[str, float] | None = None,
    ) -> int:
        """Phase 2 until no `pending` row is left; returns the rows probed. Raises
        `CancelledError` when `stop` is set, `KeyboardInterrupt` on a signal."""

    def progress(self, dataset_id: int, job_id: int | None = None) -> dict[str, Any]: ...
    def samples(
        self,
        dataset_id: int,
        *,
        status: str | None = None,
        offset: int = 0,
        limit: int = ...,
        after_id: int = 0,
    ) -> list[dict[str, Any]]: ...
    def samples_by_id(self, ids: list[int]) -> list[dict[str, Any]]: ...
    def annotations(
        self, dataset_id: int, sample_id: int | None = None
    ) -> list[
        tuple[
            int,
            int,
            str,
            str | None,
            tuple[float, float, float, float],
            float | None,
            bool,
            str | None,
        ]
    ]: ...
    def job(self, job_id: int) -> tuple[int, str, str, int, int, str] | None: ...
    def coco_missing(self, job_id: int) -> list[tuple[int, str]]: ...
    def set_phase_error(self, dataset_id: int, phase: str, message: str | None = None) -> None: ...
    def acquire_lease(self, dataset_id: int, phase: str, owner: str, ttl: float) -> bool: ...
    def release_lease(self, dataset_id: int, phase: str, owner: str) -> None: ...
    def register_model(self, name: str, pretrained: str, dim: int) -> int: ...
    def models(self) -> list[tuple[int, str, str, int]]: ...
    def set_embed_spec(
        self, dataset_id: int, spec: str | None, model_id: int | None = None
    ) -> None: ...
    def claim_for_embedding(
        self, dataset_id: int, limit: int, after: int = 0
    ) -> list[tuple[int, Path]]: ...
    def finish_embeddings(
        self,
        dataset_id: int,
        model_id: int,
        ids: list[int],
        vectors: bytes,
        failed: list[tuple[int, str]] = ...,
    ) -> None: ...
    def release_claims(self, dataset_id: int, ids: list[int] | None = None) -> int: ...
    def load_embeddings(
        self, dataset_id: int, model_id: int, after: int = 0
    ) -> tuple[int, list[int], bytes]: ...
