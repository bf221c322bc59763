"""Exact top-k search over 1M x 512 normalised vectors on this CPU: numpy against the
libraries worth considering, one query at a time (what `Dataset.search` does).

    python benches/bench_search.py [--n 1000000] [--dim 512] [--queries 20]

faiss-cpu and usearch are measured when installed (`pip install faiss-cpu usearch`); they are
not dependencies of fastindex. Every method's top 10 is checked against numpy's.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np


def _timeit(fn: Callable[[np.ndarray], np.ndarray], queries: np.ndarray) -> float:
    fn(queries[0])  # warm up
    t = time.perf_counter()
    for q in queries:
        fn(q)
    return (time.perf_counter() - t) / len(queries)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--queries", type=int, default=20)
    ap.add_argument("--k", type=int, default=20)
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((a.n, a.dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    x16 = x.astype(np.float16)
    x = x16.astype(np.float32)  # what the store gives back: float16 values
    qs = x[rng.integers(0, a.n, a.queries)] + 0.05 * rng.standard_normal(
        (a.queries, a.dim), dtype=np.float32
    )
    qs /= np.linalg.norm(qs, axis=1, keepdims=True)
    k = a.k
    rows: list[tuple[str, float, str]] = []

    def np_top(q: np.ndarray) -> np.ndarray:
        s = x @ q
        i = np.argpartition(s, -k)[-k:]
        return i[np.argsort(-s[i])]

    truth = [set(np_top(q)[:10].tolist()) for q in qs]

    def check(fn: Callable[[np.ndarray], np.ndarray]) -> str:
        ok = all(set(np.asarray(fn(q))[:10].tolist()) == t for q, t in zip(qs, truth, strict=True))
        return "same top 10" if ok else "DIFFERS"

    rows.append(("numpy float32 matmul + argpartition", _timeit(np_top, qs), "reference"))

    import torch

    xt = torch.from_numpy(x)

    def torch_top(q: np.ndarray) -> np.ndarray:
        s = xt @ torch.from_numpy(q)
        return torch.topk(s, k).indices.numpy()

    rows.append(
        (
            f"torch float32 mv + topk ({torch.get_num_threads()} threads)",
            _timeit(torch_top, qs),
            check(torch_top),
        )
    )

    try:
        import faiss  # type: ignore[import-not-found]

        flat = faiss.IndexFlatIP(a.dim)
        flat.add(x)

        def faiss_top(q: np.ndarray) -> np.ndarray:
            return flat.search(q[None, :], k)[1][0]

        rows.append(
            (
                f"faiss {faiss.__version__} IndexFlatIP float32",
                _timeit(faiss_top, qs),
                check(faiss_top),
            )
        )
        sq = faiss.IndexScalarQuantizer(
            a.dim, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT
        )
        sq.train(x[:1000])
        sq.add(x)

        def faiss_sq_top(q: np.ndarray) -> np.ndarray:
            return sq.search(q[None, :], k)[1][0]

        rows.append(
            ("faiss IndexScalarQuantizer fp16", _timeit(faiss_sq_top, qs), check(faiss_sq_top))
        )
    except ImportError:
        rows.append(("faiss-cpu", float("nan"), "not installed"))

    try:
        import usearch  # type: ignore[import-not-found]
        from usearch.index import MetricKind, search  # type: ignore[import-not-found]

        for name, arr in (("float16", x16), ("float32", x)):

            def us_top(q: np.ndarray, arr: np.ndarray = arr) -> np.ndarray:
                m = search(arr, q.astype(arr.dtype), k, MetricKind.IP, exact=True)
                return np.asarray(m.keys)

            rows.append(
                (f"usearch {usearch.__version__} exact {name}", _timeit(us_top, qs), check(us_top))
            )
    except ImportError:
        rows.append(("usearch", float("nan"), "not installed"))

    print(f"\nexact top-{k} of {a.n:,} x {a.dim} vectors, one query at a time, mean of {a.queries}")
    print(f"{'method':<48} {'ms/query':>10}  check")
    for name, t, note in rows:
        print(f"{name:<48} {t * 1000:>10.1f}  {note}")


if __name__ == "__main__":
    main()
