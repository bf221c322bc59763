"""`fastindex index` on the command line: a real subprocess over generated images."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

from PIL import Image


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fastindex.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def make_folder(root: Path) -> None:
    (root / "a" / "b").mkdir(parents=True)
    for i in range(30):
        Image.new("RGB", (20 + i, 10 + i)).save(root / "a" / f"{i}.jpg")
        Image.new("L", (5 + i, 7)).save(root / "a" / "b" / f"{i}.png")
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (root / "notes.txt").write_text("ignored")


def test_index_prints_progress_and_summary(tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    make_folder(photos)
    db = tmp_path / "cli.db"
    r = run_cli("index", str(photos), "--db", str(db), "--no-embed", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    # the bars are drawn per phase, and the summary gives the counts and the failure
    assert "1 scan" in r.stderr and "2 probe" in r.stderr
    assert "61 added" in r.stderr
    assert "failed 1" in r.stderr
    assert "broken.jpg" in r.stderr
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    by_status = dict(con.execute("SELECT status, COUNT(*) FROM samples GROUP BY status").fetchall())
    assert by_status == {"indexed": 60, "failed": 1}

    again = run_cli("index", str(photos), "--db", str(db), "--no-embed", "--quiet", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "0 added, 61 already there" in again.stderr


def test_index_coco(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (64, 48)).save(images / "one.jpg")
    coco = {
        "images": [
            {"id": 1, "file_name": "one.jpg", "width": 64, "height": 48},
            {"id": 2, "file_name": "gone.jpg", "width": 10, "height": 10},
        ],
        "categories": [{"id": 3, "name": "cat"}],
        "annotations": [{"id": 9, "image_id": 1, "category_id": 3, "bbox": [1, 2, 3, 4]}],
    }
    ann = tmp_path / "instances.json"
    ann.write_text(json.dumps(coco))
    db = tmp_path / "coco.db"
    r = run_cli(
        "index", str(images), "--coco", str(ann), "--db", str(db), "--no-embed", cwd=tmp_path
    )
    assert r.returncode == 0, r.stderr
    assert "1 COCO images not found on disk" in r.stderr
    assert "gone.jpg" in r.stderr


def test_bad_arguments_exit_with_a_message(tmp_path: Path) -> None:
    r = run_cli(
        "index", str(tmp_path / "nope"), "--db", str(tmp_path / "x.db"), "--no-embed", cwd=tmp_path
    )
    assert r.returncode == 2
    assert r.stderr.startswith("fastindex: ")
    assert "nope" in r.stderr
    assert "Traceback" not in r.stderr

    bad = tmp_path / "bad.json"
    bad.write_text('{"images": [{"id": 1}]}')
    r = run_cli(
        "index",
        str(tmp_path),
        "--coco",
        str(bad),
        "--db",
        str(tmp_path / "y.db"),
        "--no-embed",
        cwd=tmp_path,
    )
    assert r.returncode == 2
    assert "bad.json" in r.stderr and "file_name" in r.stderr
    assert "Traceback" not in r.stderr
    # nothing was left behind: no dataset, no rows
    con = sqlite3.connect(f"file:{tmp_path / 'y.db'}?mode=ro", uri=True)
    assert con.execute("SELECT COUNT(*) FROM datasets").fetchone() == (0,)
    assert con.execute("SELECT COUNT(*) FROM samples").fetchone() == (0,)
