"""Disk full (ENOSPC) in the middle of phase 2: `fastindex index` stops within seconds with an
error that names the store and exit code 1 (no busy loop); once there is space again the next
run finishes with nothing lost or doubled, and no stale error is left in the progress.

The store lives on a small tmpfs (needs root: CI runs as root; skipped with a reason
elsewhere). Phase 1 runs first with room to spare; the free space is then cut to less than
one probe batch needs, so the failure lands in phase 2, where issue 7 (item 12) found it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import kit
import pytest

HANG_GUARD = 5.0  # seconds for the failing run, process start included: it must stop, not spin
LEFT_FREE = 192 * 1024  # room for the rerun's phase 1 (a job row), not for a probe batch

_PHASE_1_ONLY = """
db, root = sys.argv[1], sys.argv[2]
ds = fastindex.Dataset.create(os.environ.get("FAULTS_DATASET", "faults"), db=db)
job = ds.add_images_from_path(root, embed=False)
ds.cancel()
print("JSON " + json.dumps(ds.get_loading_progress()), flush=True)
"""

# With Python's sqlite3 in a process that never opened the store with fastindex: fold the WAL
# into the database file and truncate it, so that phase 2 must grow a file on the full disk.
_CHECKPOINT = """
import sqlite3, sys
con = sqlite3.connect(sys.argv[1], timeout=30)
print(con.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone())
con.close()
"""


def _mount(path: Path, size: str) -> None:
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                   check=True, capture_output=True, text=True)  # fmt: skip


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a tmpfs (CI runs as root)")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        _mount(mnt, "64m")
    except (subprocess.CalledProcessError, FileNotFoundError) as e:
        pytest.skip(f"cannot mount a tmpfs here: {getattr(e, 'stderr', e)}")
    try:
        yield mnt
    finally:
        done = subprocess.run(["umount", str(mnt)], capture_output=True, check=False)
        if done.returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True, check=False)


def _free(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_disk_full_in_phase_2_fails_fast_then_the_next_run_recovers(
    tmpfs: Path, zygote: kit.Zygote, trees: kit.Trees, clean_runs: kit.CleanRuns
) -> None:
    clean, _ = clean_runs.get("images")
    db = tmpfs / "store.db"
    first = zygote.run(_PHASE_1_ONLY, [db, trees.big.root])
    assert first.wait(120) == 0, first.output()[-3000:]
    (after_1,) = first.json_lines()
    assert after_1["total"] == len(trees.big.files) and after_1["pending"] > 0, after_1
    done = subprocess.run([sys.executable, "-I", "-c", _CHECKPOINT, str(db)],
                          capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr

    filler = tmpfs / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.posix_fallocate(fd, 0, _free(tmpfs) - LEFT_FREE)
    finally:
        os.close(fd)

    args = ["index", trees.big.root, "--db", db, "--name", kit.NAME, "--no-embed"]
    t0 = time.monotonic()
    rc, out, err = kit.finish_cli(kit.cli(*args), timeout=HANG_GUARD)
    took = time.monotonic() - t0
    kit.record(f"ENOSPC in phase 2: exit {rc} after {took:.2f} s (process start included)")
    assert rc == 1, f"exit {rc} on a full disk:\n{err[-3000:]}"
    assert str(db) in err + out, f"the error does not name the store {db}:\n{err[-3000:]}"
    assert "Traceback" not in err, err[-3000:]

    # space again: the next run finishes everything, and a run after it has nothing to report
    subprocess.run(["mount", "-o", "remount,size=256m", str(tmpfs)], check=True)
    rc, out, err = kit.finish_cli(kit.cli(*args), timeout=180)
    assert rc == 0, f"the run after space was freed exited {rc}:\n{err[-3000:]}"
    assert "stopped" not in err, err[-3000:]
    kit.assert_same_store(kit.dump_store(db), clean)
    rc, out, err = kit.finish_cli(kit.cli(*args), timeout=180)
    assert rc == 0 and "stopped" not in err, f"a later run exited {rc}:\n{err[-3000:]}"
    kit.assert_same_store(kit.dump_store(db), clean)
