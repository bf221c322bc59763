"""The store's rate and time left per phase, against the commits that made them (a real store,
commits made through the store's own calls): `progress()["phases"]`, the top-level `rate`,
`eta_s` and `rate_phase`, and the same numbers over HTTP."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from fastindex import _core
from server_support import make_coco, make_images, probe_held
from testkit import sql

DIM = 4


def _vectors(n: int) -> bytes:
    return b"\x00\x3c" * DIM * n  # float16 1.0


def _store_with_rows(tmp_path: Path, n: int) -> tuple[_core.Store, int]:
    store = _core.Store(str(tmp_path / "s.db"))
    did = store.create_dataset("d")
    make_images(tmp_path / "imgs", n)
    store.scan(did, tmp_path / "imgs")
    return store, did


class Clock:
    """Brackets store calls with wall-clock readings: a commit's time lies between them."""

    def __init__(self) -> None:
        self.marks: list[tuple[float, float]] = []

    def call(self, f: Any, *args: Any, **kw: Any) -> Any:
        before = time.time()
        out = f(*args, **kw)
        self.marks.append((before, time.time()))
        return out


def between(rate: float, rows: int, first: tuple[float, float], last: tuple[float, float]) -> None:
    """`rate` is `rows` over the time from a commit within `first` to one within `last`."""
    longest, shortest = last[1] - first[0], last[0] - first[1]
    assert rows / longest <= rate * (1 + 1e-9), (rate, rows / longest)
    assert shortest <= 0 or rate <= rows / shortest * (1 + 1e-9), (rate, rows / shortest)


def test_embed_rate_and_eta_follow_its_commits(tmp_path: Path) -> None:
    store, did = _store_with_rows(tmp_path, 30)
    store.probe_pending(did)
    model = store.register_model("m", "x", DIM)
    store.set_embed_spec(did, json.dumps({"name": "m"}), model)

    p = store.progress(did)
    assert p["status"] == "in_progress"
    assert p["phases"]["embed"] == {"done": 0, "total": 30, "rate": None, "eta_s": None}
    # phase 2 is done: no rate; the embed phase has rows left and no rate yet, so it is the
    # one completion waits on, with no time left to show
    assert p["phases"]["probe"] == {"done": 30, "total": 30, "rate": None, "eta_s": None}
    assert (p["rate"], p["eta_s"], p["rate_phase"]) == (None, None, "embed")

    clock = Clock()
    first = clock.call(store.claim_for_embedding, did, 5)
    time.sleep(0.2)
    ids = [int(i) for i, _ in first]
    clock.call(store.finish_embeddings, did, model, ids[:4], _vectors(4), [(ids[4], "bad")])
    p = store.progress(did)
    e = p["phases"]["embed"]
    assert (e["done"], e["total"]) == (4, 4 + 25)
    between(e["rate"], 5, clock.marks[0], clock.marks[1])
    assert e["eta_s"] == pytest.approx(25 / e["rate"])
    assert (p["rate"], p["eta_s"], p["rate_phase"]) == (e["rate"], e["eta_s"], "embed")

    # Between two commits the rate stays what the commits said (it is not measured to now).
    time.sleep(0.3)
    assert store.progress(did)["phases"]["embed"] == e

    # A second batch: the rate spans both, from the first claim.
    second = clock.call(store.claim_for_embedding, did, 10, ids[-1])
    time.sleep(0.1)
    ids = [int(i) for i, _ in second]
    clock.call(store.finish_embeddings, did, model, ids, _vectors(10))
    e = store.progress(did)["phases"]["embed"]
    between(e["rate"], 15, clock.marks[0], clock.marks[3])
    assert e["eta_s"] == pytest.approx(15 / e["rate"])

    # The rest: the phase is done, nothing runs, no rate.
    rest = [int(i) for i, _ in store.claim_for_embedding(did, 100)]
    store.finish_embeddings(did, model, rest, _vectors(len(rest)))
    p = store.progress(did)
    assert p["status"] == "complete"
    assert p["phases"]["embed"] == {"done": 29, "total": 29, "rate": None, "eta_s": None}
    assert (p["rate"], p["eta_s"], p["rate_phase"]) == (None, None, None)


def test_probe_rate_is_kept_while_rows_wait(tmp_path: Path) -> None:
    store, did = _store_with_rows(tmp_path, 40)
    clock = Clock()
    clock.call(store.probe_pending, did)  # one commit, measured from the call's start
    assert store.progress(did)["phases"]["probe"]["rate"] is None  # done: not running
    make_images(tmp_path / "imgs" / "more", 10, start=500)
    store.scan(did, tmp_path / "imgs")
    p = store.progress(did)
    probe = p["phases"]["probe"]
    assert (probe["done"], probe["total"]) == (40, 50)
    between(probe["rate"], 40, clock.marks[0], clock.marks[0])
    assert probe["eta_s"] == pytest.approx(10 / probe["rate"])
    assert (p["rate"], p["eta_s"], p["rate_phase"]) == (probe["rate"], probe["eta_s"], "probe")


def test_a_phase_stopped_on_an_error_shows_no_rate(tmp_path: Path) -> None:
    store, did = _store_with_rows(tmp_path, 10)
    store.probe_pending(did)
    make_images(tmp_path / "imgs" / "more", 3, start=500)
    store.scan(did, tmp_path / "imgs")
    assert store.progress(did)["phases"]["probe"]["rate"] is not None
    store.set_phase_error(did, "probe", "disk is full")
    p = store.progress(did)
    assert p["phases"]["probe"] == {"done": 10, "total": 13, "rate": None, "eta_s": None}
    assert p["rate"] is None


def test_rates_are_per_dataset_and_go_with_it(tmp_path: Path) -> None:
    store, did = _store_with_rows(tmp_path, 10)
    other = store.create_dataset("other")
    store.probe_pending(did)
    db = str(tmp_path / "s.db")
    per = "SELECT COUNT(*) FROM throughput WHERE dataset_id = ?"
    ((mine,),), ((others,),) = sql(db, (per, [did]), (per, [other]))
    assert mine and not others
    store.delete_dataset(did)
    assert sql(db, ("SELECT COUNT(*) FROM throughput", [])) == [[[0]]]


def test_a_coco_ingest_records_its_rows(tmp_path: Path) -> None:
    """The ingest's commits are recorded as phase `ingest` (its rows arrive `indexed`, with no
    phase 2), with every row it brought in."""
    store = _core.Store(str(tmp_path / "s.db"))
    did = store.create_dataset("d")
    rows = make_images(tmp_path / "imgs", 25, broken=2)
    ann = make_coco(tmp_path / "instances.json", rows)
    store.ingest_coco(did, str(ann), str(tmp_path / "imgs"))
    q = "SELECT phase, SUM(n) FROM throughput WHERE dataset_id = ? GROUP BY phase"
    assert sql(tmp_path / "s.db", (q, [did])) == [[["ingest", 27]]]
    p = store.progress(did)
    # done: no ingest shown, phase 2 had nothing to do
    assert set(p["phases"]) == {"probe"} and p["rate"] is None


def test_entries_stay_few_at_many_commits(tmp_path: Path) -> None:
    """One entry per second of commits at most: progress reads a few dozen rows, whatever
    the number of commits or samples."""
    store, did = _store_with_rows(tmp_path, 60)
    store.probe_pending(did)
    model = store.register_model("m", "x", DIM)
    store.set_embed_spec(did, json.dumps({"name": "m"}), model)
    after = 0
    while rows := store.claim_for_embedding(did, 1, after):
        after = int(rows[0][0])
        store.finish_embeddings(did, model, [after], _vectors(1))
    (((n,),),) = sql(tmp_path / "s.db", ("SELECT COUNT(*) FROM throughput", []))
    assert n <= 8, n


def test_http_progress_carries_the_rates(tmp_path: Path) -> None:
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient
    from fastindex.server import create_app

    store, did = _store_with_rows(tmp_path, 12)
    store.probe_pending(did)
    make_images(tmp_path / "imgs" / "more", 4, start=500)
    store.scan(did, tmp_path / "imgs")
    db = str(tmp_path / "s.db")
    want = store.progress(did)
    # Another process holds phase 2: the rows wait, and the server's reads see its rate.
    with probe_held(db, did), TestClient(create_app(db, allowed_hosts=["testserver"])) as c:
        got = c.get(f"/api/progress/{did}").json()
        listed = {d["id"]: d["progress"] for d in c.get("/api/datasets").json()["items"]}
    for p in (got, listed[did]):
        assert p["phases"] == want["phases"]
        assert (p["rate"], p["eta_s"], p["rate_phase"]) == (
            want["rate"],
            want["eta_s"],
            "probe",
        )
        assert p["rate"] > 0
