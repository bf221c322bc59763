"""Ctrl-C during a long Python API call: the call raises `KeyboardInterrupt` promptly, the store
is consistent, and running the call again finishes the work. And a store that fails under a
long call (a full disk) ends it at once with the store's name.

Each Ctrl-C case runs the call in a child process on its main thread (where CPython delivers
signals) and sends it one SIGINT once the call is inside its work.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import fastindex
import pytest
from fastindex import _core
from testkit import sql, status_counts, tmpfs

#: Files in the generated tree (empty `.jpg` files: phase 1 takes them, phase 2 fails them).
N_FILES = 100_000
PER_FOLDER = 100
#: A hang guard, not a timing assertion: the work stops within ~0.2 s.
PROMPTLY = 3.0

CHILD = """
import sys
import fastindex
from fastindex import _core
mode, db, tree, coco = sys.argv[1:5]
if mode == "probe":
    store = _core.Store(db)
    did, _ = store.find_or_create_dataset("a")
    store.scan(did, tree)
    call = lambda: store.probe_pending(did)
else:
    ds = fastindex.Dataset.load_or_create("a", db=db)
    if mode == "scan":
        call = lambda: ds.add_images_from_path(tree, embed=False)
    else:
        call = lambda: ds.add_samples_from_coco(
            annotations_json=coco, images_path=tree, embed=False
        )
print("calling", flush=True)
try:
    call()
    print("finished", flush=True)
except KeyboardInterrupt:
    print("interrupted", flush=True)
"""


@pytest.fixture(scope="module")
def tree() -> Iterator[Path]:
    """`N_FILES` empty images in folders of `PER_FOLDER`, on a tmpfs when there is one (made
    in a second there, in tens of seconds on a busy disk)."""
    base = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    top = Path(tempfile.mkdtemp(prefix="fastindex-interrupt-", dir=base))
    try:
        root = top / "images"
        for d in range(N_FILES // PER_FOLDER):
            folder = root / f"d{d:04d}"
            folder.mkdir(parents=True)
            for i in range(PER_FOLDER):
                os.close(os.open(folder / f"{i:03d}.jpg", os.O_CREAT | os.O_WRONLY, 0o644))
        yield root
    finally:
        shutil.rmtree(top, ignore_errors=True)


@pytest.fixture(scope="module")
def coco(tree: Path) -> Iterator[Path]:
    """A COCO file listing every file of the tree, with one box each."""
    names = [f"d{i // PER_FOLDER:04d}/{i % PER_FOLDER:03d}.jpg" for i in range(N_FILES)]
    doc = {
        "images": [
            {"id": i + 1, "file_name": n, "width": 1, "height": 1} for i, n in enumerate(names)
        ],
        "categories": [{"id": 1, "name": "thing"}],
        "annotations": [
            {"id": i + 1, "image_id": i + 1, "category_id": 1, "bbox": [0, 0, 1, 1]}
            for i in range(N_FILES)
        ],
    }
    path = tree.parent / "instances.json"
    path.write_text(json.dumps(doc))
    yield path


def inside(mode: str, store: _core.Store) -> bool:
    """Whether the child's call is doing its work (not before it, not after it)."""
    p = store.progress(1)
    if mode == "probe":
        return bool(0 < p["indexed"] + p["failed"] < N_FILES)
    return bool(p["status"] == "in_progress")


def interrupt(mode: str, db: Path, tree: Path, coco: Path) -> float:
    """Run the child and send it SIGINT once its call is inside the work. Returns the seconds
    from the signal to the child's `KeyboardInterrupt`; raises `TimeoutError` if the call
    finished first."""
    env = {**os.environ, "FASTINDEX_IO_THREADS": "1"}  # a slow phase 2: a wide window
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, mode, str(db), str(tree), str(coco)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    try:
        assert child.stdout.readline().strip() == "calling", child.stderr
        store = _core.Store(str(db))
        deadline = time.monotonic() + 60
        while not inside(mode, store):
            if child.poll() is not None or time.monotonic() > deadline:
                raise TimeoutError("the call ended before it could be interrupted")
            time.sleep(0.002)
        sent = time.monotonic()
        child.send_signal(signal.SIGINT)
        line = child.stdout.readline().strip()
        took = time.monotonic() - sent
        if line == "finished":
            raise TimeoutError("the call ended before the signal arrived")
        out, err = child.communicate(timeout=60)
        assert line == "interrupted", (line, out, err)
        assert child.returncode == 0, err
        return took
    finally:
        if child.poll() is None:
            child.kill()
        child.communicate(timeout=60)


def assert_consistent(db: Path) -> dict[str, Any]:
    """The counters match the rows, and no job says it is still adding."""
    p = fastindex.Dataset.load("a", db=db, resume=False).get_loading_progress()
    counts = {s: p[s] for s in fastindex.STATUSES}
    assert counts == status_counts(db, 1)
    ((running,),) = sql(db, ("SELECT COUNT(*) FROM jobs WHERE running_owner IS NOT NULL", []))[0]
    assert running == 0
    return p


def run_interrupted(mode: str, tmp_path: Path, tree: Path, coco: Path) -> Path:
    for attempt in range(3):
        db = tmp_path / f"{mode}{attempt}.db"
        try:
            took = interrupt(mode, db, tree, coco)
        except TimeoutError:
            continue
        print(f"{mode}: KeyboardInterrupt {took:.3f} s after SIGINT")
        assert took < PROMPTLY, f"{mode} took {took:.2f} s to stop"
        return db
    pytest.fail(f"could not interrupt {mode} inside the call in 3 tries")


def finish(db: Path, add: Callable[[fastindex.Dataset], object]) -> dict[str, Any]:
    ds = fastindex.Dataset.load("a", db=db, resume=False)
    add(ds)
    assert ds.wait(timeout=240), ds.get_loading_progress()
    p = ds.get_loading_progress()
    ds.cancel()
    return p


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ctrl_c_in_add_images_from_path(tmp_path: Path, tree: Path, coco: Path) -> None:
    db = run_interrupted("scan", tmp_path, tree, coco)
    assert_consistent(db)
    p = finish(db, lambda ds: ds.add_images_from_path(tree, embed=False))
    assert (p["total"], p["pending"], p["status"]) == (N_FILES, 0, "complete"), p
    assert p["failed"] == N_FILES  # empty files are not images
    assert_consistent(db)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ctrl_c_in_add_samples_from_coco(tmp_path: Path, tree: Path, coco: Path) -> None:
    db = run_interrupted("coco", tmp_path, tree, coco)
    assert_consistent(db)
    p = finish(
        db,
        lambda ds: ds.add_samples_from_coco(annotations_json=coco, images_path=tree, embed=False),
    )
    assert (p["total"], p["pending"], p["status"]) == (N_FILES, 0, "complete"), p
    assert_consistent(db)
    ((boxes,),) = sql(db, ("SELECT COUNT(*) FROM annotations", []))[0]
    assert boxes == N_FILES


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ctrl_c_in_probe_pending(tmp_path: Path, tree: Path, coco: Path) -> None:
    db = run_interrupted("probe", tmp_path, tree, coco)
    left = assert_consistent(db)
    assert left["total"] == N_FILES and 0 < left["pending"] < N_FILES, left
    store = _core.Store(str(db))
    assert store.probe_pending(1) == left["pending"]
    p = assert_consistent(db)
    assert (p["pending"], p["failed"], p["status"]) == (0, N_FILES, "complete"), p


@pytest.mark.timeout(120)
def test_a_full_disk_ends_probe_pending_at_once(tmp_path: Path, tree: Path) -> None:
    """The writer's error stops the reading side too: no probing on, no wait on a channel."""
    with tmpfs(tmp_path / "small", "6m") as mnt:
        db = mnt / "s.db"
        store = _core.Store(str(db))
        did = store.create_dataset("a")
        part = tree.parent / "part"  # 30k rows fit, the probe's log then outgrows the disk
        if not part.exists():
            part.mkdir()
            for d in range(300):
                (tree / f"d{d:04d}").rename(part / f"d{d:04d}")
        try:
            store.scan(did, str(part))
        finally:
            for d in range(300):
                (part / f"d{d:04d}").rename(tree / f"d{d:04d}")
        with pytest.raises(fastindex.StoreError, match="full") as e:
            store.probe_pending(did)
        assert str(db) in str(e.value) and "\n" not in str(e.value)
        p = store.progress(did)
        assert p["pending"] > 0 and p["total"] == 300 * PER_FOLDER
        del store
