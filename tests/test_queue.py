"""The store as a queue at scale: each step costs the rows it takes (partial indexes of the
queue statuses, schema 5, migrated in place), phase 2's memory does not grow with the queue,
and adding a few files to a big dataset touches only them.

The work itself (SQLite steps per statement) is asserted in the Rust tests beside the queries
(`scan.rs`, `vectors.rs`); here: the plans SQLite picks in a real store, the migration, and
memory from a child process's own VmHWM."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import fastindex
import pytest
from server_support import make_images
from testkit import UNDO_LATER_COLUMNS, finish, sql

QUEUE_INDEXES = {
    "samples_pending",
    "samples_indexed",
    "samples_embedding",
    "jobs_running",
    "samples_walk_failed",
}


def _indexes(db: Path) -> set[str]:
    ((rows,),) = [sql(db, ("SELECT name FROM sqlite_master WHERE type = 'index'", []))]
    return {r[0] for r in rows}


def _plan(db: Path, query: str, *args: object) -> str:
    ((rows,),) = [sql(db, (f"EXPLAIN QUERY PLAN {query}", list(args)))]
    return " / ".join(str(r[3]) for r in rows)


def _insert_rows(db: Path, dataset_id: int, n: int, status: str) -> None:
    """`n` rows of `status` under the dataset's first root and job, as a big dataset has them
    (no files behind them: the queue steps under test never reach them), counters included."""
    sql(
        db,
        (
            """WITH RECURSIVE k(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM k WHERE i < ?)
               INSERT INTO samples (dataset_id, job_id, root_id, path, status)
               SELECT ?, (SELECT MIN(id) FROM jobs WHERE dataset_id = ?),
                      (SELECT MIN(id) FROM roots WHERE dataset_id = ?),
                      printf('old/d%04d/img_%07d.png', i / 1000, i), ? FROM k""",
            [n, dataset_id, dataset_id, dataset_id, status],
        ),
        (
            """INSERT INTO counts (dataset_id, job_id, status, n)
               VALUES (?, (SELECT MIN(id) FROM jobs WHERE dataset_id = ?), ?, ?)
               ON CONFLICT (dataset_id, job_id, status) DO UPDATE SET n = n + excluded.n""",
            [dataset_id, dataset_id, status, n],
        ),
        write=True,
    )


def test_the_queue_steps_walk_their_partial_index(tmp_path: Path, db: Path) -> None:
    ds = fastindex.Dataset.create("q", db=db)
    finish(ds, ds.add_images_from_path(make_images_dir(tmp_path / "a", 3), embed=False))
    assert _indexes(db) >= QUEUE_INDEXES
    # The statements of the queues, as the Rust core sends them (scan.rs PENDING_BATCH,
    # vectors.rs CLAIM, leases.rs release_all_claims).
    pending = (
        "SELECT id FROM samples WHERE dataset_id = ?1 AND status = 'pending' AND id > ?2"
        " ORDER BY id LIMIT ?3"
    )
    claim = (
        "SELECT id FROM samples WHERE dataset_id = ?1 AND id > ?3 AND status = 'indexed'"
        " ORDER BY id LIMIT ?2"
    )
    release = "UPDATE samples SET status = 'indexed' WHERE dataset_id = ?1 AND status = 'embedding'"
    assert "USING INDEX samples_pending" in _plan(db, pending, 1, 0, 10)
    assert "USING INDEX samples_indexed" in _plan(db, claim, 1, 10, 0)
    assert "USING INDEX samples_embedding" in _plan(db, release, 1)
    # Phase 1 looks for its root's walk failures (scan.rs revive_walk_failures).
    revive = (
        "SELECT id, job_id, path FROM samples WHERE dataset_id = ?1 AND status = 'failed'"
        " AND root_id = ?2 AND size_bytes IS NULL"
    )
    assert "USING INDEX samples_walk_failed" in _plan(db, revive, 1, 1)
    # A search top-up reads the vectors stored since its cursor (vectors.rs load_embeddings),
    # not every vector of the model.
    top_up = (
        "SELECT e.id, e.sample_id, e.vector FROM embeddings e JOIN samples s"
        " ON s.id = e.sample_id WHERE +e.model_id = ?1 AND s.dataset_id = ?2 AND e.id > ?3"
        " ORDER BY e.id"
    )
    assert "USING INTEGER PRIMARY KEY (rowid>?)" in _plan(db, top_up, 1, 1, 0)
    # A gallery page of one queue status is served the same way.
    page = (
        "SELECT id FROM samples s WHERE s.dataset_id = ?1 AND s.id > ?2"
        " AND s.status = 'indexed' ORDER BY s.id LIMIT ?3"
    )
    assert "USING INDEX samples_indexed" in _plan(db, page, 1, 0, 10)


def make_images_dir(folder: Path, n: int, start: int = 0) -> Path:
    make_images(folder, n, start=start)
    return folder


def test_adding_ten_files_to_a_big_dataset_probes_only_them(tmp_path: Path, db: Path) -> None:
    ds = fastindex.Dataset.create("big", db=db)
    finish(ds, ds.add_images_from_path(make_images_dir(tmp_path / "old", 2), embed=False))
    _insert_rows(db, ds.id, 40_000, "indexed")
    before = ds.get_loading_progress()
    assert before["indexed"] == 40_002 and before["status"] == "complete"
    job = ds.add_images_from_path(make_images_dir(tmp_path / "new", 10, start=100), embed=False)
    finish(ds, job)
    assert job.progress()["indexed"] == 10
    p = ds.get_loading_progress()
    assert (p["total"], p["indexed"], p["pending"]) == (40_012, 40_012, 0)
    # Ids follow the order rows came in: the new rows are the last page, with their sizes.
    last = ds.samples(after_id=40_002)
    assert len(last) == 10 and all(s.width for s in last)


def test_a_version_4_store_is_migrated_in_place(tmp_path: Path, db: Path) -> None:
    ds = fastindex.Dataset.create("old", db=db)
    finish(ds, ds.add_images_from_path(make_images_dir(tmp_path / "a", 5, start=0), embed=False))
    want = [s.to_dict() for s in ds.samples()]
    ds.cancel()
    sql(
        db,
        *[(f"DROP INDEX {name}", []) for name in sorted(QUEUE_INDEXES)],
        *[(statement, []) for statement in UNDO_LATER_COLUMNS],
        ("UPDATE meta SET value = '4' WHERE key = 'schema_version'", []),
        write=True,
    )
    assert not QUEUE_INDEXES & _indexes(db)
    again = fastindex.Dataset.load("old", db=db)
    assert _indexes(db) >= QUEUE_INDEXES
    ((version,),) = sql(db, ("SELECT value FROM meta WHERE key = 'schema_version'", []))[0]
    assert version == str(fastindex.SCHEMA_VERSION)
    assert [s.to_dict() for s in again.samples()] == want
    finish(
        again, again.add_images_from_path(make_images_dir(tmp_path / "b", 3, start=50), embed=False)
    )
    assert again.get_loading_progress()["indexed"] == 8


def test_samples_pages_by_default_and_iter_samples_walks_them(tmp_path: Path, db: Path) -> None:
    ds = fastindex.Dataset.create("many", db=db)
    finish(ds, ds.add_images_from_path(make_images_dir(tmp_path / "a", 1), embed=False))
    _insert_rows(db, ds.id, 2_500, "indexed")
    first = ds.samples()
    assert len(first) == fastindex.DEFAULT_PAGE == 1000
    ids = [s.id for s in ds.iter_samples(page=700)]
    assert len(ids) == 2_501 == len(set(ids)) and ids == sorted(ids)
    assert [s.id for s in ds.iter_samples(status="indexed")] == ids
    assert [s.id for s in ds.iter_samples(after_id=ids[99])] == ids[100:]
    with pytest.raises(fastindex.InvalidArgumentError):
        next(ds.iter_samples(page=0))


# Peak memory of phase 2 over a queue of `n` rows, in a child process that does nothing else:
# its VmRSS before the call and its VmHWM after it. The store's page cache is made small
# (FASTINDEX_CACHE_KIB) so that what remains is what phase 2 itself holds.
_PROBE_PEAK = """
import json, sys
from fastindex import _core

def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key))

store = _core.Store(sys.argv[1])
before = status("VmRSS")
n = store.probe_pending(int(sys.argv[2]))
print(json.dumps({"probed": n, "kib": status("VmHWM") - before}))
"""


def _probe_peak(db: Path, dataset_id: int) -> dict[str, int]:
    done = subprocess.run(
        [sys.executable, "-c", _PROBE_PEAK, str(db), str(dataset_id)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "FASTINDEX_CACHE_KIB": "1024"},
    )
    assert done.returncode == 0, done.stderr
    out: dict[str, int] = json.loads(done.stdout)
    return out


def test_phase_2_memory_does_not_grow_with_the_queue(tmp_path: Path) -> None:
    growth = {}
    for n in (20_000, 300_000):
        db = tmp_path / f"{n}.db"
        ds = fastindex.Dataset.create("m", db=db)
        finish(ds, ds.add_images_from_path(make_images_dir(tmp_path / f"r{n}", 1), embed=False))
        ds.cancel()
        # Rows whose files are gone: each is read (opened, found missing) and written
        # `failed`, through the same batches, channel and writer as an image.
        _insert_rows(db, ds.id, n, "pending")
        got = _probe_peak(db, ds.id)
        assert got["probed"] == n
        growth[n] = got["kib"]
    # Measured here: ~6.5 MB at 20k, ~16 MB at 300k (allocator arenas settling, and no more
    # past it: ~19 MB at 600k). Holding the queue would add >= 100 bytes a row: > 27 MB more.
    assert growth[300_000] - growth[20_000] < 20 * 1024, growth
    assert growth[300_000] < 48 * 1024, growth
