"""Interrupted runs resume without losing or double-counting a row, and progress can be read
from another process while indexing runs.

A child process indexes a few tens of thousands of small files with one I/O thread (phase 2
commits a batch of rows at a time); this process watches its progress through a second
`Dataset.load(..., resume=False)` and kills the child once some rows are indexed and some still
pending. The store is then reopened here, finished, and compared row by row with a clean run
over the same files. Counts are checked against COUNT(*) by status read with Python's sqlite3.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import fastindex
import pytest
from testkit import encode, noise, progress_counts, small_png, sql, status_counts

N_FILES = 24_000  # three probe batches of 8192 rows: the run has a middle to interrupt
NAME = "photos"

CHILD = """
import sys
import fastindex
ds = fastindex.Dataset.create(sys.argv[2], db=sys.argv[1])
job = ds.add_images_from_path(sys.argv[3], embed=False)
print("scanned", job.summary["added"], flush=True)
ds.wait()
print("finished", flush=True)
"""


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """N_FILES small images (a few encodings repeated) and some files that are not images."""
    root = tmp_path_factory.mktemp("resume") / "tree"
    blobs = [small_png(i, (10 + i, 5 + i)) for i in range(4)]
    blobs += [encode(noise((20 + i, 9 + i)), "JPEG") for i in range(4)]
    blobs += [encode(noise((3, 4), "P"), "GIF"), b"not an image", b""]
    for i in range(N_FILES):
        folder = root / f"d{i // 500:03d}"
        if i % 500 == 0:
            folder.mkdir(parents=True)
        ext = ("png", "jpg", "gif")[i % 3]
        (folder / f"f{i:06d}.{ext}").write_bytes(blobs[i % len(blobs)])
    return root


Row = tuple[Any, ...]


def rows_by_path(ds: fastindex.Dataset) -> dict[str, Row]:
    out = {}
    for s in ds.samples():
        assert s.path not in out, f"{s.path} twice"
        out[s.path] = (s.status, s.width, s.height, s.format, s.orientation, s.error, s.size_bytes)
    return out


@pytest.fixture(scope="module")
def clean_run(
    tree: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[dict[str, Row], dict[str, int]]:
    """The same files indexed without interruption."""
    db = tmp_path_factory.mktemp("clean") / "clean.db"
    ds = fastindex.Dataset.create(NAME, db=db)
    job = ds.add_images_from_path(tree, embed=False)
    assert job.wait(timeout=120)
    counts = progress_counts(ds.get_loading_progress())
    assert counts == status_counts(db, ds.id)
    assert counts["pending"] == 0 and sum(counts.values()) == N_FILES
    assert counts["failed"] > 0 and counts["indexed"] > 0
    return rows_by_path(ds), counts


def _dataset_id(db: Path) -> int | None:
    """The child's dataset id once it is committed."""
    if not db.exists() or db.stat().st_size == 0:
        return None  # let the child lay the store out
    try:
        return fastindex.Dataset.load(NAME, db=db, resume=False).id
    except (fastindex.DatasetNotFoundError, fastindex.StoreError):
        return None


def check_reading(p: dict[str, Any], previous: dict[str, Any] | None) -> None:
    """One progress reading taken while the other process writes: a consistent snapshot."""
    counts = progress_counts(p)
    assert p["total"] == sum(counts.values()), p
    # phase 1 commits its rows in short transactions (other writers never wait long)
    assert 0 <= p["total"] <= N_FILES, p
    assert counts["embedding"] == counts["ready"] == 0
    if previous is not None:
        assert p["total"] >= previous["total"]
    if previous is not None and previous["total"] == N_FILES:
        assert p["total"] == N_FILES
        assert p["pending"] <= previous["pending"]
        assert p["indexed"] >= previous["indexed"] and p["failed"] >= previous["failed"]
    # The child creates the dataset, then adds: before the add starts the dataset is empty and
    # has nothing to do (complete). From the add on, the walk's job is in flight, so it is
    # in_progress until every row is probed, total still 0 included.
    if p["total"] == 0 and p["status"] == "complete":
        assert previous is None or (previous["total"] == 0 and previous["status"] == "complete"), (
            p,
            previous,
        )
        return
    assert (p["status"] == "complete") == (p["total"] == N_FILES and p["pending"] == 0), p


def interrupt_mid_probe(tree: Path, db: Path, sig: signal.Signals) -> list[dict[str, Any]]:
    """Run the child on `db` and send it `sig` once some rows are probed and some pending.
    Returns the progress readings taken meanwhile; raises `TimeoutError` if the child finished
    first (a machine fast enough to close the window)."""
    env = {**os.environ, "FASTINDEX_IO_THREADS": "1"}
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(db), NAME, str(tree)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    readings: list[dict[str, Any]] = []
    try:
        reader = None
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and child.poll() is None:
            if reader is None:
                if _dataset_id(db) is None:
                    time.sleep(0.002)
                    continue
                reader = fastindex.Dataset.load(NAME, db=db, resume=False)
            p = reader.get_loading_progress()
            check_reading(p, readings[-1] if readings else None)
            readings.append(p)
            done = p["indexed"] + p["failed"]
            # Half or more left: a SIGINT is handled between batches, so a signal sent near
            # the end could land after the last one.
            if p["total"] == N_FILES and 0 < done < N_FILES // 2:
                child.send_signal(sig)
                child.communicate(timeout=60)
                if status_counts(db, p["dataset_id"])["pending"] == 0:
                    raise TimeoutError(f"phase 2 finished before {sig.name} took effect")
                return readings
        raise TimeoutError(f"the child finished before it could be interrupted: {readings[-1:]}")
    finally:
        if child.poll() is None:
            child.kill()
        child.communicate(timeout=60)


def assert_like_clean_run(
    ds: fastindex.Dataset, clean: tuple[dict[str, Row], dict[str, int]]
) -> None:
    rows, counts = clean
    assert rows_by_path(ds) == rows
    progress = ds.get_loading_progress()
    assert progress["status"] == "complete"
    assert progress_counts(progress) == counts == status_counts(ds.db, ds.id)
    ((n, distinct),) = sql(
        ds.db, ("SELECT COUNT(*), COUNT(DISTINCT path) FROM samples WHERE dataset_id = ?", [ds.id])
    )[0]
    assert n == distinct == N_FILES


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["SIGKILL", "SIGINT"])
def test_resume_after_an_interrupted_run(
    tree: Path,
    clean_run: tuple[dict[str, Row], dict[str, int]],
    tmp_path: Path,
    sig: signal.Signals,
) -> None:
    for attempt in range(4):
        db = tmp_path / f"run{attempt}.db"
        try:
            readings = interrupt_mid_probe(tree, db, sig)
            break
        except TimeoutError:
            continue
    else:
        pytest.fail("could not interrupt the child in the middle of phase 2 in 4 tries")

    # the store as the interrupted run left it: mid phase 2, counters in step with the rows
    dataset_id = _dataset_id(db)
    assert dataset_id is not None
    left = status_counts(db, dataset_id)
    assert 0 < left["indexed"] + left["failed"] < N_FILES and left["pending"] > 0, left
    assert sum(left.values()) == N_FILES
    reader = fastindex.Dataset.load(NAME, db=db, resume=False)
    assert progress_counts(reader.get_loading_progress()) == left
    assert len(readings) >= 1

    # reopen: the pending rows resume in the background (after the killed run's lease lapses)
    ds = fastindex.Dataset.load(NAME, db=db)
    assert ds.wait(timeout=120), ds.get_loading_progress()
    assert_like_clean_run(ds, clean_run)
    assert ds.jobs_summary(1)["added"] == N_FILES
    # and opening it again finds nothing left to do
    again = fastindex.Dataset.load(NAME, db=db)
    assert again.wait(timeout=30)
    assert_like_clean_run(again, clean_run)


@pytest.mark.timeout(120)
def test_progress_from_another_process(tree: Path, tmp_path: Path) -> None:
    """While this process indexes, a child process reads the progress through its own
    `Dataset.load(..., resume=False)`: every reading is whole, and the child sees the run move."""
    db = tmp_path / "watched.db"
    ds = fastindex.Dataset.create(NAME, db=db)
    watcher = subprocess.Popen(
        [sys.executable, "-c", WATCHER, str(db), NAME, str(N_FILES)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert watcher.stdout is not None
        assert watcher.stdout.readline().strip() == "watching"
        job = ds.add_images_from_path(tree, embed=False)
        assert job.wait(timeout=90)
        out, err = watcher.communicate(timeout=60)
    finally:
        if watcher.poll() is None:
            watcher.kill()
            watcher.communicate()
    assert watcher.returncode == 0, err
    seen = [tuple(int(x) for x in line.split(",")) for line in out.strip().splitlines()]
    assert seen, err
    last = None
    for total, pending, done in seen:
        assert 0 <= total <= N_FILES
        assert pending + done == total
        if last is not None:
            assert done >= last[2] and total >= last[0]
        last = (total, pending, done)
    assert seen[-1] == (N_FILES, 0, N_FILES)
    assert progress_counts(ds.get_loading_progress()) == status_counts(db, ds.id)


WATCHER = """
import sys, time
import fastindex
db, name, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
ds = fastindex.Dataset.load(name, db=db, resume=False)
print("watching", flush=True)
deadline = time.monotonic() + 60
while time.monotonic() < deadline:
    p = ds.get_loading_progress()
    total = p["total"]
    parts = sum(p[s] for s in fastindex.STATUSES)
    if parts != total:
        sys.exit(f"inconsistent reading {p}")
    print(f"{total},{p['pending']},{p['indexed'] + p['failed']}", flush=True)
    if total == n and p["pending"] == 0:
        break
    time.sleep(0.001)
else:
    sys.exit("the run never finished")
"""


def test_load_when_the_embedding_model_cannot_be_rebuilt(tmp_path: Path) -> None:
    """A dataset embedded elsewhere (another open_clip, no torch here) still opens and reads;
    progress says why phase 3 waits instead of hanging in_progress."""
    from fastindex import _core
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (10 + i, 10)).save(folder / f"{i}.png")
    db = tmp_path / "s.db"
    ds = fastindex.Dataset.create("d", db=db)
    assert ds.add_images_from_path(folder, embed=False).wait(30)
    _core.Store(str(db)).set_embed_spec(ds.id, '{"name": 5}')  # not a spec this fastindex reads

    again = fastindex.Dataset.load("d", db=db)
    assert len(again.samples()) == 3
    p = again.get_loading_progress()
    assert p["status"] == "complete" and p["indexed"] == 3
    assert "cannot resume embeddings" in p["errors"]["embed"]
