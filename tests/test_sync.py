"""Adding a folder again syncs it: new files added, changed ones re-read, deleted ones `missing`,
unchanged rows not written; `retry_failed`; the per-path sync a watcher uses; phase 1's memory.

The reference for every sync is a clean index of the final tree in another dataset: the rows a
sync leaves (but the `missing` ones) must be the rows a fresh index makes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import fastindex
import pytest
import testkit
from fastindex import _core
from fastindex.errors import InvalidArgumentError, PathNotFoundError


def bmp(size: tuple[int, int], seed: int = 0) -> bytes:
    return testkit.encode(testkit.noise(size, seed=seed), "BMP")


def rows(ds: fastindex.Dataset) -> dict[str, tuple[Any, ...]]:
    """What a clean index and a sync must agree on, by path."""
    return {
        os.fsdecode(s.path): (s.status, s.width, s.height, s.format)
        for s in ds.samples()
        if s.status != "missing"
    }


def missing(ds: fastindex.Dataset) -> set[str]:
    return {os.fsdecode(s.path) for s in ds.samples(status="missing")}


def synced(ds: fastindex.Dataset, root: Path) -> dict[str, Any]:
    job = ds.add_images_from_path(root, embed=False)
    testkit.finish(ds, job)
    p = ds.get_loading_progress()
    assert testkit.progress_counts(p) == testkit.status_counts(ds.db, ds.id), "counters drifted"
    assert p["status"] == "complete"
    return dict(job.summary)


def clean_index(db: Path, root: Path) -> fastindex.Dataset:
    ref = fastindex.Dataset.create(f"clean-{time.monotonic_ns()}", db=db)
    testkit.finish(ref, ref.add_images_from_path(root, embed=False))
    return ref


def age(path: Path, seconds: float = 10) -> None:
    """Move a file's mtime back, so a rewrite now is sure to have another one."""
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns - int(seconds * 1e9)))


def test_sync_matches_a_clean_index(tmp_path: Path, new_dataset: Any, db: Path) -> None:
    root = tmp_path / "photos"
    w = testkit.write
    w(root / "keep.png", testkit.small_png(1))
    # BMPs of 8x1 and 4x2 pixels have the same byte size: a change seen only by its mtime
    same = w(root / "same.bmp", bmp((8, 1)))
    assert len(bmp((8, 1))) == len(bmp((4, 2)))
    w(root / "move_me.png", testkit.small_png(2, (9, 4)))
    w(root / "del.png", testkit.small_png(3))
    w(root / "gone/x.png", testkit.small_png(4))
    w(root / "gone/deeper/y.png", testkit.small_png(5))
    back = w(root / "back.png", testkit.small_png(6, (3, 3)))
    good = testkit.small_png(7, (6, 6))
    bad = w(root / "bad.png", b"\0" * 16 + good[16:])  # the same length, no PNG signature
    w(root / "sub/deep.jpg", testkit.encode(testkit.noise((10, 12)), "JPEG"))
    for p in root.rglob("*.*"):
        age(p)
    ds = new_dataset("synced")
    first = synced(ds, root)
    assert (first["added"], first["changed"], first["removed"]) == (9, 0, 0)
    assert ds.get_loading_progress()["failed"] == 1

    w(root / "new.png", testkit.small_png(8, (5, 7)))
    same.write_bytes(bmp((4, 2)))
    (root / "move_me.png").rename(root / "moved.png")
    (root / "del.png").unlink()
    shutil.rmtree(root / "gone")
    back_bytes = back.read_bytes()
    back.unlink()
    s = synced(ds, root)
    assert (s["added"], s["changed"], s["removed"], s["unchanged"]) == (2, 1, 5, 3), s
    assert s["existing"] == s["changed"] + s["unchanged"]
    assert missing(ds) == {"move_me.png", "del.png", "gone/x.png", "gone/deeper/y.png", "back.png"}
    assert ds.get_loading_progress()["missing"] == 5
    assert rows(ds) == rows(clean_index(db, root))
    assert rows(ds)["same.bmp"] == ("indexed", 4, 2, "BMP")

    # the file comes back: pending again, then indexed
    back.write_bytes(back_bytes)
    s = synced(ds, root)
    assert (s["added"], s["changed"], s["removed"]) == (0, 1, 0), s
    assert "back.png" not in missing(ds)
    assert rows(ds)["back.png"] == ("indexed", 3, 3, "PNG")

    # fixed in place with the same size and mtime: a sync leaves it failed, retry_failed not
    st = bad.stat()
    bad.write_bytes(good)
    os.utime(bad, ns=(st.st_atime_ns, st.st_mtime_ns))
    s = synced(ds, root)
    assert (s["added"], s["changed"], s["removed"]) == (0, 0, 0), s
    assert rows(ds)["bad.png"][0] == "failed"
    assert ds.retry_failed() == 1
    assert ds.wait(timeout=60)
    assert rows(ds)["bad.png"] == ("indexed", 6, 6, "PNG")
    assert ds.retry_failed() == 0
    assert rows(ds) == rows(clean_index(db, root))
    assert testkit.progress_counts(ds.get_loading_progress()) == testkit.status_counts(ds.db, ds.id)
    # the format facet follows: no count is left for the BMP's old probe or missing rows' loss
    (formats,) = testkit.sql(
        db,
        (
            "SELECT format, COUNT(*) FROM samples WHERE dataset_id = ? AND format IS NOT NULL"
            " GROUP BY format",
            [ds.id],
        ),
    )
    assert ds.facets()["format"] == dict(formats)


AUDIT = testkit.AUDIT_SAMPLES


def test_an_unchanged_folder_writes_no_row(tmp_path: Path, new_dataset: Any) -> None:
    root = tmp_path / "photos"
    for i in range(40):
        testkit.write(root / f"d{i % 3}/{i}.png", testkit.small_png(i))
    ds = new_dataset()
    synced(ds, root)
    before = ds.samples()
    # every write to a sample row from now on leaves a row in `audit`
    testkit.sql(ds.db, *AUDIT, write=True)
    s = synced(ds, root)
    assert (s["added"], s["changed"], s["removed"], s["unchanged"]) == (0, 0, 0, 40)
    ((n,),) = testkit.sql(ds.db, ("SELECT COUNT(*) FROM audit", []))[0]
    assert n == 0
    assert ds.samples() == before
    # and one change writes one row
    testkit.write(root / "d0/0.png", testkit.small_png(99, (2, 2)))
    s = synced(ds, root)
    assert (s["changed"], s["unchanged"]) == (1, 39)
    ((n,),) = testkit.sql(ds.db, ("SELECT COUNT(*) FROM audit WHERE op = 'u'", []))[0]
    assert n == 2  # back to pending, then indexed by phase 2


def test_a_missing_file_keeps_its_annotations(tmp_path: Path, new_dataset: Any) -> None:
    images = tmp_path / "images"
    a = testkit.write(images / "a.png", testkit.small_png(1, (20, 10)))
    testkit.write(images / "b.png", testkit.small_png(2, (20, 10)))
    coco = {
        "images": [
            {"id": 1, "file_name": "a.png", "width": 20, "height": 10},
            {"id": 2, "file_name": "b.png", "width": 20, "height": 10},
        ],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 2, 3, 4]},
            {"id": 2, "image_id": 1, "category_id": 1, "bbox": [5, 5, 2, 2]},
        ],
        "categories": [{"id": 1, "name": "dog"}],
    }
    ann = tmp_path / "instances.json"
    ann.write_text(json.dumps(coco))
    ds = new_dataset()
    job = ds.add_samples_from_coco(annotations_json=ann, images_path=images, embed=False)
    testkit.finish(ds, job)
    (sample,) = [s for s in ds.samples() if s.file_name == "a.png"]
    boxes = ds.annotations(sample.id)
    assert len(boxes) == 2
    data = a.read_bytes()
    a.unlink()
    s = synced(ds, images)
    assert (s["added"], s["removed"], s["unchanged"]) == (0, 1, 1)
    assert [x.id for x in ds.samples(status="missing")] == [sample.id]
    assert ds.annotations(sample.id) == boxes
    assert ds.samples(category="dog")[0].status == "missing"
    assert ds.facets()["status"]["missing"] == 1
    a.write_bytes(data)
    s = synced(ds, images)
    assert s["changed"] == 1
    assert ds.sample(sample.id).status == "indexed"
    assert ds.annotations(sample.id) == boxes


def test_a_root_that_is_gone_marks_nothing_missing(tmp_path: Path, new_dataset: Any) -> None:
    root = tmp_path / "photos"
    testkit.write(root / "a.png", testkit.small_png())
    ds = new_dataset()
    synced(ds, root)
    shutil.rmtree(root)
    with pytest.raises(PathNotFoundError):
        ds.add_images_from_path(root, embed=False)
    assert ds.get_loading_progress()["missing"] == 0
    assert ds.samples()[0].status == "indexed"


def test_a_subfolder_syncs_only_itself(tmp_path: Path, new_dataset: Any) -> None:
    root = tmp_path / "photos"
    testkit.write(root / "a/1.png", testkit.small_png(1))
    testkit.write(root / "a/2.png", testkit.small_png(2))
    testkit.write(root / "b/3.png", testkit.small_png(3))
    # a name that sorts between `a` and `a/...`: not inside `a`
    testkit.write(root / "a-z/4.png", testkit.small_png(4))
    ds = new_dataset()
    synced(ds, root)
    (root / "a/1.png").unlink()
    (root / "b/3.png").unlink()
    (root / "a-z/4.png").unlink()
    s = synced(ds, root / "a")
    assert (s["removed"], s["unchanged"]) == (1, 1), s
    assert missing(ds) == {"a/1.png"}
    s = synced(ds, root)
    assert s["removed"] == 2
    assert missing(ds) == {"a/1.png", "b/3.png", "a-z/4.png"}


def test_byte_names_sync(tmp_path: Path, new_dataset: Any) -> None:
    root = tmp_path / "photos"
    raw = os.fsencode(root)
    names = [b"caf\xe9.png", b"\xff\xfe/in.png", b"ok.png", b"\xff\xfe.png"]
    for n in names:
        testkit.write(Path(os.fsdecode(raw + b"/" + n)), testkit.small_png(len(n)))
    ds = new_dataset()
    synced(ds, root)
    os.unlink(raw + b"/\xff\xfe/in.png")
    os.rmdir(raw + b"/\xff\xfe")
    s = synced(ds, root)
    assert (s["removed"], s["unchanged"]) == (1, 3), s
    assert missing(ds) == {os.fsdecode(b"\xff\xfe/in.png")}


def test_sync_paths(tmp_path: Path, new_dataset: Any, db: Path) -> None:
    """The per-path sync a watcher calls: each path looked at on its own, one transaction."""
    root = tmp_path / "photos"
    testkit.write(root / "a.png", testkit.small_png(1))
    testkit.write(root / "dir/b.png", testkit.small_png(2))
    testkit.write(root / "dir/sub/c.png", testkit.small_png(3))
    ds = new_dataset()
    synced(ds, root)
    store = _core.Store(os.fspath(db))
    testkit.write(root / "new.png", testkit.small_png(4))
    testkit.write(root / "a.png", testkit.small_png(5, (3, 3)))
    shutil.rmtree(root / "dir/sub")
    testkit.write(root / "fresh/x/y.png", testkit.small_png(6))
    testkit.write(root / ".hidden.png", testkit.small_png(7))
    testkit.write(root / "notes.txt", b"text")
    got = store.sync_paths(
        ds.id,
        os.fspath(root),
        ["new.png", b"a.png", "dir/sub", "fresh", "never-there.png", ".hidden.png", "notes.txt"],
    )
    assert {k: got[k] for k in ("added", "changed", "removed", "unchanged")} == {
        "added": 2,
        "changed": 1,
        "removed": 1,
        "unchanged": 0,
    }
    # new rows belong to the dataset's watch job for the folder, the same one each call
    assert store.sync_paths(ds.id, os.fspath(root), ["a.png"])["job_id"] == got["job_id"]
    assert ds.jobs_summary(got["job_id"])["kind"] == "watch"
    assert missing(ds) == {"dir/sub/c.png"}
    ds.resume()
    assert ds.wait(timeout=60)
    assert rows(ds) == rows(clean_index(db, root))
    # a folder that is gone takes everything under it; the root itself is walked whole
    shutil.rmtree(root / "dir")
    (root / "new.png").unlink()
    got = store.sync_paths(ds.id, os.fspath(root), ["dir", ""])
    assert (got["removed"], got["added"]) == (2, 0)
    assert missing(ds) == {"dir/sub/c.png", "dir/b.png", "new.png"}
    for bad in ("../x.png", "/etc/passwd"):
        with pytest.raises(InvalidArgumentError):
            store.sync_paths(ds.id, os.fspath(root), [bad])
    with pytest.raises(PathNotFoundError):
        store.sync_paths(ds.id, os.fspath(tmp_path / "nowhere"), ["a.png"])


def test_cli_index_again_syncs_and_retries_on_request(tmp_path: Path) -> None:
    root = tmp_path / "photos"
    testkit.write(root / "a.png", testkit.small_png(1))
    bad = testkit.write(root / "b.png", b"not an image at all")
    db = tmp_path / "s.db"

    def index(*extra: str) -> str:
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "fastindex.cli",
                "index",
                str(root),
                "--db",
                str(db),
                "--no-embed",
                "--quiet",
                *extra,
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert done.returncode in (0, 1), done.stderr
        return done.stderr

    index()
    st = bad.stat()
    bad.write_bytes(b"x" * len(b"not an image at all"))
    os.utime(bad, ns=(st.st_atime_ns, st.st_mtime_ns))
    (root / "a.png").unlink()
    out = index()
    assert "gone (missing)" in out
    ds = fastindex.Dataset.load("photos", db=db, resume=False)
    assert ds.get_loading_progress()["failed"] == 1
    assert ds.get_loading_progress()["missing"] == 1
    index("--retry-failed")
    # retried: probed again (and failed again: it is still no image), with a fresh reason
    assert ds.get_loading_progress()["failed"] == 1
    assert ds.get_loading_progress()["pending"] == 0


# -- memory -------------------------------------------------------------------------------------
MEASURE = r"""
import sys, fastindex
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
ds = fastindex.Dataset.create("m", db=sys.argv[2])
job = ds.add_images_from_path(sys.argv[1], embed=False)
peak = hwm()
ds.cancel()
print(peak, job.summary["added"])
"""


def _tree(where: Path, levels: int) -> Path:
    """2**levels folders of 1,000 hard links each (`cp -al` doubles the tree per level)."""
    leaf = where / "leaf"
    leaf.mkdir()
    src = leaf / "src.png"
    src.write_bytes(testkit.small_png())
    for i in range(1, 1000):
        os.link(src, leaf / f"img_{i:04d}_{'n' * 40}.png")
    tree = leaf
    for level in range(levels):
        up = where / f"l{level}"
        up.mkdir()
        tree.rename(up / "a")
        subprocess.run(["cp", "-al", str(up / "a"), str(up / "b")], check=True)
        tree = up
    return tree


def test_phase_one_memory_does_not_grow_with_the_files(tmp_path: Path) -> None:
    """Peak RSS of phase 1 at 64k and 256k files: the growth is the store's own page cache
    (SQLite's, bounded by its `cache_size` of 64 MiB, here about the database's size), not
    the files: ~8 MB beyond it here, where the walk that held every entry before inserting
    grew ~36 MB beyond it."""
    with testkit.tmpfs(tmp_path / "mnt", "1g") as mnt:
        peaks = []
        for levels in (6, 8):
            where = mnt / f"t{levels}"
            where.mkdir()
            tree = _tree(where, levels)
            db = mnt / f"s{levels}.db"
            done = subprocess.run(
                [sys.executable, "-c", MEASURE, os.fspath(tree), os.fspath(db)],
                capture_output=True,
                text=True,
                timeout=300,
                check=False,
            )
            assert done.returncode == 0, done.stderr
            peak, added = map(int, done.stdout.split())
            assert added == 1000 * 2**levels
            peaks.append((peak, db.stat().st_size))
            shutil.rmtree(where)
    (small, small_db), (big, big_db) = peaks

    def cache(db_bytes: int) -> float:
        # SQLite's page cache of the store: the pages, ~10% of headers on each, 64 MiB at most
        return 1.1 * min(db_bytes, 64 << 20)

    beyond_cache = (big - small) - (cache(big_db) - cache(small_db))
    assert beyond_cache < 16e6, (peaks, beyond_cache)
