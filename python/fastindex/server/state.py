"""What the server knows: the store, the indexing it started, and cheap reads of both.

Reads use one store connection per thread (a `Store` serialises its calls, and SQLite in WAL
mode lets any number of readers run beside the one writer), so a progress read never waits for
a scan, a probe batch or another request.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from .. import _core
from ..dataset import Dataset
from ..errors import (
    DatasetExistsError,
    DatasetNotFoundError,
    FastIndexError,
    InvalidArgumentError,
    PathNotFoundError,
)
from ..jobs import Pipeline, pipeline_for, progress_of
from ..sample import Annotation, Sample
from .errors import NotFoundError, NotReadyError

if TYPE_CHECKING:
    from ..embed import EmbeddingModel

log = logging.getLogger("fastindex.server")

#: The keys of a progress answer (the proposal's contract, then the store's rates: `phases`
#: with each phase's `done`, `total`, `rate` and `eta_s`, and the `rate`, `eta_s` and
#: `rate_phase` of the phase completion waits on), then `error`.
PROGRESS_KEYS: tuple[str, ...] = (
    "dataset_id",
    "total",
    *_core.STATUSES,
    "status",
    "phases",
    "rate",
    "eta_s",
    "rate_phase",
)
#: Statuses whose file has been read and found to be an image.
INDEXED_STATUSES = frozenset({"indexed", "embedding", "ready"})


@dataclass
class IndexTask:
    """One `POST /api/datasets`: phase 1 in a thread, then the dataset's pipeline."""

    id: int
    dataset_id: int
    kind: Literal["folder", "coco"]
    source: str
    state: Literal["scanning", "started", "failed"] = "scanning"
    error: str | None = None
    summary: dict[str, Any] = field(default_factory=dict)
    job_id: int | None = None
    created_at: float = field(default_factory=time.time)

    def to_dict(self) -> dict[str, Any]:
        return {
            "task_group_id": self.id,
            "dataset_id": self.dataset_id,
            "kind": self.kind,
            "source": self.source,
            "state": self.state,
            "error": self.error,
            "job_id": self.job_id,
            "summary": self.summary,
        }


def public_progress(p: dict[str, Any]) -> dict[str, Any]:
    """The contract's keys, and the error text of a phase that stopped (or None)."""
    out = {k: p[k] for k in PROGRESS_KEYS}
    out["error"] = p.get("error")
    return out


def sample_json(row: dict[str, Any]) -> dict[str, Any]:
    """A sample as the API shows it: no absolute paths, `file_name` added."""
    d = {k: v for k, v in row.items() if k != "root"}
    d["file_name"] = os.path.basename(str(row["path"]))
    return d


def annotation_json(a: Annotation, *, segmentation: bool) -> dict[str, Any]:
    d = a.to_dict()
    d["bbox"] = list(a.bbox)
    if not segmentation:
        d.pop("segmentation")
    return d


class ServerState:
    """Shared by every request of one app. Thread-safe."""

    def __init__(self, db: str | os.PathLike[str], *, embed_model: EmbeddingModel | None = None):
        self.db = os.path.abspath(os.fspath(db))
        #: The model a `POST` with `embed` true (or left out) uses; None: the library default.
        self.embed_model = embed_model
        self._local = threading.local()
        self._lock = threading.Lock()
        self._datasets: dict[int, Dataset] = {}
        self._search_locks: dict[int, threading.Lock] = {}
        self._scanning: Counter[int] = Counter()
        self._scan_errors: dict[int, str] = {}
        self._task_ids = itertools.count(1)
        self.tasks: dict[int, IndexTask] = {}
        self._threads: list[threading.Thread] = []
        self._resumed: set[int] = set()
        self.store()  # fail now (StoreError) if the file is not a fastindex store
        self.resume_unfinished()

    def resume_unfinished(self) -> list[int]:
        """Start the background work of every dataset in the store that has unfinished rows
        (left by a run that crashed or was stopped), so that its progress and its streams
        reach `complete`. Returns their ids. Returns at once."""
        started = []
        for dataset_id, name, _, _ in self.store().list_datasets():
            p = progress_of(self.store(), dataset_id, None, None)
            if p["status"] == "complete":
                continue
            try:
                ds = self.dataset(dataset_id)
                ds.resume()
            except FastIndexError as e:  # that dataset stays as it is; the others go on
                log.warning("cannot resume dataset %s (%s): %s", dataset_id, name, e)
                continue
            started.append(dataset_id)
        with self._lock:
            self._resumed.update(started)
        return started

    # -- store access -----------------------------------------------------------------------
    def store(self) -> _core.Store:
        """This thread's connection to the store."""
        s: _core.Store | None = getattr(self._local, "store", None)
        if s is None:
            s = self._local.store = _core.Store(self.db)
        return s

    def pipeline(self, dataset_id: int) -> Pipeline:
        return pipeline_for(self.db, dataset_id)

    def require_dataset(self, dataset_id: int) -> None:
        """Raise `DatasetNotFoundError` unless the dataset exists (one indexed lookup)."""
        if self.store().dataset(dataset_id) is None:
            raise DatasetNotFoundError(f"no dataset with id {dataset_id}")

    def dataset(self, dataset_id: int) -> Dataset:
        """A `Dataset` with its own connection, for the calls that need one (search)."""
        with self._lock:
            ds = self._datasets.get(dataset_id)
        if ds is not None:
            return ds
        store = _core.Store(self.db)
        row = store.dataset(dataset_id)
        if row is None:
            raise DatasetNotFoundError(f"no dataset with id {dataset_id}")
        with self._lock:
            return self._datasets.setdefault(dataset_id, Dataset(store, row[0], row[1]))

    # -- progress ---------------------------------------------------------------------------
    def progress(self, dataset_id: int) -> dict[str, Any]:
        """The contract's counts plus `error`; O(1) in the number of samples."""
        self.require_dataset(dataset_id)
        p = progress_of(self.store(), dataset_id, None, self.pipeline(dataset_id))
        out = public_progress(p)
        scan_error = self._scan_errors.get(dataset_id)
        if scan_error is not None:
            out["error"] = f"scan: {scan_error}" + (f"; {out['error']}" if out["error"] else "")
        if self._scanning[dataset_id] > 0:
            out["status"] = "in_progress"
        return out

    def datasets(self) -> list[dict[str, Any]]:
        out = []
        for dataset_id, name, created_at, spec in self.store().list_datasets():
            out.append(
                {
                    "id": dataset_id,
                    "name": name,
                    "created_at": created_at,
                    "embeddings": spec is not None,
                    "progress": self.progress(dataset_id),
                }
            )
        return out

    def dataset_info(self, dataset_id: int) -> dict[str, Any]:
        row = self.store().dataset(dataset_id)
        if row is None:
            raise DatasetNotFoundError(f"no dataset with id {dataset_id}")
        return {
            "id": row[0],
            "name": row[1],
            "created_at": row[2],
            "embeddings": row[3] is not None,
            "progress": self.progress(dataset_id),
        }

    # -- samples ----------------------------------------------------------------------------
    def samples(
        self,
        dataset_id: int,
        *,
        status: str | None,
        offset: int,
        limit: int,
        after_id: int = 0,
        filters: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """A page of samples in id order, each with its boxes (no segmentations).

        `total` is the number of matching rows when it is known from a counter (no filter,
        or only `status`, `format` or `category`), else None; `next_after_id` pages on."""
        p = self.progress(dataset_id)
        store = self.store()
        filters = filters or {}
        rows = store.samples(
            dataset_id, status=status, offset=offset, limit=limit, after_id=after_id, **filters
        )
        items = []
        for row in rows:
            item = sample_json(row)
            item["annotations"] = [
                annotation_json(Annotation.from_row(a), segmentation=False)
                for a in store.annotations(dataset_id, row["id"])
            ]
            items.append(item)
        total: int | None = p[status] if status is not None else p["total"]
        if filters:
            total = None
            if len(filters) == 1 and status is None and set(filters) & {"format", "category"}:
                ((key, value),) = filters.items()
                total = store.facets(dataset_id)[key].get(value, 0)
        return {
            "dataset_id": dataset_id,
            "status": status,
            "filters": filters,
            "total": total,
            "offset": offset,
            "limit": limit,
            "after_id": after_id,
            "next_after_id": rows[-1]["id"] if len(rows) == limit else None,
            "items": items,
        }

    def facets(self, dataset_id: int) -> dict[str, Any]:
        """Samples per status, format and category, from counters (O(distinct values))."""
        p = self.progress(dataset_id)
        f: dict[str, Any] = self.store().facets(dataset_id)
        f["status"] = {s: p[s] for s in _core.STATUSES}
        f["dataset_id"] = dataset_id
        f["total"] = p["total"]
        return f

    def sample_row(self, sample_id: int) -> dict[str, Any]:
        rows = self.store().samples_by_id([sample_id])
        if not rows:
            raise NotFoundError(f"no sample with id {sample_id}")
        row: dict[str, Any] = rows[0]
        return row

    def sample(self, sample_id: int) -> dict[str, Any]:
        """A sample with its boxes and their segmentations."""
        row = self.sample_row(sample_id)
        item = sample_json(row)
        item["annotations"] = [
            annotation_json(Annotation.from_row(a), segmentation=True)
            for a in self.store().annotations(row["dataset_id"], sample_id)
        ]
        return item

    def indexed_sample(self, sample_id: int) -> Sample:
        """The sample, if its file was read and found to be an image: the only way a request
        reaches a file is through this."""
        row = self.sample_row(sample_id)
        if row["status"] not in INDEXED_STATUSES:
            why = f": {row['error']}" if row["status"] == "failed" and row["error"] else ""
            raise NotReadyError(f"sample {sample_id} is {row['status']}{why}")
        return Sample(**row)

    # -- search -----------------------------------------------------------------------------
    def _searchable(self, dataset_id: int) -> Dataset:
        self.require_dataset(dataset_id)
        row = self.store().dataset(dataset_id)
        if row is None or row[3] is None:
            raise NotReadyError(
                f"dataset {dataset_id} has no embeddings: index it with embed on to search it"
            )
        p = self.progress(dataset_id)
        if p["ready"] == 0:
            raise NotReadyError(
                f"dataset {dataset_id} has no embeddings yet "
                f"({p['indexed'] + p['embedding']} samples waiting for them)"
            )
        return self.dataset(dataset_id)

    def _search_lock(self, dataset_id: int) -> threading.Lock:
        with self._lock:
            return self._search_locks.setdefault(dataset_id, threading.Lock())

    def search(self, dataset_id: int, text: str, *, k: int) -> list[dict[str, Any]]:
        if not text.strip():
            raise InvalidArgumentError("q: empty query")
        ds = self._searchable(dataset_id)
        with self._search_lock(dataset_id):
            hits = ds.search(text, k=k)
        return [{**sample_json(s.to_dict()), "score": float(score)} for s, score in hits]

    def similar(self, dataset_id: int, sample_id: int, *, k: int) -> list[dict[str, Any]]:
        row = self.sample_row(sample_id)
        if row["dataset_id"] != dataset_id:
            raise NotFoundError(f"no sample {sample_id} in dataset {dataset_id}")
        ds = self._searchable(dataset_id)
        if row["status"] != "ready":
            raise NotReadyError(f"sample {sample_id} has no embedding yet (it is {row['status']})")
        with self._search_lock(dataset_id):
            hits = ds.similar(sample_id, k=k)
        return [{**sample_json(s.to_dict()), "score": float(score)} for s, score in hits]

    # -- indexing ---------------------------------------------------------------------------
    def _resolve_embed(self, embed: bool | None) -> EmbeddingModel | bool | None:
        if embed is False:
            return False
        if self.embed_model is not None:
            return self.embed_model
        return embed

    def _open_or_create(self, name: str) -> tuple[Dataset, bool]:
        store = _core.Store(self.db)  # the scan holds its connection for as long as it runs
        for _ in range(3):
            row = store.find_dataset(name)
            if row is not None:
                return Dataset(store, row[0], row[1]), False
            with contextlib.suppress(DatasetExistsError):  # another request created it
                dataset_id = store.create_dataset(name)
                return Dataset(store, dataset_id, name.strip()), True
        raise DatasetExistsError(f"dataset {name!r} is being created by another request")

    def start_indexing(
        self,
        *,
        name: str,
        images_path: str,
        annotations_json: str | None,
        embed: bool | None,
    ) -> IndexTask:
        """Check the arguments, then run phase 1 in a thread (the pipeline does the rest).

        Adding to an existing dataset name adds the files it does not have yet.

        Raises:
            PathNotFoundError: `images_path` or `annotations_json` does not exist.
            InvalidArgumentError: a path is of the wrong kind, or the name is unusable.
        """
        if not images_path:
            raise InvalidArgumentError("images_path: empty")
        if not os.path.exists(images_path):
            raise PathNotFoundError(f"images_path: {images_path} does not exist")
        if not os.path.isdir(images_path):
            raise InvalidArgumentError(f"images_path: {images_path} is not a folder")
        if annotations_json is not None:
            if not os.path.exists(annotations_json):
                raise PathNotFoundError(f"annotations_json: {annotations_json} does not exist")
            if not os.path.isfile(annotations_json):
                raise InvalidArgumentError(f"annotations_json: {annotations_json} is not a file")
        ds, _ = self._open_or_create(name)
        model = self._resolve_embed(embed)
        with self._lock:
            task = IndexTask(
                id=next(self._task_ids),
                dataset_id=ds.id,
                kind="coco" if annotations_json is not None else "folder",
                source=annotations_json if annotations_json is not None else images_path,
            )
            self.tasks[task.id] = task
            self._scanning[ds.id] += 1
            t = threading.Thread(
                target=self._index,
                args=(task, ds, images_path, annotations_json, model),
                name=f"fastindex-scan-{ds.id}",
                daemon=True,
            )
            self._threads = [x for x in self._threads if x.is_alive()] + [t]
        t.start()
        return task

    def _index(
        self,
        task: IndexTask,
        ds: Dataset,
        images_path: str,
        annotations_json: str | None,
        model: EmbeddingModel | bool | None,
    ) -> None:
        try:
            if annotations_json is not None:
                job = ds.add_samples_from_coco(
                    annotations_json=annotations_json, images_path=images_path, embed=model
                )
            else:
                job = ds.add_images_from_path(images_path, embed=model)
            task.job_id, task.summary, task.state = job.id, job.summary, "started"
            self._scan_errors.pop(ds.id, None)
        except Exception as e:  # phase 1 stopped: say why in the task and the progress
            msg = str(e) if isinstance(e, FastIndexError) else f"{type(e).__name__}: {e}"
            task.error, task.state = msg, "failed"
            self._scan_errors[ds.id] = msg
            log.warning("indexing %s for dataset %s stopped: %s", task.source, ds.id, msg)
        finally:
            with self._lock:
                self._scanning[ds.id] -= 1

    def task(self, task_id: int) -> dict[str, Any]:
        """What one `start_indexing` did: phase 1's summary and its rows' progress."""
        task = self.tasks.get(task_id)
        if task is None:
            raise NotFoundError(f"no task group with id {task_id}")
        out = task.to_dict()
        out["progress"] = None
        if task.job_id is not None:
            p = progress_of(
                self.store(), task.dataset_id, task.job_id, self.pipeline(task.dataset_id)
            )
            out["progress"] = public_progress(p)
        return out

    def close(self, *, cancel: bool = True, timeout: float = 10.0) -> None:
        """Wait for the scans this server started; with `cancel`, stop their pipelines."""
        deadline = time.monotonic() + timeout
        for t in list(self._threads):
            t.join(max(0.0, deadline - time.monotonic()))
        if cancel:
            with self._lock:
                ids = {task.dataset_id for task in self.tasks.values()} | self._resumed
            for dataset_id in ids:
                left = max(0.0, deadline - time.monotonic())
                self.pipeline(dataset_id).cancel(left)
