"""kill -9 in the middle of a sync (a folder indexed before, added again after files changed,
were added and deleted), then the same add again: the store must equal a sync never killed.

Each trial copies one store indexed before the changes, kills a sync of it a random time into
the sync (drawn over the clean sync's length with a seeded RNG), runs it again, waits for phase
2, and compares every sample row (but its job: the killed run's job may hold some of the
changed rows) and the counters with the clean sync's.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

import kit
import pytest
import testkit

SEED = 11
TRIALS = 6
FILES = 20_000
_landed: list[bool] = []

SYNC = r"""
import json, sys, time
import fastindex
db, root = sys.argv[1], sys.argv[2]
ds = fastindex.Dataset.load("d", db=db, resume=False)
print(f"@start {time.monotonic()}", flush=True)
job = ds.add_images_from_path(root, embed=False)
print(f"@scanned {time.monotonic()}", flush=True)
assert ds.wait(timeout=120)
print("JSON " + json.dumps(dict(job.summary, progress={
    k: v for k, v in ds.get_loading_progress().items() if isinstance(v, int)})), flush=True)
"""

INDEX = r"""
import sys, fastindex
ds = fastindex.Dataset.create("d", db=sys.argv[1])
ds.add_images_from_path(sys.argv[2], embed=False)
assert ds.wait(timeout=120)
"""


def _run(script: str, *args: object, out: IO[str] | None = None) -> subprocess.Popen[str]:
    """A child running `script`; its stdout goes to `out` (a file this process can poll)."""
    return subprocess.Popen(
        [sys.executable, "-c", script, *map(str, args)],
        stdout=subprocess.PIPE if out is None else out,
        stderr=subprocess.PIPE,
        text=True,
        env=kit.child_env(),
    )


def _finish(proc: subprocess.Popen[str]) -> str:
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err[-3000:]
    return out


def _marks(text: str) -> dict[str, float]:
    return {
        line.split()[0][1:]: float(line.split()[1])
        for line in text.splitlines()
        if line.startswith("@")
    }


def _copy_store(src: Path, dest: Path) -> None:
    for suffix in ("", "-wal"):
        if Path(f"{src}{suffix}").exists():
            shutil.copyfile(f"{src}{suffix}", f"{dest}{suffix}")


def _samples(db: Path) -> list[Any]:
    (rows,) = testkit.sql(
        db,
        (
            "SELECT root_id, hex(CAST(path AS BLOB)), typeof(path), size_bytes, mtime_ns, status,"
            " width, height, format, orientation, error FROM samples ORDER BY 1, 2",
            [],
        ),
    )
    return list(rows)


@pytest.fixture(scope="module")
def before(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """A tree, a store indexed from it, the tree changed, and a clean sync of a copy."""
    base = tmp_path_factory.mktemp("sync")
    root = base / "tree"
    blobs = [testkit.small_png(i, (3 + i % 7, 2 + i % 5)) for i in range(40)]
    for i in range(FILES):
        testkit.write(root / f"d{i % 30:02d}/img_{i:05d}.png", blobs[i % len(blobs)])
    store = base / "indexed.db"
    _finish(_run(INDEX, store, root))
    rng = random.Random(SEED)
    for i in rng.sample(range(FILES), FILES // 5):  # changed
        p = root / f"d{i % 30:02d}/img_{i:05d}.png"
        p.write_bytes(blobs[(i + 1) % len(blobs)] + b"\0" * (1 + i % 3))
    for i in rng.sample(range(FILES), FILES // 10):  # deleted (some of them changed too)
        (root / f"d{i % 30:02d}/img_{i:05d}.png").unlink(missing_ok=True)
    shutil.rmtree(root / "d07")
    for i in range(FILES // 10):  # new
        testkit.write(root / f"new{i % 7}/n_{i:05d}.png", blobs[i % len(blobs)])
    clean = base / "clean.db"
    _copy_store(store, clean)
    out = _finish(_run(SYNC, clean, root))
    marks = _marks(out)
    (base / "length").write_text(str(marks["scanned"] - marks["start"]))
    summary = json.loads(next(line[5:] for line in out.splitlines() if line.startswith("JSON ")))
    assert summary["removed"] > FILES // 20 and summary["changed"] > 0 and summary["added"] > 0
    return root, store, clean


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("trial", range(TRIALS))
def test_kill_9_mid_sync_then_sync_again_matches_a_clean_sync(
    trial: int, before: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    root, store, clean = before
    length = float((clean.parent / "length").read_text())
    db = tmp_path / "store.db"
    _copy_store(store, db)
    log = tmp_path / "killed.out"
    with log.open("w") as f:
        proc = _run(SYNC, db, root, out=f)
    deadline = time.monotonic() + 60
    while "@start" not in log.read_text():
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr
        time.sleep(0.001)
    # a random time into the sync, drawn over the clean sync's length
    time.sleep(random.Random(f"{SEED}-{trial}").uniform(0.0, length))
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    _landed.append("@scanned" not in log.read_text())
    if len(_landed) == TRIALS:
        kit.record(
            f"kill -9 mid-sync: {length:.3f} s long, {sum(_landed)}/{TRIALS} kills inside it"
        )
    out = _finish(_run(SYNC, db, root))
    (line,) = [x for x in out.splitlines() if x.startswith("JSON ")]
    progress = json.loads(line[5:])["progress"]
    counts = testkit.status_counts(db, 1)
    assert {s: progress[s] for s in counts} == counts, "counters drifted"
    assert _samples(db) == _samples(clean)
