"""Opening a store: the file is recognised before anything is written to it, every file that
cannot be a store gives one typed line naming it, and concurrent first opens all succeed."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import fastindex
import pytest
from testkit import UNDO_LATER_COLUMNS, sql, table_counts, tmpfs

#: Every way to open a store that a user has.
OPENERS: dict[str, Callable[[Path], object]] = {
    "create": lambda db: fastindex.Dataset.create("a", db=db),
    "load_or_create": lambda db: fastindex.Dataset.load_or_create("a", db=db),
    "load": lambda db: fastindex.Dataset.load("a", db=db),
    "list": lambda db: fastindex.list_datasets(db=db),
}

MAKE_STORE = """
import sys, fastindex
ds = fastindex.Dataset.create("a", db=sys.argv[1])
for i in range(int(sys.argv[2])):
    fastindex.Dataset.create(f"filler-{i}-" + "x" * 150, db=sys.argv[1])
"""


def make_store(db: Path, fillers: int = 0) -> None:
    """A store with dataset "a", written and closed by another process (no -wal left)."""
    subprocess.run([sys.executable, "-c", MAKE_STORE, str(db), str(fillers)], check=True)
    assert not Path(f"{db}-wal").exists()


def assert_refused(db: Path, match: str) -> None:
    """Each opener fails with one line naming the file, and nothing appears beside it."""
    beside = sorted(os.listdir(db.parent))
    for name, opener in OPENERS.items():
        with pytest.raises(fastindex.StoreError) as e:
            opener(db)
        msg = str(e.value)
        assert str(db) in msg and "\n" not in msg, (name, msg)
        assert match in msg, (name, msg)
        assert sorted(os.listdir(db.parent)) == beside, name


def snapshot(path: Path) -> tuple[bytes, int]:
    return path.read_bytes(), path.stat().st_mtime_ns


@pytest.mark.parametrize("journal_mode", ["delete", "wal"])  # the two a file remembers
def test_another_applications_database_is_left_untouched(tmp_path: Path, journal_mode: str) -> None:
    db = tmp_path / "app.db"
    with contextlib.closing(sqlite3.connect(db)) as c:  # closed before fastindex opens it
        c.execute(f"PRAGMA journal_mode = {journal_mode}")
        c.execute("CREATE TABLE people (name TEXT)")
        c.execute("INSERT INTO people VALUES ('ada')")
        c.commit()
    before = snapshot(db)
    assert_refused(db, "not a fastindex store")
    assert snapshot(db) == before
    (mode,), (rows,) = sql(db, ("PRAGMA journal_mode", []), ("SELECT * FROM people", []))
    assert (mode[0], rows) == (journal_mode, ["ada"])


def test_a_folder_and_junk(tmp_path: Path) -> None:
    folder = tmp_path / "store.db"
    folder.mkdir()
    assert_refused(folder, "is a folder")
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"not a database at all\n" * 200)
    before = snapshot(junk)
    assert_refused(junk, "not an SQLite database")
    assert snapshot(junk) == before
    short = tmp_path / "short.db"
    short.write_bytes(b"SQLite format 3\x00\x10\x00")
    assert_refused(short, "not an SQLite database")
    # an empty file is a new database to SQLite, and so a new store
    empty = tmp_path / "empty.db"
    empty.touch()
    assert fastindex.Dataset.create("a", db=empty).id == 1


def test_a_truncated_store(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    make_store(db, fillers=300)
    size = db.stat().st_size
    assert size > 16 * 4096
    with open(db, "r+b") as f:
        f.truncate(size // 2)
    assert_refused(db, "truncated")  # SQLite compares the size in its header with the file


def test_a_store_whose_first_page_is_overwritten(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    make_store(db, fillers=50)
    with open(db, "r+b") as f:
        f.seek(100)
        f.write(b"\xa5" * 3000)
    assert_refused(db, "damaged")


@contextlib.contextmanager
def immutable(path: Path) -> Iterator[None]:
    """`path` unwritable even for root (`chattr +i`), in a folder that stays writable."""
    if os.geteuid() != 0:
        path.chmod(0o444)
        try:
            yield
        finally:
            path.chmod(0o644)
        return
    done = subprocess.run(["chattr", "+i", str(path)], capture_output=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"root cannot make a file read-only here (chattr: {done.stderr!r})")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


def test_a_read_only_store_leaves_nothing_behind(tmp_path: Path) -> None:
    """The case of a store opened by a user who may not write it: refused before SQLite
    would create a `-shm` with the store's read-only mode (which then kept its owner out)."""
    db = tmp_path / "s.db"
    make_store(db)
    before = snapshot(db)
    with immutable(db):
        assert_refused(db, "read-only")
        assert not Path(f"{db}-shm").exists() and not Path(f"{db}-wal").exists()
    assert snapshot(db) == before
    # permissions fixed: the store opens as if nothing had happened
    assert fastindex.Dataset.load("a", db=db, resume=False).name == "a"


def test_a_store_on_a_read_only_mount(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "mnt", "8m") as mnt:
        db = mnt / "s.db"
        make_store(db)
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
        assert_refused(db, "read-only")
        with pytest.raises(fastindex.StoreError, match="not writable"):
            fastindex.Dataset.create("a", db=mnt / "new.db")
        subprocess.run(["mount", "-o", "remount,rw", str(mnt)], check=True)
        assert fastindex.Dataset.load("a", db=db, resume=False).name == "a"


CONCURRENT = """
import sys, time
import fastindex
stores, start, gap = sys.argv[1:-2], float(sys.argv[-2]), float(sys.argv[-1])
for i, db in enumerate(stores):
    time.sleep(max(0.0, start + i * gap - time.time()))
    try:
        ds = fastindex.Dataset.load_or_create("images", db=db)
        print(ds.id, flush=True)
    except Exception as e:
        print(f"{type(e).__name__}: {e}", flush=True)
"""


@pytest.mark.timeout(180)
def test_concurrent_first_opens_and_load_or_create(tmp_path: Path) -> None:
    """Four processes open each new store and `load_or_create` one name at the same moment:
    all succeed, on one dataset and one schema."""
    rounds, procs, gap = 10, 4, 0.6
    stores = [str(tmp_path / f"s{i}.db") for i in range(rounds)]
    start = time.time() + 3.0  # after every child has imported fastindex
    children = [
        subprocess.Popen(
            [sys.executable, "-c", CONCURRENT, *stores, str(start), str(gap)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(procs)
    ]
    outputs = []
    for child in children:
        out, err = child.communicate(timeout=150)
        assert child.returncode == 0, err
        outputs.append(out.split("\n")[:rounds])
    for i, db in enumerate(stores):
        answers = [out[i] for out in outputs]
        assert answers == ["1"] * procs, (db, answers)
        counts = table_counts(db)
        assert counts["datasets"] == 1 and counts["meta"] >= 2, counts
        ((version,),) = sql(db, ("SELECT value FROM meta WHERE key = 'schema_version'", []))[0]
        assert version == str(fastindex.SCHEMA_VERSION)


MIGRATE = """
import sqlite3, sys
con = sqlite3.connect(sys.argv[1])
con.executescript('''
    ALTER TABLE jobs DROP COLUMN heartbeat;
    {undo};
    DELETE FROM meta WHERE key = 'last_dataset_id';
    UPDATE meta SET value = '1' WHERE key = 'schema_version';
''')
con.commit()
con.close()
""".replace("{undo}", ";\n    ".join(UNDO_LATER_COLUMNS))


def test_a_version_1_store_is_migrated_in_place(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    make_store(db, fillers=2)
    subprocess.run([sys.executable, "-c", MIGRATE, str(db)], check=True)
    before = table_counts(db)
    ds = fastindex.Dataset.load("a", db=db, resume=False)
    assert ds.id == 1
    # additive: every row is still there, and the high-water mark is new
    assert table_counts(db) == {**before, "meta": before["meta"] + 1}
    ((version,),) = sql(db, ("SELECT value FROM meta WHERE key = 'schema_version'", []))[0]
    assert version == str(fastindex.SCHEMA_VERSION)
    # the high-water mark starts at the highest id there was
    ds.delete()
    assert fastindex.Dataset.create("b", db=db).id == 4


def test_opening_again_in_this_process_keeps_the_first_connection_seeing(
    tmp_path: Path, db: Path
) -> None:
    """Recognising a file must not open it outside SQLite: closing that descriptor would drop
    the locks SQLite holds for this process's other connections, and a writer in another
    process could then reset the log under them (they would go on reading an old store)."""
    ds = fastindex.Dataset.create("a", db=db)
    for i in range(3):
        fastindex.list_datasets(db=db)  # another connection opened and closed here
        sql(db, ("INSERT INTO datasets (name, created_at) VALUES (?, 0)", [f"x{i}"]), write=True)
        assert len(ds._store.list_datasets()) == 2 + i
