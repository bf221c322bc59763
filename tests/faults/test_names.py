"""Hostile names: whatever bytes the file system allows are indexed, probed, embedded and read
back byte for byte; what the walk cannot take (broken links, link loops, unreadable folders)
is a `failed` row that every process sees. Real files, real SQLite, real subprocesses."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import fastindex
import pytest
from fastindex.testing import image_bytes
from testkit import too_deep_to_open

# relative path (bytes) -> (width, height, format): every one a real image
LONG = b"n" * 251 + b".png"
DEEP = b"/".join([b"d" * 200] * 12) + b"/deep\xe9.jpg"  # ~2.4 KB: deep, under PATH_MAX
HOSTILE: dict[bytes, tuple[int, int, str]] = {
    b"caf\xe9.png": (31, 17, "PNG"),  # Latin-1, not UTF-8
    b"new\nline.jpg": (40, 30, "JPEG"),
    b"tab\tand [brackets].jpg": (20, 21, "JPEG"),
    LONG: (9, 13, "PNG"),
    b"\xff\xfe/in\xe9ner.png": (12, 8, "PNG"),  # a folder that is not UTF-8
    b"\xc3\xa9t\xc3\xa9.jpg": (33, 22, "JPEG"),  # valid UTF-8, for contrast
    DEEP: (16, 16, "JPEG"),
}
ROOT = b"r\xe9oot"  # the root folder's own name is not UTF-8 either


def make_tree(base: Path) -> bytes:
    """Write HOSTILE under `base/ROOT`; returns the root as bytes."""
    assert len(LONG) == 255 and len(DEEP) < 4000
    root = os.path.join(os.fsencode(base), ROOT)
    for i, (rel, (w, h, fmt)) in enumerate(HOSTILE.items()):
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(image_bytes((w, h), seed=i, fmt=fmt))
    return root


def on_disk(root: bytes, rel: bytes) -> bytes:
    with open(os.path.join(root, rel), "rb") as f:
        return f.read()


def storage_classes(db: Path) -> dict[bytes, str]:
    """Each sample's path as bytes -> SQLite storage class, read by the stdlib's sqlite3."""
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        rows = con.execute("SELECT path, typeof(path) FROM samples").fetchall()
    finally:
        con.close()
    return {p if isinstance(p, bytes) else p.encode(): t for p, t in rows}


def test_any_name_is_indexed_and_read_back_byte_for_byte(tmp_path: Path) -> None:
    root = make_tree(tmp_path)
    db = tmp_path / "names.db"
    ds = fastindex.Dataset.create("names", db=db)
    # as a CLI gets it: str from os.fsdecode (surrogateescape)
    job = ds.add_images_from_path(os.fsdecode(root), embed=False)
    assert job.wait(60), job.progress()
    assert job.summary["errors"] == []
    assert (job.summary["added"], job.summary["existing"]) == (len(HOSTILE), 0)
    samples = ds.samples()
    assert {os.fsencode(s.path) for s in samples} == set(HOSTILE)
    for s in samples:
        rel = os.fsencode(s.path)
        assert os.fsencode(s.root) == os.path.realpath(root)
        assert s.status == "indexed", (rel, s.error)
        assert (s.width, s.height, s.format) == HOSTILE[rel]
        assert os.fsencode(s.abs_path) == os.path.join(os.path.realpath(root), rel)
        with open(s.abs_path, "rb") as f:
            assert f.read() == on_disk(root, rel)
        assert s.file_name == os.fsdecode(os.path.basename(rel))
        assert fastindex.image_size(s.abs_path) == HOSTILE[rel][:2]
        assert fastindex.image_size(os.fsencode(s.abs_path)) == HOSTILE[rel][:2]
    # the exact bytes in the store: TEXT when they are UTF-8, else a BLOB of them
    classes = storage_classes(db)
    assert set(classes) == set(HOSTILE)
    for rel, kind in classes.items():
        try:
            rel.decode()
            assert kind == "text", rel
        except UnicodeDecodeError:
            assert kind == "blob", rel
    # adding again, however the root is spelled, adds nothing
    for again in (root, os.fsdecode(root), Path(os.fsdecode(root)), root + b"/./"):
        j = ds.add_images_from_path(again, embed=False)
        assert (j.summary["added"], j.summary["existing"]) == (0, len(HOSTILE)), again
    # a folder inside the root, not UTF-8: its files are the root's, not new rows
    j = ds.add_images_from_path(os.path.join(root, b"\xff\xfe"), embed=False)
    assert (j.summary["added"], j.summary["existing"]) == (0, 1)
    assert ds.get_loading_progress()["total"] == len(HOSTILE)
    assert ds.samples() == samples


def test_thumbnails_open_such_paths(tmp_path: Path) -> None:
    pytest.importorskip("fastapi")
    from fastindex.server.media import make_thumbnail

    root = make_tree(tmp_path)
    ds = fastindex.Dataset.create("thumbs", db=tmp_path / "t.db")
    assert ds.add_images_from_path(root, embed=False).wait(60)
    for s in ds.samples():
        assert make_thumbnail(s.abs_path)[:3] == b"\xff\xd8\xff", s.path


def test_embedding_reads_such_paths(tmp_path: Path) -> None:
    pytest.importorskip("open_clip")
    from fastindex import testing

    root = make_tree(tmp_path)
    ds = fastindex.Dataset.create("embed", db=tmp_path / "e.db")
    job = ds.add_images_from_path(root, embed=testing.tiny_model(batch_size=4))
    assert job.wait(120), job.progress()
    p = ds.get_loading_progress()
    assert (p["ready"], p["failed"]) == (len(HOSTILE), 0), p
    ids, vectors = ds.embeddings()
    assert len(ids) == len(HOSTILE) and vectors.shape[0] == len(HOSTILE)


# -- walk problems ---------------------------------------------------------------------------
def _unreadable_folder(folder: Path) -> str:
    """A folder below `folder` that no one, root included, can open by its path. Returns the
    expected reason."""
    too_deep_to_open(folder)
    return "unreadable folder: file name too long"


READ_FAILED = textwrap.dedent(
    """
    import json, os, sys
    import fastindex
    ds = fastindex.Dataset.load("walk", db=sys.argv[1], resume=False)
    p = ds.get_loading_progress()
    rows = [(os.fsencode(s.path).hex(), s.error) for s in ds.samples(status="failed")]
    print(json.dumps({"progress": {k: p[k] for k in ("total", "failed", "status")},
                      "failed": rows}))
    """
)


def test_walk_problems_are_failed_rows_every_process_sees(tmp_path: Path) -> None:
    root = tmp_path / "r"
    (root / "sub").mkdir(parents=True)
    (root / "a.png").write_bytes(image_bytes((6, 4), fmt="PNG"))
    (root / "sub" / "b.png").write_bytes(image_bytes((6, 4), fmt="PNG"))
    os.symlink(tmp_path / "nowhere.jpg", os.path.join(os.fsencode(root), b"gone\xe9.jpg"))
    (root / "self.png").symlink_to("self.png")
    (root / "sub" / "up").symlink_to(root, target_is_directory=True)
    (root / "locked").mkdir()
    why_locked = _unreadable_folder(root / "locked")
    expected = {
        b"gone\xe9.jpg": "broken symbolic link",
        b"self.png": "symbolic link loop",
        b"sub/up": "symbolic link loop",
    }
    db = tmp_path / "w.db"
    ds = fastindex.Dataset.create("walk", db=db)
    job = ds.add_images_from_path(root, embed=False, follow_links=True)
    assert job.wait(60), job.progress()
    assert len(job.summary["errors"]) == len(expected) + 1, job.summary["errors"]

    out = subprocess.run(
        [sys.executable, "-c", READ_FAILED, str(db)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    seen = json.loads(out.stdout)
    failed = {bytes.fromhex(h): e for h, e in seen["failed"]}
    (locked,) = (p for p in failed if p.startswith(b"locked/"))
    assert failed.pop(locked) == why_locked
    assert failed == expected
    n = len(expected) + 1
    assert seen["progress"] == {"total": n + 2, "failed": n, "status": "complete"}

    # adding the folder again (from any process) adds nothing: no second row per problem
    again = ds.add_images_from_path(root, embed=False, follow_links=True)
    assert (again.summary["added"], again.summary["existing"]) == (0, n + 2)
    assert ds.get_loading_progress()["failed"] == n
    assert len(ds.samples(status="failed")) == n

    # once the link is fixed, adding the folder again indexes the file, in the same row
    gone = os.path.join(os.fsencode(root), b"gone\xe9.jpg")
    os.unlink(gone)
    with open(gone, "wb") as f:
        f.write(image_bytes((7, 3)))
    fixed = ds.add_images_from_path(root, embed=False, follow_links=True)
    assert (fixed.summary["added"], fixed.summary["existing"]) == (0, n + 2)
    # the row is the first add's: wait for the dataset, not for this job
    deadline = time.monotonic() + 60
    while ds.get_loading_progress()["status"] != "complete" and time.monotonic() < deadline:
        time.sleep(0.02)
    (row,) = (s for s in ds.samples() if os.fsencode(s.path) == b"gone\xe9.jpg")
    assert (row.status, row.width, row.height, row.error) == ("indexed", 7, 3, None)
    p = ds.get_loading_progress()
    assert (p["total"], p["failed"], p["status"]) == (n + 2, n - 1, "complete")
