"""Exact vector search over a dataset's embeddings: text -> image and image -> image.

The vectors live in the store (float16, one row per sample and model); a `VectorIndex` keeps
them in memory, reads only the rows added since its last look before each query, and scores
every vector against the query (normalised dot product: no approximation, no training).

Two engines, picked by `BACKEND` (environment `FASTINDEX_SEARCH`, `auto` by default):

- `faiss`: faiss-cpu's `IndexScalarQuantizer` with float16 codes. The store's bytes are the
  codes, so loading is a copy; memory is 2 bytes per value; the scan is SIMD float16 with
  float32 sums. Measured on the 2-core CPU of CI (AVX, no AVX2), 1M x 512: 56 ms a query.
- `numpy`: a float32 matrix and one BLAS matrix-vector product, then `argpartition`. No extra
  dependency; 4 bytes per value; 306 ms a query on the same machine.

`auto` takes faiss when it imports. `benches/bench_search.py` measures both, and usearch.
"""

from __future__ import annotations

import json
import os
import threading
from typing import TYPE_CHECKING

import numpy as np

from .errors import InvalidArgumentError, NoEmbeddingsError

if TYPE_CHECKING:
    from . import _core
    from .dataset import Dataset
    from .embed import EmbeddingModel
    from .sample import Sample

#: `auto`, `faiss` or `numpy` (see the module's documentation).
BACKEND = os.environ.get("FASTINDEX_SEARCH", "auto")


def _to_f32(x16: np.ndarray) -> np.ndarray:
    """float16 -> float32; torch's conversion is 10x numpy's where F16C has no AVX2."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch comes with the [embed] extra
        return x16.astype(np.float32)
    if not x16.flags.writeable or not x16.flags.c_contiguous:
        x16 = x16.copy()  # torch warns about read-only memory (the store's bytes)
    return torch.from_numpy(x16).float().numpy()


class _NumpyEngine:
    name = "numpy"

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.n = 0
        self.x = np.empty((0, dim), np.float32)

    def add(self, x16: np.ndarray) -> None:
        need = self.n + len(x16)
        if need > len(self.x):
            grown = np.empty((max(need, 2 * len(self.x), 1024), self.dim), np.float32)
            grown[: self.n] = self.x[: self.n]
            self.x = grown
        self.x[self.n : need] = _to_f32(x16)
        self.n = need

    def scores(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        s = self.x[: self.n] @ q
        top = np.argpartition(s, -k)[-k:] if k < self.n else np.arange(self.n)
        return s[top], top

    def vectors(self) -> np.ndarray:
        return self.x[: self.n]


class _FaissEngine:
    name = "faiss"

    def __init__(self, dim: int) -> None:
        import faiss  # type: ignore[import-untyped, import-not-found, unused-ignore]

        self.faiss = faiss
        self.dim = dim
        self.index = faiss.IndexScalarQuantizer(
            dim, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT
        )

    @property
    def n(self) -> int:
        return int(self.index.ntotal)

    def add(self, x16: np.ndarray) -> None:
        # A float16 code is the little-endian float16 value: the store's bytes as they are.
        codes = np.ascontiguousarray(x16, dtype="<f2").view(np.uint8).reshape(len(x16), -1)
        self.index.add_sa_codes(codes)

    def scores(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        d, i = self.index.search(np.ascontiguousarray(q[None, :], dtype=np.float32), k)
        keep = i[0] >= 0
        return d[0][keep], i[0][keep]

    def vectors(self) -> np.ndarray:
        n = self.n
        if n == 0:
            return np.empty((0, self.dim), np.float32)
        raw = self.faiss.rev_swig_ptr(self.index.codes.data(), n * self.dim * 2)
        return _to_f32(np.frombuffer(raw, dtype="<f2").reshape(n, self.dim))


def _engine(dim: int) -> _NumpyEngine | _FaissEngine:
    if BACKEND not in ("auto", "faiss", "numpy"):
        raise InvalidArgumentError(
            f"FASTINDEX_SEARCH={BACKEND!r}: expected 'auto', 'faiss' or 'numpy'"
        )
    if BACKEND != "numpy":
        try:
            return _FaissEngine(dim)
        except ImportError:
            if BACKEND == "faiss":
                raise InvalidArgumentError(
                    "FASTINDEX_SEARCH=faiss but faiss does not import: pip install faiss-cpu"
                ) from None
    return _NumpyEngine(dim)


class VectorIndex:
    """The embeddings of one dataset by one model, in memory, for exact search.

    Safe to share between threads. Each query first reads what the store gained since the
    last one (`refresh`), so results include samples embedded a moment ago.
    """

    def __init__(self, dataset: Dataset, model: EmbeddingModel, model_id: int, dim: int) -> None:
        self.dataset = dataset
        self.model = model
        self.model_id = model_id
        self.dim = dim
        self._store: _core.Store = dataset._store
        self._lock = threading.Lock()
        self._cursor = 0
        self._ids = np.empty(0, np.int64)
        self._n = 0
        self._engine = _engine(dim)

    def __len__(self) -> int:
        return self._n

    @property
    def backend(self) -> str:
        """`faiss` or `numpy`."""
        return self._engine.name

    def refresh(self) -> int:
        """Read the embeddings stored since the last refresh; returns how many came."""
        with self._lock:
            cursor, ids, blob = self._store.load_embeddings(
                self.dataset.id, self.model_id, after=self._cursor
            )
            if not ids:
                return 0
            # One row per (model, sample) in the store, and an upsert keeps its row id: a
            # sample is never read twice.
            x16 = np.frombuffer(blob, dtype="<f2").reshape(len(ids), self.dim)
            self._engine.add(x16)
            need = self._n + len(ids)
            if need > len(self._ids):
                grown = np.empty(max(need, 2 * len(self._ids), 1024), np.int64)
                grown[: self._n] = self._ids[: self._n]
                self._ids = grown
            self._ids[self._n : need] = ids
            self._n = need
            self._cursor = int(cursor)
            return len(ids)

    def snapshot(self) -> tuple[np.ndarray, np.ndarray]:
        """`(ids, vectors)`: sample ids (int64) and their L2-normalised float32 embeddings
        `(n, dim)`, in the order they were stored. Copies."""
        self.refresh()
        with self._lock:
            ids = self._ids[: self._n].copy()
            v = np.array(self._engine.vectors(), dtype=np.float32, copy=True)
        # Stored as float16: normalise again so that every norm is 1 to float32 precision.
        norms = np.linalg.norm(v, axis=1, keepdims=True)
        np.divide(v, norms, out=v, where=norms > 0)
        return ids, v

    def search_vector(self, query: np.ndarray, k: int = 20) -> list[tuple[int, float]]:
        """`[(sample id, score)]`, best first: the `k` stored vectors with the highest dot
        product with `query` (exact; ties go to the lower sample id)."""
        k = _check_k(k)
        q = np.asarray(query, dtype=np.float32).reshape(-1)
        if q.shape[0] != self.dim:
            raise InvalidArgumentError(f"query has {q.shape[0]} values, the index {self.dim}")
        self.refresh()
        with self._lock:
            if self._n == 0:
                raise NoEmbeddingsError(
                    f"dataset {self.dataset.name!r} has no embeddings by {self.model!r} yet"
                )
            scores, pos = self._engine.scores(q, min(k, self._n))
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
            hit = np.flatnonzero(self._ids[: self._n] == sample.id)
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
            engine = self._engine
            if isinstance(engine, _FaissEngine):
                return np.asarray(engine.index.reconstruct(pos), dtype=np.float32)
            return np.array(engine.vectors()[pos], dtype=np.float32)

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
    if model is None:
        model = dataset.embedding_model()
        if model is None:
            raise NoEmbeddingsError(
                f"dataset {dataset.name!r} has no embedding model: add images with embed=... "
                "or call dataset.embed()"
            )
    model = _shared_model(model)
    key = (os.path.realpath(dataset.db), dataset.id, model.key_name, model.key_pretrained)
    with _cache_lock:
        index = _indexes.get(key)
    if index is not None:
        return index
    model_id = None
    for mid, name, pretrained, dim in dataset._store.models():
        if (name, pretrained) == (model.key_name, model.key_pretrained):
            model_id, model_dim = int(mid), int(dim)
    if model_id is None:
        raise NoEmbeddingsError(
            f"dataset {dataset.name!r} has no embeddings by {model!r}: embed with it first "
            "(dataset.embed(model))"
        )
    with _cache_lock:
        return _indexes.setdefault(key, VectorIndex(dataset, model, model_id, model_dim))


def clear_cache() -> None:
    """Forget the cached indexes and models (frees their memory)."""
    with _cache_lock:
        _indexes.clear()
        _models.clear()


__all__ = ["BACKEND", "VectorIndex", "clear_cache", "index_for"]
