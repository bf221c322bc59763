"""The approximate index behind search past `FASTINDEX_ANN_MIN` vectors: faiss IVF with 8-bit
scalar-quantised codes (`IVF{nlist},SQ8`, inner product).

Why IVF-SQ8 (measured on this project's 2-core CI machine, 1M clustered 512-d vectors,
`benches/scale/search.py` for 10M): HNSW's build is hours at 10M on 2 cores and holds its own
float32 copy; IVF-flat would be a float32 copy (20 GB at 10M x 512); IVF-PQ codes are smaller
but rank poorly enough that recall@10 after reranking 100 candidates was 0.60 (PQ64, whose
training took 460 s) and 0.43 (4-bit fast-scan PQ64x4) on the same data, while IVF-SQ8 kept
recall 1.0 at nprobe 8-64 for 1 byte per value (5 GB at 10M x 512, beside the 10 GB float16
copy the exact engine holds). The candidates are reranked exactly against that float16
copy, so scores match exact search's. At 10M x 512 the codes take 4.8 GiB: every row's list
is found first and each list sized once (added row by row, faiss's lists grow by doubling and
wasted ~1.5 GiB there).

Built from the float16 rows in chunks (float32 only for one chunk at a time); the caller runs
`build` in a background thread (faiss releases the GIL) and adds later rows with `add`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable

import numpy as np

#: Past this many vectors, search builds an approximate index in the background.
ANN_MIN_DEFAULT = 2_000_000
#: Rows converted to float32 at a time while building (128 MiB at 512-d).
CHUNK = 65536


def ann_min() -> int:
    """`FASTINDEX_ANN_MIN` (default 2,000,000); 0 turns approximate search off."""
    raw = os.environ.get("FASTINDEX_ANN_MIN", "")
    try:
        return int(raw) if raw.strip() else ANN_MIN_DEFAULT
    except ValueError:
        return ANN_MIN_DEFAULT


def nprobe() -> int:
    """Inverted lists visited per query (`FASTINDEX_ANN_NPROBE`, default 16)."""
    raw = os.environ.get("FASTINDEX_ANN_NPROBE", "")
    return max(1, int(raw)) if raw.strip().isdigit() else 16


def nlist_for(n: int) -> int:
    """Lists for `n` vectors: a power of two near sqrt(n) / 3, 16 to 1024. Fewer lists than
    the usual 4 sqrt(n) because assigning every vector to a list is the build's cost on
    2 cores (10M x 1024 x 512 multiply-adds); nprobe 16 keeps a query under 50 ms."""
    target = math.sqrt(max(n, 1)) / 3
    return int(min(1024, max(16, 2 ** round(math.log2(max(target, 1))))))


class AnnIndex:
    """IVF-SQ8 over positions 0..n-1 of the caller's rows (faiss ids are positions)."""

    def __init__(self, dim: int, n: int) -> None:
        import faiss  # type: ignore[import-untyped, import-not-found, unused-ignore]

        self.dim = dim
        self.nlist = nlist_for(n)
        self.index = faiss.index_factory(dim, f"IVF{self.nlist},SQ8", faiss.METRIC_INNER_PRODUCT)
        faiss.extract_index_ivf(self.index).nprobe = nprobe()

    @property
    def n(self) -> int:
        return int(self.index.ntotal)

    def build(
        self,
        n: int,
        take: Callable[[np.ndarray], np.ndarray],
        span: Callable[[int, int], np.ndarray],
        to_f32: Callable[[np.ndarray], np.ndarray],
    ) -> None:
        """Train on an even sample of the first `n` rows and add them, a chunk at a time.
        `take(positions)` and `span(start, stop)` give float16 rows."""
        sample = min(n, self.nlist * 50, 131072)
        train = to_f32(take(np.linspace(0, n - 1, sample).astype(np.int64)))
        self.index.train(train)
        del train
        import faiss  # type: ignore[import-untyped, import-not-found, unused-ignore]

        ivf = faiss.extract_index_ivf(self.index)
        lists = None if ivf.invlists is None else faiss.downcast_InvertedLists(ivf.invlists)
        if lists is None or not (hasattr(lists, "resize") and hasattr(ivf, "add_core")):
            for start in range(0, n, CHUNK):  # another faiss: lists grow as they fill
                self.add(to_f32(span(start, min(n, start + CHUNK))))
            return
        # Every row's list first, then each list sized once: added row by row, faiss's lists
        # grow by doubling and waste up to half their codes (~1.5 GiB at 10M x 512).
        assign = np.empty(n, np.int64)
        for start in range(0, n, CHUNK):
            stop = min(n, start + CHUNK)
            assign[start:stop] = ivf.quantizer.assign(to_f32(span(start, stop)), 1).ravel()
        for i, size in enumerate(np.bincount(assign, minlength=self.nlist).tolist()):
            lists.resize(i, size)  # allocates exactly...
            lists.resize(i, 0)  # ...and keeps that capacity for the rows added next
        for start in range(0, n, CHUNK):
            stop = min(n, start + CHUNK)
            x = np.ascontiguousarray(to_f32(span(start, stop)), dtype=np.float32)
            ids = np.arange(start, stop, dtype=np.int64)
            part = assign[start:stop]
            ivf.add_core(stop - start, faiss.swig_ptr(x), faiss.swig_ptr(ids), faiss.swig_ptr(part))

    def add(self, x32: np.ndarray) -> None:
        self.index.add(np.ascontiguousarray(x32, dtype=np.float32))

    def candidates(self, q: np.ndarray, r: int) -> np.ndarray:
        """Positions of about the `r` best rows for `q` (approximate)."""
        _, i = self.index.search(np.ascontiguousarray(q[None, :], dtype=np.float32), r)
        found: np.ndarray = i[0][i[0] >= 0]
        return found


__all__ = ["ANN_MIN_DEFAULT", "AnnIndex", "ann_min", "nlist_for", "nprobe"]
