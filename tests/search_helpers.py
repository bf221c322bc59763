"""Stores full of synthetic embeddings for the search-at-scale tests: rows written with SQL
(no images, no model), vectors clustered like CLIP's rather than uniform noise."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import fastindex
import numpy as np
from fastindex import testing
from fastindex.search import VectorIndex


def clustered(n: int, dim: int, *, start: int = 0) -> np.ndarray:
    """`testing.clustered` (200 clusters)."""
    return np.asarray(testing.clustered(n, dim, start=start))


def new_dataset(db: Path, name: str = "vec", dim: int = 64) -> tuple[fastindex.Dataset, int]:
    """A dataset and a registered model of `dim`; returns `(dataset, model id)`."""
    ds = fastindex.Dataset.create(name, db=db)
    return ds, ds._store.register_model(f"synthetic-{dim}", "", dim)


_INSERT = """
import sqlite3, sys, time
import numpy as np
db, dataset, model, path = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
x16 = np.load(path)
con = sqlite3.connect(db, timeout=30)
with con:
    root = con.execute(
        "INSERT INTO roots (dataset_id, path) VALUES (?, '/synthetic')"
        " ON CONFLICT DO UPDATE SET path = path RETURNING id", (dataset,)).fetchone()[0]
    job = con.execute(
        "INSERT INTO jobs (dataset_id, kind, source, created_at) VALUES (?, 'add', ?, ?)"
        " RETURNING id", (dataset, "/synthetic", time.time())).fetchone()[0]
    first = con.execute("SELECT coalesce(max(id), 0) + 1 FROM samples").fetchone()[0]
    ids = range(first, first + len(x16))
    con.executemany(
        "INSERT INTO samples (id, dataset_id, job_id, root_id, path, status)"
        " VALUES (?, ?, ?, ?, ?, 'ready')", ((i, dataset, job, root, f"{i}.jpg") for i in ids))
    con.executemany(
        "INSERT INTO embeddings (model_id, sample_id, vector) VALUES (?, ?, ?)",
        ((model, i, v.tobytes()) for i, v in zip(ids, x16)))
con.close()
print(first)
"""


def insert_vectors(ds: fastindex.Dataset, model_id: int, x16: np.ndarray) -> list[int]:
    """Add `len(x16)` `ready` samples with these float16 embeddings, by SQL in a child
    process (a second SQLite library in this process would break the store's locks), in one
    transaction; returns their sample ids."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "x.npy"
        np.save(path, np.ascontiguousarray(x16, dtype="<f2"))
        done = subprocess.run(
            [sys.executable, "-I", "-c", _INSERT, ds.db, str(ds.id), str(model_id), str(path)],
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
    assert done.returncode == 0, done.stderr
    first = int(done.stdout)
    return list(range(first, first + len(x16)))


_READ = """
import sqlite3, sys
con = sqlite3.connect(f"file:{sys.argv[1]}?mode=ro", uri=True)
rows = con.execute(
    "SELECT e.sample_id, e.vector FROM embeddings e JOIN samples s ON s.id = e.sample_id"
    " WHERE e.model_id = ? AND s.dataset_id = ? ORDER BY e.id",
    (int(sys.argv[3]), int(sys.argv[2])),
)
for i, v in rows:
    print(i, v.hex())
"""


def read_by_sql(ds: fastindex.Dataset, model_id: int) -> tuple[list[int], bytes]:
    """`(sample ids, float16 bytes)` of the dataset's embeddings, read by Python's sqlite3 in
    a child process (an oracle independent of the Rust reader)."""
    done = subprocess.run(
        [sys.executable, "-I", "-c", _READ, ds.db, str(ds.id), str(model_id)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    pairs = [line.split() for line in done.stdout.splitlines()]
    return [int(i) for i, _ in pairs], b"".join(bytes.fromhex(v) for _, v in pairs)


def vector_index(
    ds: fastindex.Dataset, model_id: int, dim: int, *, ann_min: int = 0
) -> VectorIndex:
    """An index over the dataset's vectors by `model_id` (the tiny model only names it)."""
    return VectorIndex(ds, testing.tiny_model(), model_id, dim, ann_min=ann_min)


def recall_at(found: list[list[int]], truth: list[list[int]], k: int = 10) -> float:
    return float(
        np.mean([len(set(f[:k]) & set(t[:k])) / k for f, t in zip(found, truth, strict=True)])
    )
