"""`Dataset`: the public face of one dataset in a store."""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from . import _core
from .errors import DatasetNotFoundError, InvalidArgumentError
from .jobs import Job, ModelSpec, Pipeline, pipeline_for, progress_of, wait_for
from .sample import Annotation, Sample

if TYPE_CHECKING:
    import numpy as np

    from .embed import EmbeddingModel
    from .ray_engine import RayEngine
    from .watch import Watcher

DEFAULT_DB = "fastindex.db"
#: Samples in one page of `Dataset.samples` (and `iter_samples`) when no `limit` is given.
DEFAULT_PAGE = 1000


def _check_path_arg(name: str, value: object) -> str:
    # bytes are names as the file system has them; as str (os.fsdecode, surrogateescape) they
    # reach the core unchanged, which encodes them back byte for byte
    if not isinstance(value, str | bytes | os.PathLike):
        raise InvalidArgumentError(f"{name} must be a path, got {type(value).__name__}")
    s = os.fsdecode(os.fspath(value))
    if not s:
        raise InvalidArgumentError(f"{name} must be a non-empty path")
    return s


#: `EmbeddingModel().spec()` and its `dim`, known without importing open_clip and torch (a
#: second or more), so that the default call returns at once: must match `EmbeddingModel()`
#: (tests/faults/test_pipeline.py checks it).
DEFAULT_EMBED_SPEC: dict[str, Any] = {
    "name": "ViT-B-32",
    "pretrained": "laion2b_s34b_b79k",
    "checkpoint": None,
    "device": None,
    "batch_size": 256,
    "precision": None,
    "workers": None,
}
DEFAULT_EMBED_DIM = 512


def embed_installed() -> bool:
    """True when torch and open_clip_torch are installed (found, not imported: importing
    them takes seconds, and happens in the embed thread)."""
    return all(importlib.util.find_spec(m) is not None for m in ("torch", "open_clip"))


def _check_engine(engine: object) -> None:
    if engine is None:
        return
    from .ray_engine import RayEngine

    if not isinstance(engine, RayEngine):
        raise InvalidArgumentError(
            f"engine must be a fastindex.RayEngine or None, got {type(engine).__name__}"
        )


def _resolve_embed(embed: EmbeddingModel | bool | None) -> EmbeddingModel | ModelSpec | None:
    if embed is False:
        return None
    if embed is None or embed is True:
        if embed_installed():
            return ModelSpec(dict(DEFAULT_EMBED_SPEC), "cannot load the default embedding model")
        if embed is None:
            return None
        raise InvalidArgumentError(
            "embed=True needs torch and open_clip_torch: pip install 'fastindex[embed]'"
        )
    from .embed import EmbeddingModel

    if isinstance(embed, EmbeddingModel):
        return embed
    raise InvalidArgumentError(
        f"embed must be an EmbeddingModel, True, False or None, got {type(embed).__name__}"
    )


def _readable_spec(text: str) -> dict[str, Any] | None:
    """A stored model spec this fastindex can read, checked without importing open_clip."""
    try:
        spec = json.loads(text)
    except ValueError:
        return None
    if isinstance(spec, dict) and isinstance(spec.get("name"), str):
        return spec
    return None


class Dataset:
    """A named set of samples in a store (a SQLite file).

    Reads go through the store and are safe while background work writes. Create one with
    `Dataset.create`, `Dataset.load` or `Dataset.load_or_create`.
    """

    def __init__(self, store: _core.Store, dataset_id: int, name: str) -> None:
        self._store = store
        self.id = dataset_id
        self.name = name
        self.db = store.path

    def __repr__(self) -> str:
        return f"<Dataset {self.name!r} ({self.id}) in {self.db}>"

    # -- opening ----------------------------------------------------------------------------
    @classmethod
    def create(cls, name: str, *, db: str | os.PathLike[str] = DEFAULT_DB) -> Dataset:
        """Create a new, empty dataset. Raises `DatasetExistsError` if the name is taken."""
        store = _core.Store(_check_path_arg("db", db))
        if not isinstance(name, str):
            raise InvalidArgumentError(f"name must be a string, got {type(name).__name__}")
        dataset_id = store.create_dataset(name)
        return cls(store, dataset_id, name.strip())

    @classmethod
    def load(
        cls, name: str, *, db: str | os.PathLike[str] = DEFAULT_DB, resume: bool = True
    ) -> Dataset:
        """Open an existing dataset. Raises `DatasetNotFoundError` if there is none.

        With `resume` (the default), unfinished work (pending rows, and rows waiting for
        the dataset's embedding model) continues in the background.
        """
        path = _check_path_arg("db", db)
        if not os.path.exists(path):
            raise DatasetNotFoundError(f"no dataset named {name!r}: {path} does not exist")
        store = _core.Store(path)
        row = store.find_dataset(name)
        if row is None:
            raise DatasetNotFoundError(f"no dataset named {name!r} in {path}")
        ds = cls(store, row[0], row[1])
        if resume:
            ds.resume()
        return ds

    @classmethod
    def load_or_create(cls, name: str, *, db: str | os.PathLike[str] = DEFAULT_DB) -> Dataset:
        """`load` the dataset if it exists, else `create` it (atomically: of several
        processes asking at once, one creates it and the others load it)."""
        path = _check_path_arg("db", db)
        if not isinstance(name, str):
            raise InvalidArgumentError(f"name must be a string, got {type(name).__name__}")
        store = _core.Store(path)
        dataset_id, created = store.find_or_create_dataset(name)
        ds = cls(store, dataset_id, name.strip())
        if not created:
            ds.resume()
        return ds

    @property
    def _pipeline(self) -> Pipeline:
        return pipeline_for(self.db, self.id)

    def resume(self) -> None:
        """Start background work for whatever the store says is unfinished. Returns at once
        (the embedding model, if any, is built and loaded in the embed thread)."""
        spec = self._embed_spec()
        model: ModelSpec | None = None
        if spec is not None:
            readable = _readable_spec(spec)
            if readable is None:
                # The dataset was embedded by another fastindex: everything else still opens
                # and works; progress says why phase 3 waits.
                self._store.set_phase_error(
                    self.id, "embed", f"cannot resume embeddings: not a model spec: {spec}"
                )
            else:
                model = ModelSpec(readable)
        self._pipeline.kick(model)

    def _embed_spec(self) -> str | None:
        row = self._store.dataset(self.id)
        return None if row is None else row[3]

    def has_embedding_model(self) -> bool:
        """Whether the dataset has an embedding model (without building it: no torch)."""
        return self._embed_spec() is not None

    # -- adding -----------------------------------------------------------------------------
    def add_images_from_path(
        self,
        path: str | bytes | os.PathLike[str] | os.PathLike[bytes],
        *,
        embed: EmbeddingModel | bool | None = None,
        include_hidden: bool = False,
        follow_links: bool = False,
        engine: RayEngine | None = None,
    ) -> Job:
        """Add every image file under `path` (phase 1) and index them in the background.

        Blocks until every file has a `pending` row (the walk and the inserts run in Rust,
        with the GIL released, in memory bounded at any number of files); phase 2 (and
        phase 3 with `embed`) then run in background threads.

        Adding a folder again syncs it: each file is compared with its row by size and
        modification time (ns). A new file is added as `pending`; a changed one goes back to
        `pending`, its size, format and embedding dropped and recomputed; the row of a file
        that is gone becomes `missing` (it keeps its annotations, `samples(status="missing")`
        lists it, and it goes back to `pending` if the file comes back); an unchanged row is
        not written. A `failed` row is retried only if its file changed (or with
        `retry_failed`). `job.summary` says `{"added", "changed", "removed", "unchanged",
        "existing" (changed + unchanged), "found", "errors", "job_id"}`. If the walk cannot
        read a folder, the rows under it are left as they are; a stopped call (Ctrl-C)
        marks nothing missing.

        `path` may also be an object-store URI, `s3://bucket/prefix/` (`gs://`, `az://`
        likewise): the keys under the prefix are listed instead of walked, with the same
        rules, and phase 2 reads the first bytes of each object with ranged requests, many
        in flight. Credentials and endpoint come from the standard places (`AWS_*`
        variables, `AWS_ENDPOINT_URL` for MinIO/Ceph/R2, `AWS_PROFILE` from `~/.aws`,
        instance metadata). Adding a prefix again syncs it as a folder is synced, with
        objects compared by ETag and size: new keys added, rewritten ones back to `pending`,
        deleted ones `missing` (only after a complete listing), unchanged rows not written.

        Args:
            path: the folder to walk, or the object-store URI to list.
            embed: an `EmbeddingModel`, True for the default model, False for none, None
                for the default model when torch and open_clip are installed. The default
                model is imported, built and loaded in the embed thread: the call returns
                as fast as with False.
            include_hidden: also take names starting with `.` (skipped by default).
            follow_links: enter symlinked folders (symlinked files are always followed).
            engine: where phase 3 runs: None for this process, or a cluster
                (`fastindex.RayEngine`; the folder must be at the same path on its nodes).

        Raises:
            PathNotFoundError: `path` does not exist.
            InvalidArgumentError: `path` is not a folder, or an option is wrong.
            ObjectStoreError: the bucket cannot be listed (missing, credentials refused,
                unreachable); nothing was written.
        """
        root = _check_path_arg("path", path)
        model = _resolve_embed(embed)
        summary = self._store.scan(
            self.id, root, include_hidden=bool(include_hidden), follow_links=bool(follow_links)
        )
        return self._started(summary, model, engine)

    def retry_failed(self) -> int:
        """Put every `failed` sample back to `pending` (its error and probe results cleared)
        and index them again in the background: for files fixed in place without a change
        of size or time, or after a fault of the machine (a full disk). Returns how many
        rows went back. Blocks for the store writes only (short transactions)."""
        n = int(self._store.retry_failed(self.id))
        if n:
            self.resume()
        return n

    def add_samples_from_coco(
        self,
        *,
        annotations_json: str | os.PathLike[str],
        images_path: str | os.PathLike[str],
        embed: EmbeddingModel | bool | None = None,
        engine: RayEngine | None = None,
    ) -> Job:
        """Add the images a COCO detection file lists, with their boxes and categories.

        The file is parsed and checked in full before anything is written. It must be a
        regular file of at most 4 GiB (the environment variable `FASTINDEX_MAX_COCO_BYTES`
        sets another limit, in bytes); it is held in memory while it is ingested.

        Each `file_name` is taken relative to `images_path`: `./a.png` and `a.png` are one
        sample, and a name that leads out of the folder (absolute, through `..`, or through a
        symlink whose target is outside) is never opened nor indexed. Such entries are listed
        with the reason in `job.summary["rejected"]` as `(file_name, reason)`, images missing
        on disk in `job.summary["missing"]`; both are kept in the job's warnings, and their
        boxes are counted in `job.summary["annotations_skipped"]`.

        Blocks until the rows are committed, written in short transactions so that other
        datasets of the store keep writing meanwhile; the headers are read in the same pass.
        If the call fails or is cancelled part way, the rows already committed stay, and
        adding the same file again finishes the work (nothing is added twice).

        `engine` runs phase 3 on a cluster, as for `add_images_from_path`.

        Either may be an object-store URI (`s3://bucket/instances.json`,
        `s3://bucket/images/`): the file is read with one ranged request of at most the
        limit (plus one byte), and the images are looked at by listing the prefix once
        (size, last-modified, ETag; an image the bucket lacks is in `summary["missing"]`);
        their rows are written `pending` and phase 2 reads their headers.

        Raises:
            CocoError: the file is malformed (with the reason and where), is not a regular
                file, or is larger than the limit.
            PathNotFoundError: the file or the folder does not exist.
            ObjectStoreError: a bucket cannot be read or listed (missing, credentials
                refused, unreachable), or the file is not in it; nothing was written.
        """
        ann = _check_path_arg("annotations_json", annotations_json)
        images = _check_path_arg("images_path", images_path)
        model = _resolve_embed(embed)
        summary = self._store.ingest_coco(self.id, ann, images)
        return self._started(summary, model, engine)

    def watch(
        self,
        path: str | bytes | os.PathLike[str] | os.PathLike[bytes],
        *,
        embed: EmbeddingModel | bool | None = None,
        include_hidden: bool = False,
        follow_links: bool = False,
        queue_size: int | None = None,
    ) -> Watcher:
        """Follow the folder `path` live until `stop()` on the returned `Watcher` (or the end
        of its `with` block): a file copied, moved or written in is `pending` within a
        fraction of a second and goes through phases 2 and 3; a file changed in place goes
        back to `pending`; a deleted one becomes `missing` (the sync rules of
        `add_images_from_path`, applied in batches of events, one short transaction each).

        A folder new to the dataset is added first (phase 1; this call blocks for it, as
        `add_images_from_path` does); then the watcher syncs the whole folder once in the
        background, catching up with what changed while nobody watched, and again whenever
        events may have been lost.

        Args:
            path: the folder to follow.
            embed: as for `add_images_from_path`.
            include_hidden: also take names starting with `.`.
            follow_links: enter symlinked folders (as `add_images_from_path` does).
            queue_size: events held between two batches before they are dropped and a full
                sync catches up (default 65,536, or `FASTINDEX_WATCH_QUEUE`).

        Raises:
            PathNotFoundError: `path` does not exist.
            InvalidArgumentError: `path` is not a folder, or the system's limit of watched
                folders is reached (`fs.inotify.max_user_watches`).
        """
        from .watch import watch_folder

        return watch_folder(
            self,
            _check_path_arg("path", path),
            embed=embed,
            include_hidden=bool(include_hidden),
            follow_links=bool(follow_links),
            queue_size=queue_size,
        )

    def _started(
        self,
        summary: dict[str, Any],
        model: EmbeddingModel | ModelSpec | None,
        engine: RayEngine | None = None,
    ) -> Job:
        _check_engine(engine)
        if isinstance(model, ModelSpec):
            self._set_default_model(model)
        elif model is not None:
            self.set_embedding_model(model)
        self._pipeline.kick(model, engine=engine)
        return Job(self._store, self._pipeline, summary["job_id"], summary)

    def _set_default_model(self, model: ModelSpec) -> None:
        """`set_embedding_model(EmbeddingModel())` without building it (no torch import)."""
        spec = model.spec
        if self._stored_spec() == spec:
            return
        model_id = self._store.register_model(spec["name"], spec["pretrained"], DEFAULT_EMBED_DIM)
        self._store.set_embed_spec(self.id, json.dumps(spec), model_id)

    def _stored_spec(self) -> dict[str, Any] | None:
        text = self._embed_spec()
        return None if text is None else _readable_spec(text)

    # -- embeddings (phase 3) ---------------------------------------------------------------
    def embedding_model(self) -> EmbeddingModel | None:
        """The model whose embeddings `ready` means for this dataset, if any."""
        row = self._store.dataset(self.id)
        if row is None or row[3] is None:
            return None
        from .embed import EmbeddingModel

        return EmbeddingModel.from_spec(json.loads(row[3]))

    def set_embedding_model(self, model: EmbeddingModel) -> None:
        """Make `model` the dataset's embedding model. Samples already `ready` with another
        model go back to `indexed` until this one has embedded them too."""
        if self._stored_spec() == model.spec():
            return
        model_id = self._store.register_model(model.key_name, model.key_pretrained, model.dim)
        self._store.set_embed_spec(self.id, json.dumps(model.spec()), model_id)

    def embed(
        self, model: EmbeddingModel | bool = True, *, engine: RayEngine | None = None
    ) -> None:
        """Embed every indexed sample in the background (phase 3); with `engine`
        (`fastindex.RayEngine`), on a cluster."""
        _check_engine(engine)
        resolved = _resolve_embed(model)
        if resolved is None:
            raise InvalidArgumentError("embed() needs a model")
        if isinstance(resolved, ModelSpec):
            self._set_default_model(resolved)
        else:
            self.set_embedding_model(resolved)
        self._pipeline.kick(resolved, engine=engine)

    def embeddings(self, model: EmbeddingModel | None = None) -> tuple[np.ndarray, np.ndarray]:
        """`(ids, vectors)`: the L2-normalised float32 embeddings stored so far (a float32
        copy of all of them: 2 GB a million 512-d vectors)."""
        from .search import index_for

        return index_for(self, model).snapshot()

    def iter_embeddings(
        self, model: EmbeddingModel | None = None, *, chunk: int = 16_384
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """`(ids, vectors)` chunks of at most `chunk` rows: the stored embeddings by `model`
        (default: the dataset's), L2-normalised float32, in the order they were stored, read
        from the store a chunk at a time (memory O(chunk) at any size, unlike `embeddings`).
        Safe while embedding runs: no sample comes twice, and embeddings stored meanwhile
        come in later chunks.

        Raises:
            NoEmbeddingsError: no model, or no embedding by it in this store.
            InvalidArgumentError: `chunk` is not a positive integer.
        """
        from .vectors import iter_embeddings

        return iter_embeddings(self, model, chunk=chunk)

    def search(
        self, text: str, *, k: int = 20, model: EmbeddingModel | None = None
    ) -> list[tuple[Sample, float]]:
        """The `k` samples whose embeddings best match `text` (cosine: exact search, or past
        `FASTINDEX_ANN_MIN` vectors, default 2M, an approximate index's candidates scored
        exactly once it is built in the background; see `fastindex.search`)."""
        from .search import index_for

        return index_for(self, model).search_text(text, k=k)

    def similar(
        self, sample_id: int, *, k: int = 20, model: EmbeddingModel | None = None
    ) -> list[tuple[Sample, float]]:
        """The `k` samples most like `sample_id` (itself first)."""
        from .search import index_for

        return index_for(self, model).search_sample(sample_id, k=k)

    # -- progress ---------------------------------------------------------------------------
    def get_loading_progress(self) -> dict[str, Any]:
        """Counts by status: `{"dataset_id", "total", "pending", "indexed", "embedding",
        "ready", "failed", "missing", "status": "in_progress" | "complete", "errors",
        "error"}` (`missing`: files gone from their folder, see `add_images_from_path`), and
        how fast the work goes, as the store recorded it (any process sees the same):

        - `"phases"`: `{"probe": {...}, "embed": {...}}` (`"embed"` only when the dataset
          wants embeddings; `"ingest"` while a COCO ingest runs), each
          `{"done", "total", "rate", "eta_s"}`: rows through the phase and rows it will
          have done (`total` is None for an ingest), rows per second over its recent
          commits, and seconds left at that rate. `rate` and `eta_s` are None while the
          phase is not running (finished, or stopped on an error) and until its first
          commit (measured from when its work began).
        - `"rate"`, `"eta_s"`: those of the running phase completion waits on longest
          (`"rate_phase"` names it; a phase with rows left and no rate yet counts as the
          longest, so `eta_s` is None until it has one). None when nothing runs.

        A rate spans the last 30 s of commits or the last 5 commits, whichever reaches
        further back, and is measured between commits, so a phase that commits a batch
        every 40 s keeps its rate between them: never 0/s while rows move.

        O(1) in the number of samples; safe to call from any thread or process.
        """
        return progress_of(self._store, self.id, None, self._pipeline)

    progress = get_loading_progress

    def is_ready(self) -> bool:
        """True once every sample is through every phase that can run."""
        return bool(self.get_loading_progress()["status"] == "complete")

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the whole dataset is complete (True) or `timeout` passes (False)."""
        return wait_for(self.get_loading_progress, self._pipeline, timeout)

    def cancel(self, timeout: float | None = None) -> bool:
        """Stop background work; rows keep their status and resume on the next `load`.
        Waits at most `timeout` seconds; returns whether every worker has stopped (one
        stuck in a forward pass stops after it, committing nothing)."""
        return self._pipeline.cancel(timeout)

    def delete(self) -> None:
        """Stop background work and remove the dataset and all its rows from the store.
        Image files on disk are never touched."""
        self._pipeline.cancel()
        self._store.delete_dataset(self.id)

    # -- reading ----------------------------------------------------------------------------
    def samples(
        self,
        *,
        status: str | None = None,
        limit: int = DEFAULT_PAGE,
        after_id: int = 0,
        format: str | None = None,
        min_width: int | None = None,
        max_width: int | None = None,
        min_height: int | None = None,
        max_height: int | None = None,
        path_glob: str | None = None,
        category: str | None = None,
        has_annotations: bool | None = None,
    ) -> list[Sample]:
        """One page of the samples that match every filter given: at most `limit` (default
        `DEFAULT_PAGE`, 1000), in id order, with ids above `after_id`.

        Filters: `status`; `format` (as probed: "JPEG", "PNG", ...); the probed size within
        `min_width`..`max_width`, `min_height`..`max_height` (inclusive; a sample not yet
        probed has no size and matches no size filter); `path_glob`, a SQLite GLOB over the
        path relative to its root (`*`, `?`, `[...]`, case-sensitive; `*` crosses `/`);
        `category`, a category name (samples with a box of it; an unknown name matches
        nothing); `has_annotations`, True or False.

        Paged by key, never by offset: the next page is `after_id=page[-1].id`, and costs the
        same at any depth. A page shorter than `limit` is the last one (for now: rows added
        later get higher ids). `iter_samples` walks every page.
        """
        filters = check_filters(
            status=status,
            format=format,
            min_width=min_width,
            max_width=max_width,
            min_height=min_height,
            max_height=max_height,
            path_glob=path_glob,
            category=category,
            has_annotations=has_annotations,
        )
        check_page(limit=limit, after_id=after_id)
        rows = self._store.samples(self.id, limit=int(limit), after_id=int(after_id), **filters)
        return [Sample(**r) for r in rows]

    def iter_samples(
        self, *, page: int = DEFAULT_PAGE, after_id: int = 0, **filters: Any
    ) -> Iterator[Sample]:
        """Every sample that matches the filters (those of `samples`), in id order, read
        `page` rows at a time by key: memory stays O(page) at any size, and each page costs
        the same at any depth. Safe while indexing runs: a sample is yielded at most once,
        with the status it had when its page was read, and samples added meanwhile come
        last."""
        check_page(limit=page, after_id=after_id)
        if page < 1:
            raise InvalidArgumentError(f"page must be at least 1, got {page}")
        while True:
            rows = self.samples(limit=page, after_id=after_id, **filters)
            yield from rows
            if len(rows) < page:
                return
            after_id = rows[-1].id

    def facets(self) -> dict[str, dict[str, int]]:
        """Samples per value, for filter controls: `{"status": {...}, "format": {...},
        "category": {...}}`. Read from counters (O(distinct values)), safe while indexing."""
        f: dict[str, dict[str, int]] = self._store.facets(self.id)
        p = self.get_loading_progress()
        f["status"] = {s: int(p[s]) for s in _core.STATUSES}
        return f

    def export(self, dest: Any, *, format: str = "coco", **options: Any) -> dict[str, Any]:
        """Write the dataset to `dest` (a path or a binary file): `format` "coco" (JSON with
        the probed sizes and every box as ingested), "csv" or "parquet" (one row per sample
        with its status and error). Streamed page by page: memory stays bounded at any
        size. Filters (as `samples`) given in `options` narrow what is written. A path is
        written to `<path>.part` and renamed once complete. Returns `{"format", "bytes"}`.
        See `fastindex.export`."""
        from .export import export_dataset

        return export_dataset(self, dest, format=format, **options)

    def export_embeddings(
        self, dest: Any, *, format: str = "parquet", model: EmbeddingModel | None = None
    ) -> dict[str, Any]:
        """Write the stored embeddings (L2-normalised float32, by `model`, default the
        dataset's): "parquet" (columns `sample_id`, `embedding`) or "npy" (`dest` gets the
        float32 matrix, `dest` with `.ids.npy` the sample ids). Streamed a chunk at a time
        (memory bounded at any size) into temporary files renamed at the end: a failed
        export leaves nothing half-written."""
        from .vectors import export_embeddings

        return export_embeddings(self, dest, format=format, model=model)

    def sample(self, sample_id: int) -> Sample:
        """One sample by id. Raises `DatasetNotFoundError` (a `LookupError`) if absent."""
        rows = self._store.samples_by_id([int(sample_id)])
        if not rows or rows[0]["dataset_id"] != self.id:
            raise DatasetNotFoundError(f"no sample {sample_id} in dataset {self.name!r}")
        return Sample(**rows[0])

    def samples_by_id(self, ids: list[int]) -> list[Sample]:
        return [Sample(**r) for r in self._store.samples_by_id([int(i) for i in ids])]

    def annotations(self, sample_id: int | None = None) -> list[Annotation]:
        """COCO boxes with their category names: of one sample, or all of the dataset's."""
        rows = self._store.annotations(self.id, None if sample_id is None else int(sample_id))
        return [Annotation.from_row(r) for r in rows]

    def jobs_summary(self, job_id: int) -> dict[str, Any]:
        row = self._store.job(job_id)
        if row is None or row[0] != self.id:
            raise DatasetNotFoundError(f"no job {job_id} in dataset {self.name!r}")
        _, kind, source, added, existing, warnings = row
        return {
            "job_id": job_id,
            "kind": kind,
            "source": source,
            "added": added,
            "existing": existing,
            "warnings": json.loads(warnings),
        }


_INT_FILTERS = ("min_width", "max_width", "min_height", "max_height")


def check_page(**given: Any) -> None:
    """`limit` and `after_id` (or any other paging integers) checked: raises
    `InvalidArgumentError`."""
    for name, value in given.items():
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidArgumentError(f"{name} must be an integer, got {value!r}")
        if value < 0:
            raise InvalidArgumentError(f"{name} must not be negative, got {value}")


def check_filters(**given: Any) -> dict[str, Any]:
    """The `samples` filters that are set, checked: raises `InvalidArgumentError`."""
    out: dict[str, Any] = {}
    for name, value in given.items():
        if value is None:
            continue
        if name == "status" and value not in _core.STATUSES:
            raise InvalidArgumentError(
                f"unknown status {value!r}: expected one of {', '.join(_core.STATUSES)}"
            )
        if name in _INT_FILTERS and (isinstance(value, bool) or not isinstance(value, int)):
            raise InvalidArgumentError(f"{name} must be an integer, got {value!r}")
        if name == "has_annotations" and not isinstance(value, bool):
            raise InvalidArgumentError(f"has_annotations must be True or False, got {value!r}")
        if name in ("status", "format", "path_glob", "category") and (
            not isinstance(value, str) or not value
        ):
            raise InvalidArgumentError(f"{name} must be a non-empty string, got {value!r}")
        out[name] = value
    return out


def list_datasets(*, db: str | os.PathLike[str] = DEFAULT_DB) -> list[dict[str, Any]]:
    """Every dataset in a store: `[{"id", "name", "created_at"}]`."""
    path = _check_path_arg("db", db)
    if not os.path.exists(path):
        return []
    return [
        {"id": i, "name": n, "created_at": c, "embed_model": json.loads(s) if s else None}
        for i, n, c, s in _core.Store(path).list_datasets()
    ]
