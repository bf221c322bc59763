"""Liveness is time, not pid; ids are never reused; a commit by a process that lost its lease
writes nothing. Other processes are real processes, on the same store."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import fastindex
import pytest
from fastindex import _core
from testkit import small_png, sql, status_counts, table_counts, write

#: A process of another fastindex, on the same store: `python -c TAKE_OVER db did phase owner`.
TAKE_OVER = """
import sys
from fastindex import _core
db, did, phase, owner = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
# a ttl of 0: the current holder counts as silent, as after a long stall
print(_core.Store(db).acquire_lease(did, phase, owner, 0.0))
"""


def take_over(db: Path, dataset_id: int, phase: str, owner: str) -> None:
    done = subprocess.run(
        [sys.executable, "-c", TAKE_OVER, str(db), str(dataset_id), phase, owner],
        capture_output=True,
        text=True,
        check=True,
    )
    assert done.stdout.strip() == "True", done.stderr


def test_dataset_ids_are_never_reused(db: Path) -> None:
    a = fastindex.Dataset.create("a", db=db)
    b = fastindex.Dataset.create("b", db=db)
    b.delete()
    c = fastindex.Dataset.create("c", db=db)
    assert c.id > b.id > a.id
    c.delete()
    # the mark is in the store: another process, after the last delete, still counts on
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, fastindex; print(fastindex.Dataset.create('d', db=sys.argv[1]).id)",
            str(db),
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert int(out) > c.id
    assert fastindex.Dataset.load_or_create("b", db=db).id > int(out)


def job_marks(db: Path, owner: str, age: float) -> None:
    """Mark every job of the store as still adding rows, by `owner`, last heard `age` ago."""
    sql(
        db,
        ("UPDATE jobs SET running_owner = ?, heartbeat = ?", [owner, time.time() - age]),
        write=True,
    )


@pytest.mark.parametrize(
    "owner",
    [f"{socket.gethostname()}:1:reused", "another-host:4242:crashed"],
    ids=["live-reused-pid", "other-host"],
)
def test_a_stale_adding_mark_does_not_hold_progress(tmp_path: Path, db: Path, owner: str) -> None:
    """pid 1 is alive here (it is in every container) and a pid of another host cannot be
    asked about: only the heartbeat's age tells whether the add still runs."""
    ds = fastindex.Dataset.create("a", db=db)
    write(tmp_path / "r" / "a.png", small_png())
    assert ds.add_images_from_path(tmp_path / "r", embed=False).wait(timeout=30)
    assert ds.get_loading_progress()["status"] == "complete"
    job_marks(db, owner, age=5.0)  # renewed a moment ago: the add may well run
    assert ds.get_loading_progress()["status"] == "in_progress"
    job_marks(db, owner, age=3600.0)  # silent for an hour: gone, whatever its pid
    p = ds.get_loading_progress()
    assert p["status"] == "complete", p
    assert p["total"] == 1


def test_an_add_clears_its_mark(tmp_path: Path, db: Path) -> None:
    """An add's mark carries a heartbeat (renewed every few seconds while the add runs, see
    `db::Heartbeat`), and is gone once the add returns."""
    ds = fastindex.Dataset.create("a", db=db)
    write(tmp_path / "r" / "a.png", small_png())
    ds.add_images_from_path(tmp_path / "r", embed=False).wait(timeout=30)
    ((owner, heartbeat, created),) = sql(
        db, ("SELECT running_owner, heartbeat, created_at FROM jobs", [])
    )[0]
    assert owner is None and heartbeat is not None and heartbeat >= created


def pending_store(tmp_path: Path, db: Path, n: int = 20) -> tuple[_core.Store, int]:
    for i in range(n):
        write(tmp_path / "r" / f"{i:02d}.png", small_png(seed=i))
    store = _core.Store(str(db))
    did = store.create_dataset("a")
    assert store.scan(did, str(tmp_path / "r"))["added"] == n
    return store, did


def test_renew_lease_never_takes_over(tmp_path: Path, db: Path) -> None:
    store, did = pending_store(tmp_path, db, n=1)
    assert not store.renew_lease(did, "probe", "me", 15.0)  # nobody holds it: not taken
    assert store.acquire_lease(did, "probe", "me", 15.0)
    assert store.renew_lease(did, "probe", "me", 15.0)
    take_over(db, did, "probe", "other")
    assert not store.renew_lease(did, "probe", "me", 15.0)
    assert not store.acquire_lease(did, "probe", "me", 15.0)  # "other" is fresh
    with pytest.raises(fastindex.InvalidArgumentError):
        store.renew_lease(did, "probe", "other", 0.0)


def test_a_probe_without_the_lease_writes_nothing(tmp_path: Path, db: Path) -> None:
    store, did = pending_store(tmp_path, db)
    assert store.acquire_lease(did, "probe", "me", 15.0)
    take_over(db, did, "probe", "other")
    before = status_counts(db, did)
    with pytest.raises(fastindex.LeaseLostError, match="probe") as e:
        store.probe_pending(did, lease=("me", 15.0))
    assert isinstance(e.value, fastindex.StoreError) and str(db) in str(e.value)
    assert status_counts(db, did) == before
    assert before["pending"] == 20
    # the holder probes them
    other = _core.Store(str(db))
    assert other.probe_pending(did, lease=("other", 15.0)) == 20
    assert status_counts(db, did)["indexed"] == 20


def test_a_late_embedding_commit_after_a_take_over_writes_nothing(tmp_path: Path, db: Path) -> None:
    store, did = pending_store(tmp_path, db)
    store.probe_pending(did)
    dim = 4
    model = store.register_model("tiny", "none", dim)
    assert store.acquire_lease(did, "embed", "slow", 15.0)
    claimed = store.claim_for_embedding(did, 8, owner="slow")
    assert len(claimed) == 8
    ids = [i for i, _ in claimed]

    # another process takes the lease over: the rows "slow" held go back to the queue in the
    # same transaction
    take_over(db, did, "embed", "fast")
    assert status_counts(db, did)["embedding"] == 0
    before = table_counts(db)

    vectors = bytes(len(ids) * dim * 2)
    with pytest.raises(fastindex.LeaseLostError):
        store.finish_embeddings(did, model, ids, vectors, [(ids[0], "broken")], owner="slow")
    with pytest.raises(fastindex.LeaseLostError):
        store.claim_for_embedding(did, 8, owner="slow")
    assert table_counts(db) == before
    assert status_counts(db, did)["indexed"] == 20

    # the new holder embeds every row exactly once
    fast = _core.Store(str(db))
    done = []
    while rows := fast.claim_for_embedding(did, 8, owner="fast"):
        # the old holder's cancel path cannot give the new holder's claims back
        with pytest.raises(fastindex.LeaseLostError):
            store.release_claims(did, owner="slow")
        got = [i for i, _ in rows]
        fast.finish_embeddings(did, model, got, bytes(len(got) * dim * 2), owner="fast")
        done += got
    assert sorted(done) == sorted(set(done)) and len(done) == 20
    assert status_counts(db, did)["ready"] == 20
    ((n,),) = sql(db, ("SELECT COUNT(*) FROM embeddings", []))[0]
    assert n == 20
