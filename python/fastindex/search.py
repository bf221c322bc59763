"""Vector search over a dataset's embeddings: text -> image and image -> image.

The vectors live in the store (float16, one row per sample and model). A `VectorIndex` keeps
one float16 copy of them in memory, read from the store in chunks straight into preallocated
segments (`_core.Store.read_embeddings`: no intermediate bytes object, no second copy: 10 GB
at 10M x 512), reads only the rows added since its last look before each query, and answers:

- **exact** (the default while the dataset is small): every vector scored against the query
  (normalised dot product: no approximation, no training);
- **approximate** past `FASTINDEX_ANN_MIN` vectors (default 2,000,000; 0 turns it off): an
  IVF-SQ8 faiss index (`fastindex.ann`, 1 byte per value) is built in a background thread
  from the same float16 rows; exact search answers until it is ready, then the index proposes
  candidates that are reranked exactly against the float16 rows. Rows added later go into
  both. `VectorIndex.mode` says which one answers, `ann_state` how the build goes.

Two exact engines, picked by `BACKEND` (environment `FASTINDEX_SEARCH`, `auto` by default):

- `faiss`: faiss-cpu's `IndexScalarQuantizer` with float16 codes, one per segment; the
  segment's float16 rows are the index's codes (the store's bytes land there directly), so
  memory is 2 bytes per value and the scan is SIMD float16 with float32 sums.
  Measured on the 2-core CPU of CI, 1M x 512: 56 ms a query.
- `numpy`: float16 segments converted to float32 a chunk at a time for a BLAS
  matrix-vector product, then `argpartition`. No extra dependency; slower.

`auto` takes faiss when it imports. `benches/bench_search.py` and `benches/scale/search.py`
measure them.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from .ann import CHUNK, AnnIndex
from .ann import ann_min as _ann_min
from .errors import InvalidArgumentError, NoEmbeddingsError
from .vectors import dataset_model, normalise, stored_model, to_f32

if TYPE_CHECKING:
    from . import _core
    from .dataset import Dataset
    from .embed import EmbeddingModel
    from .sample import Sample

#: `auto`, `faiss` or `numpy` (see the module's documentation).
BACKEND = os.environ.get("FASTINDEX_SEARCH", "auto")

log = logging.getLogger("fastindex.search")


def _top(s: np.ndarray, k: int) -> np.ndarray:
    return np.argpartition(s, -k)[-k:] if k < len(s) else np.arange(len(s))


class _Rows:
    """The float16 vectors, in segments that never move once allocated (a background build
    reads them without the lock). A segment is sized for what a refresh is about to read,
    at least `CHUNK` rows and n/16, so top-ups waste little and rarely add a segment."""

    name = "numpy"

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.arrs: list[np.ndarray] = []
        self.fills: list[int] = []
        self.starts: list[int] = []
        self.owners: list[Any] = []
        self.n = 0

    def _segment(self, cap: int) -> tuple[np.ndarray, Any]:
        return np.zeros((cap, self.dim), "<f2"), None

    def reserve(self, extra: int) -> None:
        if self.arrs and len(self.arrs[-1]) - self.fills[-1] >= min(extra, CHUNK):
            return
        arr, owner = self._segment(max(extra, CHUNK, self.n // 16))
        self.owners.append(owner)  # what holds the memory `arr` views (faiss)
        self.arrs.append(arr)  # before starts: a reader indexes arrs by starts
        self.fills.append(0)
        self.starts.append(self.n)

    def tail(self) -> np.ndarray:
        """The last segment's free rows (a view to read into)."""
        return self.arrs[-1][self.fills[-1] :]

    def commit(self, rows: int) -> None:
        self.fills[-1] += rows
        self.n += rows

    def take(self, pos: np.ndarray) -> np.ndarray:
        """Rows at positions `pos` (a copy)."""
        starts = np.asarray(self.starts, np.int64)
        seg = np.searchsorted(starts, pos, side="right") - 1
        out = np.empty((len(pos), self.dim), "<f2")
        for s in np.unique(seg):
            hit = seg == s
            out[hit] = self.arrs[int(s)][pos[hit] - starts[s]]
        return out

    def span(self, start: int, stop: int) -> np.ndarray:
        """Rows `start..stop`: a view when they lie in one segment."""
        parts = []
        for arr, first, fill in zip(self.arrs, self.starts, self.fills, strict=False):
            lo, hi = max(start, first), min(stop, first + fill)
            if lo < hi:
                parts.append(arr[lo - first : hi - first])
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def scores(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The `k` best `(scores, positions)`, unordered."""
        best_s, best_p = [np.empty(0, np.float32)], [np.empty(0, np.int64)]
        for start in range(0, self.n, CHUNK):
            s = to_f32(self.span(start, min(self.n, start + CHUNK))) @ q
            top = _top(s, k)
            best_s.append(s[top])
            best_p.append(top + start)
        s, p = np.concatenate(best_s), np.concatenate(best_p)
        top = _top(s, k)
        return s[top], p[top]


class _FaissRows(_Rows):
    """Each segment is a faiss `IndexScalarQuantizer` (float16 codes) whose codes are
    allocated once, at the segment's size; the segment's array is a view of them."""

    name = "faiss"

    def __init__(self, dim: int) -> None:
        import faiss  # type: ignore[import-untyped, import-not-found, unused-ignore]

        super().__init__(dim)
        self.faiss = faiss

    def _segment(self, cap: int) -> tuple[np.ndarray, Any]:
        faiss = self.faiss
        index = faiss.IndexScalarQuantizer(
            self.dim, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT
        )
        nbytes = cap * self.dim * 2
        index.codes.resize(nbytes)
        # A float16 code is the little-endian float16 value: the store's bytes as they are.
        arr = faiss.rev_swig_ptr(index.codes.data(), nbytes).view("<f2").reshape(cap, self.dim)
        return arr, index

    def commit(self, rows: int) -> None:
        super().commit(rows)
        self.owners[-1].ntotal = self.fills[-1]

    def scores(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        q32 = np.ascontiguousarray(q[None, :], dtype=np.float32)
        ss, ps = [], []
        for index, first, fill in zip(self.owners, self.starts, self.fills, strict=False):
            if fill:
                d, i = index.search(q32, min(k, fill))
                keep = i[0] >= 0
                ss.append(d[0][keep])
                ps.append(i[0][keep] + first)
        s, p = np.concatenate(ss), np.concatenate(ps)
        top = _top(s, k)
        return s[top], p[top]


def _rows(dim: int) -> _Rows:
    if BACKEND not in ("auto", "faiss", "numpy"):
        raise InvalidArgumentError(
            f"FASTINDEX_SEARCH={BACKEND!r}: expected 'auto', 'faiss' or 'numpy'"
        )
    if BACKEND != "numpy":
        try:
            return _FaissRows(dim)
        except ImportError:
            if BACKEND == "faiss":
                raise InvalidArgumentError(
                    "FASTINDEX_SEARCH=faiss but faiss does not import: pip install faiss-cpu"
                ) from None
    return _Rows(dim)


class VectorIndex:
    """The embeddings of one dataset by one model, in memory, for search.

    Safe to share between threads. Each query first reads what the store gained since the
    last one (`refresh`), so results include samples embedded a moment ago.
    """

    #: Called by the background build once its index holds the rows it started with, before
    #: it takes the lock to catch up and switch (tests hold the build here).
    _before_switch: Callable[[], object] | None = None

    def __init__(
        self,
        dataset: Dataset,
        model: EmbeddingModel,
        model_id: int,
        dim: int,
        *,
        ann_min: int | None = None,
    ) -> None:
        self.dataset = dataset
        self.model = model
        self.model_id = model_id
        self.dim = dim
        self._store: _core.Store = dataset._store
        self._lock = threading.Lock()
        self._cursor = 0
        self._ids = np.empty(0, np.int64)
        self._rows = _rows(dim)
        #: Vectors past which an approximate index is built (0: never).
        self.ann_min = _ann_min() if ann_min is None else int(ann_min)
        self._ann: AnnIndex | None = None
        self._ann_state = "off"
        self._ann_error: str | None = None
        self._ann_done = threading.Event()

    def __len__(self) -> int:
        return self._rows.n

    @property
    def backend(self) -> str:
        """The exact engine: `faiss` or `numpy`."""
        return self._rows.name

    @property
    def mode(self) -> str:
        """Which search answers now: `exact`, or `ann` once the approximate index is ready."""
        return "ann" if self._ann is not None else "exact"

    @property
    def ann_state(self) -> str:
        """`off` (below `ann_min`), `building`, `ready` or `failed` (exact keeps answering;
        `ann_error` says why)."""
        return self._ann_state

    @property
    def ann_error(self) -> str | None:
        return self._ann_error

    def wait_ann(self, timeout: float | None = None) -> bool:
        """Wait until a started build ends (ready or failed); True if one ended."""
        return self._ann_done.wait(timeout)

    def refresh(self) -> int:
        """Read the embeddings stored since the last refresh; returns how many came.
        Costs O(rows read): the store walks rows after a cursor, in chunks of `CHUNK`."""
        with self._lock:
            store, ds, model = self._store, self.dataset.id, self.model_id
            new = store.count_embeddings(ds, model, after=self._cursor)
            got = self._read(new) if new else 0
            if self._ann_state == "off" and 0 < self.ann_min <= self._rows.n:
                self._start_build()
            return got

    def _read(self, new: int) -> int:
        """Read about `new` rows after the cursor into the segments (the lock is held)."""
        store, ds, model = self._store, self.dataset.id, self.model_id
        rows, n = self._rows, self._rows.n
        if n + new > len(self._ids):
            grown = np.empty(max(n + new, n + n // 16, 1024), np.int64)
            grown[:n] = self._ids[:n]
            self._ids = grown
        got = 0
        while got < new:
            rows.reserve(new - got)
            tail = rows.tail()
            k = min(len(tail), CHUNK, new - got, len(self._ids) - n - got)
            # One row per (model, sample) in the store, and an upsert keeps its row id:
            # a sample is never read twice.
            cursor, m = store.read_embeddings(
                ds, model, self._cursor, self._ids[n + got : n + got + k], tail[:k].view(np.uint8)
            )
            if m == 0:
                break
            rows.commit(m)
            self._cursor = int(cursor)
            if self._ann is not None:
                self._ann.add(to_f32(tail[:m]))
            got += m
        return got

    def _start_build(self) -> None:
        if not isinstance(self._rows, _FaissRows):
            return  # approximate search needs faiss; exact answers
        self._ann_state = "building"
        threading.Thread(
            target=self._build, args=(self._rows.n,), name="fastindex-ann", daemon=True
        ).start()

    def _build(self, n: int) -> None:
        """Background: build over the first `n` rows without the lock (they never move),
        then, under it, add what came meanwhile and switch."""
        try:
            ann = AnnIndex(self.dim, n)
            ann.build(n, self._rows.take, self._rows.span, to_f32)
            if self._before_switch is not None:
                self._before_switch()
            with self._lock:
                for start in range(ann.n, self._rows.n, CHUNK):
                    ann.add(to_f32(self._rows.span(start, min(self._rows.n, start + CHUNK))))
                self._ann = ann
                self._ann_state = "ready"
            log.info("approximate index ready: %d vectors, %d lists", ann.n, ann.nlist)
        except Exception as e:  # exact search keeps answering
            self._ann_state, self._ann_error = "failed", f"{type(e).__name__}: {e}"
            log.warning("approximate index build failed, exact search answers: %s", e)
        finally:
            self._ann_done.set()

    def snapshot(self) -> tuple[np.ndarray, np.ndarray]:
        """`(ids, vectors)`: sample ids (int64) and their L2-normalised float32 embeddings
        `(n, dim)`, in the order they were stored. Copies (4 bytes a value)."""
        self.refresh()
        with self._lock:
            n = self._rows.n
            ids = self._ids[:n].copy()
            v = np.empty((n, self.dim), np.float32)
            for start in range(0, n, CHUNK):
                v[start : start + CHUNK] = to_f32(self._rows.span(start, min(n, start + CHUNK)))
        # Stored as float16: normalise again so that every norm is 1 to float32 precision.
        return ids, normalise(v)

    def search_vector(self, query: np.ndarray, k: int = 20) -> list[tuple[int, float]]:
        """`[(sample id, score)]`, best first: the `k` stored vectors with the highest dot
        product with `query` (ties go to the lower sample id). Exact, or, past `ann_min`
        once the approximate index is ready, its candidates scored exactly."""
        k = _check_k(k)
        q = np.asarray(query, dtype=np.float32).reshape(-1)
        if q.shape[0] != self.dim:
            raise InvalidArgumentError(f"query has {q.shape[0]} values, the index {self.dim}")
        self.refresh()
        with self._lock:
            n = self._rows.n
            if n == 0:
                raise NoEmbeddingsError(
                    f"dataset {self.dataset.name!r} has no embeddings by {self.model!r} yet"
                )
            if self._ann is not None:
                pos = self._ann.candidates(q, min(n, max(4 * k, 64)))
                scores = to_f32(self._rows.take(pos)) @ q
            else:
                scores, pos = self._rows.scores(q, min(k, n))
            ids = self._ids[pos]
        order = np.lexsort((ids, -scores))[:k]
        return [(int(ids[i]), float(scores[i])) for i in order]

    def search_text(self, text: str, k: int = 20) -> list[tuple[Sample, float]]:
        """The `k` samples whose images best match `text`, through the model's text tower."""
        if not isinstance(text, str) or not text.strip():
            raise InvalidArgumentError("search text must be a non-empty string")
        q = self.model.encode_text([text])[0]
        return self._samples(self.search_vector(q, k))

    def search_sample(self, sample_id: int, k: int = 20) -> list[tuple[Sample, float]]:
        """The `k` samples most like `sample_id`, itself first."""
        k = _check_k(k)
        sample = self.dataset.sample(sample_id)  # raises for a sample of another dataset
        self.refresh()
        with self._lock:
            hit = np.flatnonzero(self._ids[: self._rows.n] == sample.id)
            if len(hit) == 0:
                raise NoEmbeddingsError(
                    f"sample {sample.id} ({sample.path}) has no embedding by {self.model!r} "
                    f"yet: its status is {sample.status}"
                    + (f" ({sample.error})" if sample.error else "")
                )
        q = self._vector_of(int(hit[0]))
        found = self.search_vector(q, k + 1)
        # An identical image scores the same as the sample itself: the sample comes first.
        own = [(i, s) for i, s in found if i == sample.id]
        rest = [(i, s) for i, s in found if i != sample.id]
        first = own[0] if own else (sample.id, float(np.dot(q, q)))
        return self._samples([first, *rest][:k])

    def _vector_of(self, pos: int) -> np.ndarray:
        with self._lock:
            row: np.ndarray = to_f32(self._rows.take(np.array([pos], np.int64)))[0]
        return row

    def _samples(self, hits: list[tuple[int, float]]) -> list[tuple[Sample, float]]:
        by_id = {s.id: s for s in self.dataset.samples_by_id([i for i, _ in hits])}
        return [(by_id[i], s) for i, s in hits if i in by_id]


def _check_k(k: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
        raise InvalidArgumentError(f"k must be a positive integer, got {k!r}")
    return int(k)


_indexes: dict[tuple[str, int, str, str], VectorIndex] = {}
_models: dict[str, EmbeddingModel] = {}
_cache_lock = threading.Lock()


def _shared_model(model: EmbeddingModel) -> EmbeddingModel:
    """One loaded instance per model spec in this process (weights load once)."""
    key = json.dumps(model.spec(), sort_keys=True)
    with _cache_lock:
        return _models.setdefault(key, model)


def index_for(dataset: Dataset, model: EmbeddingModel | None = None) -> VectorIndex:
    """The `VectorIndex` of `dataset`'s embeddings by `model` (default: the dataset's model),
    shared by every caller in this process and refreshed before each query.

    Raises:
        NoEmbeddingsError: no model given and the dataset has none, or no embedding by that
            model was ever stored in this store.
    """
    model = _shared_model(dataset_model(dataset, model))
    key = (os.path.realpath(dataset.db), dataset.id, model.key_name, model.key_pretrained)
    with _cache_lock:
        index = _indexes.get(key)
    if index is not None:
        return index  # the store's model table is read once per index, not per query
    model_id, model_dim = stored_model(dataset, model)
    with _cache_lock:
        return _indexes.setdefault(key, VectorIndex(dataset, model, model_id, model_dim))


def clear_cache() -> None:
    """Forget the cached indexes and models (frees their memory)."""
    with _cache_lock:
        _indexes.clear()
        _models.clear()


__all__ = ["BACKEND", "VectorIndex", "clear_cache", "index_for"]
