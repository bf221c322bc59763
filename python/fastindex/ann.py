"""The approximate index behind search past `FASTINDEX_ANN_MIN` vectors: faiss IVF with 8-bit
scalar-quantised codes (`IVF{nlist},SQ8`, inner product).

Why IVF-SQ8 (measured on this project's 2-core CI machine, 1M clustered 512-d vectors,
`benches/scale/search.py` for 10M): HNSW's build is hours at 10M on 2 cores and holds its own
float32 copy; IVF-flat would be a float32 copy (20 GB at 10M x 512); IVF-PQ codes are smaller
but rank poorly enough that recall@10 after reranking 100 candidates was 0.60 (PQ64, whose
training took 460 s) and 0.43 (4-bit fast-scan PQ64x4) on the same data, while IVF-SQ8 kept
recall 1.0 at nprobe 8-64 for 1 byte per value (5 GB at 10M x 512, beside the 10 GB float16
copy the exact engine holds). The candidates are reranked exactly against that float16
copy, so scores match exact search's. At 10M x 512 the built index took 6.5 GiB (4.8 GiB of
codes; faiss's inverted lists grow by doubling), the whole search 17.3 GiB at its peak.

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
        for start in range(0, n, CHUNK):
            self.add(to_f32(span(start, min(n, start + CHUNK))))

    def add(self, x32: np.ndarray) -> None:
        self.index.add(np.ascontiguousarray(x32, dtype=np.float32))

    def candidates(self, q: np.ndarray, r: int) -> np.ndarray:
        """Positions of about the `r` best rows for `q` (approximate)."""
        _, i = self.index.search(np.ascontiguousarray(q[None, :], dtype=np.float32), r)
        found: np.ndarray = i[0][i[0] >= 0]
        return found


__all__ = ["ANN_MIN_DEFAULT", "AnnIndex", "ann_min", "nlist_for", "nprobe"]
