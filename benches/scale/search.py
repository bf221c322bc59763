"""Search at 10M: synthetic clustered 512-d vectors in a real store, read in chunks, exact
search, the approximate index built in the background, its recall@10 against exact.

The store is a real fastindex store (dataset and model made by fastindex); its 10M sample
and embedding rows are written with Python's sqlite3 (in this parent process, which opens no
fastindex store), because making them through phase 3 would mean embedding 10M images.
Everything measured runs in a fresh child process that reads the store through fastindex.
Needs about 18 GB of RAM at 10M x 512 (peak 17.3 GiB measured): run under
`flock /work/helpers/bigbench.lock`.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from fastindex import testing

Row = tuple[str, str, str, str]
NAME = "vectors"


def add_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("search")
    g.add_argument("--search-n", type=int, default=10_000_000, help="vectors (default 10M)")
    g.add_argument("--search-dim", type=int, default=512)
    g.add_argument("--search-queries", type=int, default=100, help="queries for recall")


def clustered(n: int, dim: int, *, start: int = 0) -> np.ndarray:
    """`testing.clustered` with the 2,000 clusters of a 10M set."""
    return np.asarray(testing.clustered(n, dim, start=start, clusters=2000))


def _fill(db: Path, n: int, dim: int) -> float:
    """Make the store (fastindex, in a child) and write `n` ready rows with vectors."""
    made = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, fastindex; ds = fastindex.Dataset.create(sys.argv[2], db=sys.argv[1]);"
            " print(ds.id, ds._store.register_model('synthetic', 'clustered', int(sys.argv[3])))",
            str(db),
            NAME,
            str(dim),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    dataset, model = (int(v) for v in made.stdout.split())
    t = time.perf_counter()
    con = sqlite3.connect(db)
    con.execute("PRAGMA synchronous=OFF")
    with con:
        root = con.execute(
            "INSERT INTO roots (dataset_id, path) VALUES (?, '/synthetic') RETURNING id",
            (dataset,),
        ).fetchone()[0]
        job = con.execute(
            "INSERT INTO jobs (dataset_id, kind, source, created_at) VALUES (?, 'add', ?, ?)"
            " RETURNING id",
            (dataset, "/synthetic", time.time()),
        ).fetchone()[0]
    step = 200_000
    for start in range(0, n, step):
        m = min(step, n - start)
        x16 = clustered(m, dim, start=start).astype("<f2")
        ids = range(start + 1, start + m + 1)
        with con:
            con.executemany(
                "INSERT INTO samples (id, dataset_id, job_id, root_id, path, status)"
                " VALUES (?, ?, ?, ?, ?, 'ready')",
                ((i, dataset, job, root, f"{i}.jpg") for i in ids),
            )
            con.executemany(
                "INSERT INTO embeddings (model_id, sample_id, vector) VALUES (?, ?, ?)",
                ((model, i, v.tobytes()) for i, v in zip(ids, x16, strict=True)),
            )
        print(f"  search: filled {start + m:,}/{n:,}", file=sys.stderr, flush=True)
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()
    return time.perf_counter() - t


CHILD = """
import json, sys, time
import numpy as np
sys.path.insert(0, sys.argv[4])
import fastindex
from fastindex import testing
from fastindex.search import VectorIndex
from scale.search import clustered

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

db, name, nq = sys.argv[1], sys.argv[2], int(sys.argv[3])
ds = fastindex.Dataset.load(name, db=db, resume=False)
(model, _, _, dim), = ds._store.models()
index = VectorIndex(ds, testing.tiny_model(), model, dim, ann_min=0)  # exact first
out = {"rss_before": status("VmRSS")}
t = time.perf_counter(); n = index.refresh(); out["load_s"] = time.perf_counter() - t
out["n"], out["load_hwm"], out["load_rss"] = n, status("VmHWM"), status("VmRSS")
queries = clustered(nq, dim, start=10**9)
lat, truth = [], []
for q in queries:
    t = time.perf_counter(); hits = index.search_vector(q, 10); lat.append(time.perf_counter() - t)
    truth.append([i for i, _ in hits])
out["exact_ms"] = [x * 1e3 for x in lat]
index.ann_min = n
t = time.perf_counter(); index.refresh()
during = []
while not index.wait_ann(0):  # exact keeps answering while the index builds
    if len(during) < 5:
        q = queries[len(during)]
        t1 = time.perf_counter(); index.search_vector(q, 10)
        during.append(time.perf_counter() - t1)
    else:
        index.wait_ann(5)
out["build_s"] = time.perf_counter() - t
out["during_ms"] = [x * 1e3 for x in during]
out["state"], out["error"], out["mode"] = index.ann_state, index.ann_error, index.mode
out["nlist"], out["nprobe"] = index._ann.nlist, fastindex.ann.nprobe()
out["build_hwm"] = status("VmHWM")
lat, rec = [], []
more = clustered(3 * nq, dim, start=10**9 + 1)
for i, q in enumerate(np.concatenate([queries, more])):
    t = time.perf_counter(); hits = index.search_vector(q, 10); lat.append(time.perf_counter() - t)
    if i < nq:
        rec.append(len({h for h, _ in hits} & set(truth[i])) / 10)
out["ann_ms"] = [x * 1e3 for x in lat]
out["recall"] = float(np.mean(rec))
out["hwm"] = status("VmHWM")
print(json.dumps(out))
"""


def _pct(ms: list[float], p: float) -> str:
    return f"{np.percentile(ms, p):.1f} ms" if ms else "-"


def run(args: argparse.Namespace) -> list[Row]:
    n, dim = args.search_n, args.search_dim
    base = Path(os.environ.get("FASTINDEX_BENCH_DATA", Path(__file__).parents[2] / "bench-data"))
    db = base / f"search_{n}_{dim}.db"
    done = db.with_suffix(".filled")
    fill_s = None
    if not done.exists():
        for p in (db, Path(f"{db}-wal"), Path(f"{db}-shm")):
            p.unlink(missing_ok=True)
        base.mkdir(parents=True, exist_ok=True)
        fill_s = _fill(db, n, dim)
        done.write_text("ok\n")
    child = subprocess.run(
        [
            sys.executable,
            "-c",
            CHILD,
            str(db),
            NAME,
            str(args.search_queries),
            str(Path(__file__).parents[1]),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if child.returncode != 0:
        raise SystemExit(f"search child failed:\n{child.stderr[-3000:]}")
    r = json.loads(child.stdout.strip().splitlines()[-1])
    mib = n * dim * 2 / 2**20  # the float16 copy
    mb = 1 / 2**20  # bytes -> MiB
    rows: list[Row] = [
        ("search: vectors", f"{r['n']:,} x {dim}", "10M x 512", f"float16 copy {mib:,.0f} MiB"),
    ]
    if fill_s is not None:
        rows.append(
            ("search: store fill (sqlite3)", f"{fill_s:.0f} s", "-", "setup, not fastindex")
        )
    rows += [
        (
            "search: load (chunked read)",
            f"{r['load_s']:.1f} s",
            "-",
            f"{r['n'] / r['load_s']:,.0f} vectors/s",
        ),
        (
            "search: load peak RSS",
            f"{r['load_hwm'] * mb:,.0f} MiB",
            f"~{mib:,.0f} MiB + base",
            f"grew {(r['load_hwm'] - r['rss_before']) * mb:,.0f} MiB;"
            f" base {r['rss_before'] * mb:,.0f} MiB",
        ),
        (
            "search: exact p50",
            _pct(r["exact_ms"], 50),
            "-",
            f"{len(r['exact_ms'])} queries, faiss fp16 scan",
        ),
        ("search: exact p99", _pct(r["exact_ms"], 99), "-", ""),
        (
            "search: ANN build (background)",
            f"{r['build_s']:.0f} s",
            "-",
            f"IVF{r['nlist']},SQ8 {r['state']}{': ' + r['error'] if r['error'] else ''}",
        ),
        (
            "search: exact p50 during build",
            _pct(r["during_ms"], 50),
            "-",
            f"{len(r['during_ms'])} queries",
        ),
        (
            "search: ANN p50",
            _pct(r["ann_ms"], 50),
            "-",
            f"{len(r['ann_ms'])} queries, nprobe {r['nprobe']}",
        ),
        ("search: ANN p99", _pct(r["ann_ms"], 99), "< 50 ms", "rerank of 64 candidates in float16"),
        (
            "search: ANN recall@10 vs exact",
            f"{r['recall']:.3f}",
            ">= 0.95",
            f"{args.search_queries} queries",
        ),
        (
            "search: peak RSS (load + index)",
            f"{r['hwm'] * mb:,.0f} MiB",
            "one copy + index",
            f"SQ8 codes ~{mib / 2:,.0f} MiB",
        ),
    ]
    return rows


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_args(ap)
    for row in run(ap.parse_args()):
        print(" | ".join(row))
