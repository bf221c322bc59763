"""Following a folder live (`Dataset.watch`, `fastindex index --watch`): real file operations
in a temporary folder, the real watcher (inotify), the real store and background work."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import fastindex
import pytest
from server_support import probe_held, wait_until
from testkit import small_png, write

PNG = small_png(1)
BIGGER = small_png(2, size=(31, 17))
CLI = (sys.executable, "-m", "fastindex.cli")


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    root = tmp_path / "photos"
    for i in range(3):
        write(root / f"a{i}.png", PNG)
    return root


@pytest.fixture
def watched(
    new_dataset: Callable[..., fastindex.Dataset], photos: Path
) -> Iterator[tuple[fastindex.Dataset, fastindex.Watcher]]:
    ds = new_dataset()
    with ds.watch(photos, embed=False) as w:
        # The first full sync (the catch-up) is through before the test changes anything.
        wait_until(lambda: w.stats()["full_syncs"] >= 1)
        complete(ds)
        yield ds, w
    assert not w.running


@contextlib.contextmanager
def store_write_held(db: str) -> Iterator[None]:
    """Hold the store's write lock as another process's long transaction would. (Another
    process: two SQLite libraries in one process, Python's and ours, would release each
    other's POSIX locks.)"""
    code = (
        "import sqlite3, sys\n"
        "con = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=30)\n"
        "con.execute('BEGIN IMMEDIATE')\n"
        "print('held', flush=True)\n"
        "sys.stdin.read()\n"
        "con.execute('ROLLBACK')\n"
    )
    with subprocess.Popen(
        [sys.executable, "-c", code, db], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    ) as holder:
        assert holder.stdin is not None and holder.stdout is not None
        try:
            assert holder.stdout.readline() == "held\n"
            yield
        finally:
            holder.stdin.close()
            assert holder.wait(30) == 0


def complete(ds: fastindex.Dataset) -> None:
    """Wait until every row is through phase 2. (`ds.wait` returns False at once when no
    phase runs here and the dataset is not complete: during a watcher's full sync.)"""
    wait_until(lambda: ds.get_loading_progress()["status"] == "complete", 60)


def rows(ds: fastindex.Dataset) -> dict[str, fastindex.Sample]:
    return {s.path: s for s in ds.samples()}


def status_of(ds: fastindex.Dataset, path: str) -> str | None:
    s = rows(ds).get(path)
    return None if s is None else s.status


def becomes(ds: fastindex.Dataset, path: str, status: str) -> fastindex.Sample:
    """Wait (a hang guard, not a timing) until `path` has `status`; return its row."""
    got: fastindex.Sample = wait_until(
        lambda: (s := rows(ds).get(path)) is not None and s.status == status and s
    )
    return got


def test_copy_in_is_pending_then_indexed(
    watched: tuple[fastindex.Dataset, fastindex.Watcher], tmp_path: Path
) -> None:
    ds, _ = watched
    outside = write(tmp_path / "elsewhere" / "new.png", PNG)
    with probe_held(ds.db, ds.id):
        shutil.copy(outside, tmp_path / "photos" / "new.png")
        becomes(ds, "new.png", "pending")
    s = becomes(ds, "new.png", "indexed")
    assert (s.width, s.height, s.format) == (7, 5, "PNG")


def test_move_in_rename_and_delete(
    watched: tuple[fastindex.Dataset, fastindex.Watcher], tmp_path: Path
) -> None:
    ds, _ = watched
    photos = tmp_path / "photos"
    outside = write(tmp_path / "elsewhere" / "moved.png", PNG)
    os.rename(outside, photos / "moved.png")
    becomes(ds, "moved.png", "indexed")

    os.rename(photos / "a0.png", photos / "renamed.png")
    becomes(ds, "renamed.png", "indexed")
    becomes(ds, "a0.png", "missing")

    (photos / "a1.png").unlink()
    becomes(ds, "a1.png", "missing")
    assert ds.get_loading_progress()["missing"] == 2


def test_rewrite_in_place_is_pending_again_with_its_new_size(
    watched: tuple[fastindex.Dataset, fastindex.Watcher], tmp_path: Path
) -> None:
    ds, _ = watched
    target = tmp_path / "photos" / "a2.png"
    with probe_held(ds.db, ds.id):
        target.write_bytes(BIGGER)
        s = wait_until(
            lambda: (
                (s := rows(ds)["a2.png"]).size_bytes == len(BIGGER) and s.status == "pending" and s
            )
        )
        assert s.width is None  # what phase 2 wrote of the old file is dropped
    s = becomes(ds, "a2.png", "indexed")
    assert (s.width, s.height) == (31, 17)


def test_a_file_still_being_written_ends_up_whole(
    watched: tuple[fastindex.Dataset, fastindex.Watcher], tmp_path: Path
) -> None:
    ds, w = watched
    before = w.stats()["batches"]
    with open(tmp_path / "photos" / "slow.png", "wb") as f:
        f.write(BIGGER[:40])
        f.flush()
        # A batch applies the half-written file (it may even fail phase 2, truncated) ...
        wait_until(lambda: w.stats()["batches"] > before and "slow.png" in rows(ds))
        f.write(BIGGER[40:])
    # ... and the close makes the watcher look again: the row follows the whole file.
    s = wait_until(
        lambda: (
            (s := rows(ds)["slow.png"]).status == "indexed" and s.size_bytes == len(BIGGER) and s
        )
    )
    assert (s.width, s.height) == (31, 17)


def test_new_subfolder_with_files(
    watched: tuple[fastindex.Dataset, fastindex.Watcher], tmp_path: Path
) -> None:
    ds, _ = watched
    sub = tmp_path / "photos" / "new" / "deeper"
    sub.mkdir(parents=True)
    for i in range(40):
        (sub / f"{i}.png").write_bytes(PNG)
    wait_until(lambda: sum(p.startswith("new/deeper/") for p in rows(ds)) == 40)
    complete(ds)
    # a file made after the folder's watch is in place is followed too
    (sub / "late.png").write_bytes(PNG)
    becomes(ds, "new/deeper/late.png", "indexed")


def test_a_burst_is_applied_in_few_transactions(
    watched: tuple[fastindex.Dataset, fastindex.Watcher], tmp_path: Path
) -> None:
    ds, w = watched
    before = w.stats()["batches"]
    n = 2_000
    burst = tmp_path / "photos" / "burst"
    burst.mkdir()
    for i in range(n):
        (burst / f"{i:05d}.png").write_bytes(PNG)
    wait_until(lambda: ds.get_loading_progress()["total"] == n + 3)
    complete(ds)
    assert ds.get_loading_progress()["indexed"] == n + 3
    batches = w.stats()["batches"] - before
    assert 1 <= batches <= n // 20, batches


def test_a_tiny_queue_overflows_and_a_full_sync_catches_up(
    new_dataset: Callable[..., fastindex.Dataset], photos: Path
) -> None:
    ds = new_dataset()
    with ds.watch(photos, embed=False, queue_size=1) as w:
        wait_until(lambda: w.stats()["full_syncs"] >= 1)
        # Another writer holds the store: the batch thread waits in its first batch's
        # transaction while files keep coming, so the queue of one path must overflow
        # (however fast the batch thread would otherwise take each event).
        with store_write_held(ds.db):
            before = w.stats()["batches"]
            (photos / "b000.png").write_bytes(PNG)
            wait_until(lambda: w.stats()["batches"] > before)
            for i in range(1, 300):
                (photos / f"b{i:03d}.png").write_bytes(PNG)
            (photos / "a0.png").unlink()
            wait_until(lambda: w.stats()["dropped"] > 0)
        wait_until(lambda: ds.get_loading_progress()["total"] == 303)
        wait_until(lambda: status_of(ds, "a0.png") == "missing")
        complete(ds)
        s = w.stats()
        assert s["dropped"] > 0 and s["overflows"] >= 1 and s["full_syncs"] >= 2, s
    assert ds.get_loading_progress()["indexed"] == 302


def test_stop_joins_and_a_new_watch_catches_up(
    new_dataset: Callable[..., fastindex.Dataset], photos: Path
) -> None:
    ds = new_dataset()
    w = ds.watch(photos, embed=False)
    assert w.running
    complete(ds)
    w.stop()
    assert not w.running and not w.stats()["running"]
    w.stop()  # idempotent
    # Changed while nobody watched: the next watcher's first sync sees it.
    (photos / "while-away.png").write_bytes(PNG)
    (photos / "a0.png").unlink()
    with ds.watch(photos, embed=False):
        becomes(ds, "while-away.png", "indexed")
        becomes(ds, "a0.png", "missing")


def test_the_folder_deleted_and_made_again(
    new_dataset: Callable[..., fastindex.Dataset], photos: Path
) -> None:
    ds = new_dataset()
    with ds.watch(photos, embed=False) as w:
        complete(ds)
        shutil.rmtree(photos)
        wait_until(lambda: ds.get_loading_progress()["missing"] == 3)
        wait_until(lambda: w.stats()["missing_roots"] == [str(photos.resolve())])
        assert w.running
        photos.mkdir()
        (photos / "a1.png").write_bytes(PNG)
        (photos / "back.png").write_bytes(PNG)
        becomes(ds, "back.png", "indexed")
        becomes(ds, "a1.png", "indexed")
        assert w.stats()["missing_roots"] == []
        assert ds.get_loading_progress()["missing"] == 2


def test_a_deleted_dataset_stops_its_watcher(
    new_dataset: Callable[..., fastindex.Dataset], photos: Path, db: Path
) -> None:
    ds = new_dataset()
    w = ds.watch(photos, embed=False)
    wait_until(lambda: w.stats()["full_syncs"] >= 1)
    ds.delete()
    (photos / "after.png").write_bytes(PNG)
    wait_until(lambda: not w.running)
    assert "no dataset" in (w.error or "")
    assert fastindex._core.Store(str(db)).progress(ds.id)["total"] == 0  # nothing added
    w.stop()


def test_watch_a_new_folder_adds_it_first(
    new_dataset: Callable[..., fastindex.Dataset], tmp_path: Path
) -> None:
    ds = new_dataset()
    with pytest.raises(fastindex.PathNotFoundError):
        ds.watch(tmp_path / "nope")
    with ds.watch(write(tmp_path / "p" / "x.png", PNG).parent, embed=False):
        assert "x.png" in rows(ds)  # phase 1 ran before watch returned


def test_watch_a_folder_inside_a_dataset_folder(
    new_dataset: Callable[..., fastindex.Dataset], photos: Path
) -> None:
    ds = new_dataset()
    write(photos / "sub" / "s.png", PNG)
    ds.add_images_from_path(photos, embed=False)
    with ds.watch(photos / "sub", embed=False) as w:
        wait_until(lambda: w.stats()["full_syncs"] >= 1)
        (photos / "sub" / "t.png").write_bytes(PNG)
        becomes(ds, "sub/t.png", "indexed")  # a path of the dataset's folder, not a new one
    assert ds._store.roots(ds.id) == [str(photos.resolve())]


def test_a_watcher_left_running_does_not_hold_the_exit(photos: Path, tmp_path: Path) -> None:
    code = f"""
import fastindex
ds = fastindex.Dataset.create("x", db={str(tmp_path / "x.db")!r})
w = ds.watch({str(photos)!r}, embed=False)
print(w.running)
"""
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert (r.returncode, r.stdout.strip()) == (0, "True"), r.stderr


# -- the command line ------------------------------------------------------------------------
@contextlib.contextmanager
def index_watch(tmp_path: Path, *extra: str) -> Iterator[tuple[subprocess.Popen[str], list[str]]]:
    """`fastindex index photos --watch` in a child, yielded once it says it watches, with the
    list its stderr lines go into. Killed at the end if still running."""
    proc = subprocess.Popen(
        [*CLI, "index", "photos", "--db", "w.db", "--no-embed", "--watch", "--quiet", *extra],
        cwd=tmp_path,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stderr is not None
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr or ()), daemon=True)
    reader.start()
    try:
        wait_until(lambda: any("watching" in x for x in lines) or proc.poll() is not None, 60)
        assert proc.poll() is None, "".join(lines)
        yield proc, lines
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)
        reader.join(30)
        proc.stderr.close()


def interrupt(proc: subprocess.Popen[str], lines: list[str]) -> int:
    """Ctrl-C; the exit code (a hang guard: it must stop)."""
    proc.send_signal(signal.SIGINT)
    try:
        return proc.wait(30)
    except subprocess.TimeoutExpired:
        raise AssertionError("index --watch did not stop on Ctrl-C: " + "".join(lines)) from None


def test_cli_index_watch_follows_and_stops_on_ctrl_c(photos: Path, tmp_path: Path) -> None:
    with index_watch(tmp_path) as (proc, lines):
        ds = fastindex.Dataset.load("photos", db=tmp_path / "w.db", resume=False)
        (photos / "dropped-in.png").write_bytes(PNG)
        becomes(ds, "dropped-in.png", "indexed")
        assert interrupt(proc, lines) == 0, "".join(lines)
    assert any("stopped watching" in x for x in lines), "".join(lines)


def test_cli_watch_with_coco_is_a_bad_argument(tmp_path: Path) -> None:
    r = subprocess.run(
        [
            *CLI,
            "index",
            str(tmp_path),
            "--coco",
            "x.json",
            "--watch",
            "--db",
            str(tmp_path / "c.db"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert r.returncode == 2 and "--watch" in r.stderr, r.stderr


@pytest.mark.browser
def test_page_gallery_fills_under_index_watch_serve(
    page: Any, photos: Path, tmp_path: Path
) -> None:
    import socket

    from playwright.sync_api import expect

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with index_watch(tmp_path, "--serve", "--port", str(port)) as (proc, lines):
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: any(url in x for x in lines), 30)
        ds = fastindex.Dataset.load("photos", db=tmp_path / "w.db", resume=False)
        page.goto(f"{url}/?dataset={ds.id}")
        tiles = page.locator("#gallery .tile")
        expect(tiles).to_have_count(3)
        expect(page.locator("#n-total")).to_have_text("3")
        for i in range(2):
            (photos / f"arrived{i}.png").write_bytes(PNG)
        expect(tiles).to_have_count(5)
        expect(page.locator("#n-total")).to_have_text("5")
        expect(page.locator("#gallery .tile[data-status=indexed]")).to_have_count(5)
        assert interrupt(proc, lines) == 0, "".join(lines)
