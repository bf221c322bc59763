"""The Rust core. Private: use `fastindex` instead.

Every call releases the GIL while it works. Calls on one `Store` take turns (one SQLite
connection each); open one `Store` per thread that writes.
"""

from collections.abc import Sequence
from os import PathLike
from pathlib import Path
from typing import Any, Final, final

__all__ = [
    "IMAGE_EXTENSIONS",
    "SCHEMA_VERSION",
    "STATUSES",
    "StopFlag",
    "Store",
    "Watcher",
    "__version__",
    "image_size",
    "probe_bytes",
    "probe_image",
    "read_object",
    "read_objects",
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

def read_object(uri: str, start: int | None = None, end: int | None = None) -> bytes:
    """The bytes of the object at `uri` (`s3://bucket/key`, `gs://`, `az://`), from `start`
    (default 0) to `end` (exclusive; default the end of the object).

    Blocks with the GIL released; Ctrl-C raises `KeyboardInterrupt` while the request is in
    flight. Credentials and endpoint come from the environment (`AWS_*`, `~/.aws` profiles,
    instance metadata). 5xx and throttling are retried with backoff.

    Raises:
        ObjectStoreError: the object or bucket is not there, access is denied, or the store
            cannot be reached (one line naming the object).
        InvalidArgumentError: `uri` is not an object URI.
    """

def read_objects(uris: list[str], max_in_flight: int = 64) -> list[bytes | str]:
    """Every object of `uris`, in order, with up to `max_in_flight` requests at once: its
    bytes, or the one-line reason it could not be read (`"not found (404): s3://b/k"`).

    Blocks with the GIL released; Ctrl-C raises `KeyboardInterrupt`.
    """

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
    """One connection to a store, created on first open.

    The file is recognised before anything is written to it; another application's file is
    left exactly as it was. A store of an older schema version is migrated in place.
    Concurrent first opens of one new store all succeed. Blocks on the file; releases the GIL.

    Raises:
        StoreError: a folder, not an SQLite file, another application's database, a damaged
            (truncated) store, a read-only store, or SQLite failed; one line naming the file.
        SchemaVersionError: written by a newer fastindex.
    """

    @property
    def path(self) -> str: ...
    def __new__(cls, path: str) -> Store: ...
    def create_dataset(self, name: str) -> int:
        """A new dataset's id, never one a deleted dataset had. Raises `DatasetExistsError`."""

    def find_or_create_dataset(self, name: str) -> tuple[int, bool]:
        """`(id, created)`: the dataset named `name`, created if absent, in one transaction
        (of several processes asking at once, one creates it and the others find it)."""

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
        """Phase 1, and the sync of a folder indexed before: walk `root`, insert a `pending`
        row per new image file, put a file whose size or mtime changed (or that came back)
        back to `pending` (its probe results and embeddings dropped), mark the rows of files
        that are gone `missing`, and write nothing for unchanged files. Blocks until
        committed; memory stays bounded at any number of files (the walk streams sorted
        chunks into the store). Names are taken byte for byte (a `str` root is
        os.fsencode'd). What the walk cannot take (a broken link, a link loop, an unreadable
        folder) becomes a `failed` row with its reason; rows under a folder it cannot read
        are not marked missing. Returns `{"job_id", "found", "added", "existing", "changed",
        "removed", "unchanged", "errors"}` (`existing` = `changed + unchanged`; the counts
        include the walk's failed rows).

        `root` may be an object-store URI (`s3://bucket/prefix/`, `gs://`, `az://`): the
        keys under the prefix are listed (pages of 1000, first-level common prefixes in
        parallel) with the same hidden-name and extension rules; each row's `path` is the
        key relative to the prefix, with size, last-modified (`mtime_ns`) and ETag; the root
        is stored as the normalised URI with a trailing `/`. A bucket that cannot be listed
        (missing, credentials refused, unreachable) raises `ObjectStoreError` before
        anything is written. A prefix listed before is synced by the rules above with
        objects compared by ETag and size instead of mtime; keys gone become `missing` only
        after a complete listing (one that fails or is stopped marks nothing).

        The work runs on a worker thread; this thread waits with the GIL released, renews the
        job's "still adding" mark, and checks for signals: Ctrl-C stops the walk and raises
        `KeyboardInterrupt` within ~0.2 s (rows committed so far stay; nothing is marked
        missing; a rerun does the rest). Raises `CancelledError` once `stop` is set,
        `PathNotFoundError` if `root` is gone (nothing is marked missing then)."""

    def sync_root(
        self,
        dataset_id: int,
        root: str | bytes | PathLike[str] | PathLike[bytes],
        *,
        include_hidden: bool = False,
        follow_links: bool = False,
        stop: StopFlag | None = None,
    ) -> dict[str, Any]:
        """`scan` under the name a watcher calls after it lost events: the same full sync."""

    def sync_paths(
        self,
        dataset_id: int,
        root: str | bytes | PathLike[str] | PathLike[bytes],
        rel_paths: list[str | bytes],
        *,
        job_id: int | None = None,
        include_hidden: bool = False,
        follow_links: bool = False,
        stop: StopFlag | None = None,
    ) -> dict[str, int]:
        """Sync the paths given (relative to `root`, a root of the dataset or a folder in
        one) with the disk now, in one short transaction (the disk is read before it opens):
        an image file gets a `pending` row if new, goes back to `pending` if its size or
        mtime changed (or it was `missing`), is not written if unchanged; a path that no
        longer exists takes its row and every row under it (a deleted folder) to
        `missing`; a folder is walked and its whole subtree synced. Names the walk skips
        (hidden unless `include_hidden`, not an image) are ignored. New rows go to `job_id`,
        by default the dataset's `watch` job for `root` (made on first use, never counted as
        still adding). Blocks (GIL released, Ctrl-C checked). Returns `{"job_id", "added",
        "changed", "removed", "unchanged"}`.

        Raises `PathNotFoundError` if `root` is gone, `InvalidArgumentError` for a path that
        is absolute or leads out of `root` (`..`)."""

    def retry_failed(self, dataset_id: int) -> int:
        """`failed` rows back to `pending` (error and probe results cleared, counters moved
        in the same transactions of at most 16,384 rows); returns how many."""

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
        "rejected", "annotations_skipped"}`: `rejected` is `[(file_name, reason)]` of the
        names that lead out of `images_root` (boxes of missing and rejected images are not
        stored). Raises `CocoError` before writing anything when the file is malformed, not
        a regular file, or above the size limit (4 GiB, or `FASTINDEX_MAX_COCO_BYTES`).
        Writes in short transactions; on a store error or `stop` (`CancelledError`) the rows
        committed stay and a rerun of the same file finishes the work. Interruptible like
        `scan` (Ctrl-C raises `KeyboardInterrupt`)."""

    def probe_pending(
        self,
        dataset_id: int,
        *,
        stop: StopFlag | None = None,
        lease: tuple[str, float] | None = None,
    ) -> int:
        """Phase 2 until no `pending` row is left; returns the rows probed.

        Runs on a worker thread while this thread waits with the GIL released and checks for
        signals. With `lease=(owner, ttl)` the `probe` lease is taken first, and each batch is
        committed only while no other owner holds it (the commit renews it, or takes it back
        if it was let go meanwhile).

        Raises:
            CancelledError: `stop` was set.
            KeyboardInterrupt: a signal (Ctrl-C) arrived; the work stopped within ~0.2 s.
            LeaseLostError: `owner` does not hold (or lost) the lease; that batch is unwritten.
            StoreError: the store failed (disk full...); the call ends at once.
        """

    def progress(self, dataset_id: int, job_id: int | None = None) -> dict[str, Any]:
        """Counts by status, `status`, phase `errors`, and each phase's rate and time left
        from the store's record of recent commits (`phases`, `rate`, `eta_s`, `rate_phase`:
        see `Dataset.get_loading_progress`). O(1) in the number of samples."""

    def samples(
        self,
        dataset_id: int,
        *,
        status: str | None = None,
        limit: int = ...,
        after_id: int = 0,
        format: str | None = None,
        min_width: int | None = None,
        max_width: int | None = None,
        min_height: int | None = None,
        max_height: int | None = None,
        path_glob: str | None = None,
        category: str | None = None,
        has_annotations: bool | None = None,
    ) -> list[dict[str, Any]]: ...
    def roots(self, dataset_id: int) -> list[str]: ...
    def facets(self, dataset_id: int) -> dict[str, dict[str, int]]: ...
    def categories(self, dataset_id: int) -> list[tuple[int, str, str | None, int | None]]: ...
    def annotations_between(
        self, dataset_id: int, after_id: int, upto_id: int
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
    def acquire_lease(self, dataset_id: int, phase: str, owner: str, ttl: float) -> bool:
        """Take (or keep) `phase`'s lease; a holder silent for `ttl` seconds (or a process of
        this host that is gone) is taken over. Taking over `embed` puts the old holder's
        `embedding` rows back to `indexed` in the same transaction. True if `owner` holds it."""

    def renew_lease(self, dataset_id: int, phase: str, owner: str, ttl: float) -> bool:
        """Renew `owner`'s lease only if it still holds it (never takes one over): False
        when another owner has it, or nobody. `ttl` must be positive."""

    def release_lease(self, dataset_id: int, phase: str, owner: str) -> None: ...
    def register_model(self, name: str, pretrained: str, dim: int) -> int: ...
    def models(self) -> list[tuple[int, str, str, int]]: ...
    def set_embed_spec(
        self, dataset_id: int, spec: str | None, model_id: int | None = None
    ) -> None: ...
    def claim_for_embedding(
        self, dataset_id: int, limit: int, after: int = 0, *, owner: str | None = None
    ) -> list[tuple[int, Path]]:
        """Move up to `limit` `indexed` rows above `after` to `embedding`. With `owner`, only
        while no other owner holds the `embed` lease (renewed, or taken if free): else
        `LeaseLostError`, nothing claimed."""

    def finish_embeddings(
        self,
        dataset_id: int,
        model_id: int,
        ids: list[int],
        vectors: bytes,
        failed: list[tuple[int, str]] = ...,
        *,
        owner: str | None = None,
    ) -> None:
        """Store float16 vectors and mark the rows `ready` (`failed`: `[(id, reason)]`).
        With `owner`, only while no other owner holds the `embed` lease (renewed, or taken
        if free): else `LeaseLostError` and nothing of the batch is written."""

    def release_claims(
        self, dataset_id: int, ids: list[int] | None = None, *, owner: str | None = None
    ) -> int:
        """Put `embedding` rows back to `indexed` (all of the dataset's, or `ids`); returns
        how many. With `owner`, only unless another owner holds the `embed` lease: else
        `LeaseLostError` and nothing changes (those claims are the new holder's)."""

    def claim_batch(
        self, dataset_id: int, limit: int, after: int, owner: str
    ) -> tuple[int, list[tuple[int, str, int, int]]]:
        """Hand out a batch for a worker (phase 3 on a cluster): up to `limit` `indexed` rows
        above `after` go to `embedding` under a new batch id (never reused), checked against
        `owner`'s `embed` lease (`LeaseLostError`, nothing claimed). Rows a worker died with
        come first, whatever `after`: after one death in batches of at most `limit // 8`,
        after two alone. Returns `(batch id, [(id, path, orientation, attempts)])`; no rows
        (and id 0) when none is left. Blocks for one short write; releases the GIL."""

    def commit_batch(
        self,
        dataset_id: int,
        model_id: int,
        batch: int,
        ids: list[int],
        vectors: bytes,
        failed: list[tuple[int, str]],
        *,
        owner: str,
    ) -> int:
        """Commit a batch in one transaction: float16 `vectors` for `ids` (-> `ready`),
        `failed` as `[(id, reason)]`. Only rows still `embedding` under `batch` change (a
        duplicate or late result changes nothing). Returns how many rows changed."""

    def release_batch(
        self,
        dataset_id: int,
        batch: int,
        ids: list[int],
        *,
        worker_died: bool,
        max_attempts: int,
        owner: str,
    ) -> tuple[int, int]:
        """Give a batch's rows still out under `batch` back to `indexed`. With
        `worker_died`, each row's attempts go up by one and a row reaching `max_attempts`
        becomes `failed` ("worker died"). Returns `(back to indexed, failed)`."""

    def load_embeddings(
        self, dataset_id: int, model_id: int, after: int = 0
    ) -> tuple[int, list[int], bytes]: ...
    def count_embeddings(self, dataset_id: int, model_id: int, after: int = 0) -> int:
        """How many embeddings were stored after row `after` (to size a reader's arrays)."""

    def read_embeddings(
        self, dataset_id: int, model_id: int, after: int, ids: Any, out: Any
    ) -> tuple[int, int]:
        """Read up to `len(ids)` embeddings stored after row `after`, in row order, straight
        into `ids` (writable int64) and `out` (writable bytes, `len(ids)` rows of float16);
        returns `(cursor, rows read)`. Pass the cursor back to read on."""

@final
class Watcher:
    """Follows folders of a dataset (inotify, through the `notify` crate) and applies their
    changes to the store in batches (one short transaction per folder and batch), on threads
    of its own; a full sync of a folder when it starts (unless not `catch_up`) and whenever
    events may have been lost (the kernel's queue, or this one of `queue` paths, overflowed).
    Construction blocks while the watches are placed (a walk of the folders; GIL released).
    Raises `PathNotFoundError`, `InvalidArgumentError` (not a folder, unknown dataset, too
    many folders to watch), `StoreError`."""

    def __new__(
        cls,
        db: str,
        dataset_id: int,
        roots: Sequence[str | bytes | PathLike[str] | PathLike[bytes]],
        *,
        queue: int = 65536,
        quiet_ms: int = 50,
        max_delay_ms: int = 250,
        max_batch: int = 5000,
        include_hidden: bool = False,
        follow_links: bool = False,
        catch_up: bool = True,
    ) -> Watcher: ...
    def stop(self) -> None:
        """Stop and join the watcher's thread (within one batch or sync step). Idempotent."""

    @property
    def running(self) -> bool: ...
    def wait_change(self, seen: int, timeout: float) -> int:
        """Block (GIL released) until the generation (bumped by each batch or sync that
        changed rows) differs from `seen`, the watcher stops, or `timeout` seconds pass;
        returns the generation."""

    def stats(self) -> dict[str, Any]:
        """`{"running", "events", "dropped", "overflows", "batches", "full_syncs", "paths",
        "changed", "errors", "generation", "last_error", "missing_roots", "last_sync"}`."""
