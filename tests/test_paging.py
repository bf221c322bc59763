"""Keyset paging while the dataset changes under it: rows are added, probed, failed, claimed
for embedding and given back between two pages. Each row is returned at most once, in id
order, and every row that matched the filter during the whole walk is returned."""

from __future__ import annotations

import itertools
from typing import Any

import fastindex
import pytest
from fastindex import _core
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from testkit import small_png, write

FILTERS: list[dict[str, Any]] = [
    {},
    {"status": "pending"},
    {"status": "indexed"},
    {"status": "embedding"},
    {"status": "failed"},
    {"format": "PNG"},
    {"path_glob": "b*"},
]

_names = itertools.count()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("paging")
    db = tmp / "p.db"
    fastindex.Dataset.create("seed", db=db)
    return {"tmp": tmp, "db": db, "store": _core.Store(str(db))}


def _add(world: dict[str, Any], did: int, n: int, broken: int) -> None:
    """`n` new files in a folder of their own (phase 1 only: `pending` rows)."""
    folder = world["tmp"] / f"add{next(_names)}"
    for i in range(n):
        prefix = "a" if i % 2 else "b"
        if i < broken:
            write(folder / f"{prefix}{i}.png", b"not an image")
        else:
            write(folder / f"{prefix}{i}.png", small_png(seed=i))
    world["store"].scan(did, str(folder))


def _statuses(ds: fastindex.Dataset) -> dict[int, str]:
    return {s.id: s.status for s in ds.iter_samples()}


def _matches(s: fastindex.Sample, f: dict[str, Any]) -> bool:
    if "status" in f and s.status != f["status"]:
        return False
    if "format" in f and s.format != f["format"]:
        return False
    return not ("path_glob" in f and not s.path.startswith("b"))


ops = st.lists(
    st.one_of(
        st.tuples(st.just("page"), st.integers(1, 7)),
        st.tuples(st.just("add"), st.integers(1, 6), st.integers(0, 2)),
        st.tuples(st.just("probe")),
        st.tuples(st.just("claim"), st.integers(1, 4)),
        st.tuples(st.just("release")),
    ),
    min_size=1,
    max_size=25,
)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(f=st.sampled_from(FILTERS), start=st.integers(0, 12), steps=ops)
def test_keyset_pages_return_each_row_once_while_rows_change(
    world: dict[str, Any], f: dict[str, Any], start: int, steps: list[tuple[Any, ...]]
) -> None:
    store = world["store"]
    name = f"d{next(_names)}"
    ds = fastindex.Dataset.create(name, db=world["db"])
    if start:
        _add(world, ds.id, start, broken=1)
    store.probe_pending(ds.id)
    got: list[int] = []
    after = 0
    done = False
    # Rows that matched at every moment of the walk: each must come back, exactly once.
    always = {s.id for s in ds.iter_samples() if _matches(s, f)}

    def read_page(limit: int) -> None:
        nonlocal after, done
        rows = ds.samples(after_id=after, limit=limit, **f)
        assert all(_matches(s, f) for s in rows)
        got.extend(s.id for s in rows)
        if len(rows) < limit:
            done = True
        else:
            after = rows[-1].id

    for step in steps:
        if done:
            break
        kind = step[0]
        if kind == "page":
            read_page(step[1])
            continue
        if kind == "add":
            _add(world, ds.id, step[1], step[2])
        elif kind == "probe":
            store.probe_pending(ds.id)
        elif kind == "claim":
            store.claim_for_embedding(ds.id, step[1], 0)
        elif kind == "release":
            store.release_claims(ds.id)
        now = {s.id for s in ds.iter_samples() if _matches(s, f)}
        always &= now
    while not done:
        read_page(5)
    assert got == sorted(set(got)), "each row once, in id order"
    assert always <= set(got)
    ds.delete()
