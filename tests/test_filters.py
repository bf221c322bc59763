"""`Dataset.samples` filters against a brute-force filter over every row, keyset paging, the
facet counters (kept by triggers) against counts by hand, and the schema-4 migration."""

from __future__ import annotations

import fnmatch
from pathlib import Path
from typing import Any

import fastindex
import pytest
from fastindex.errors import InvalidArgumentError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from server_support import make_coco, make_images
from testkit import UNDO_LATER_COLUMNS, finish, sql


@pytest.fixture(scope="module")
def ds(tmp_path_factory: pytest.TempPathFactory) -> fastindex.Dataset:
    tmp = tmp_path_factory.mktemp("filters")
    rows = make_images(tmp / "images", 60, broken=4)
    # Half the images in the COCO file; the other half (and the broken files) added as a folder.
    ann = make_coco(tmp / "coco.json", rows[:30])
    d = fastindex.Dataset.create("f", db=tmp / "f.db")
    finish(
        d, d.add_samples_from_coco(annotations_json=ann, images_path=tmp / "images", embed=False)
    )
    finish(d, d.add_images_from_path(tmp / "images", embed=False))
    return d


def _categories(ds: fastindex.Dataset) -> dict[int, set[str]]:
    out: dict[int, set[str]] = {}
    for a in ds.annotations():
        out.setdefault(a.sample_id, set()).add(a.category)
    return out


def _brute(ds: fastindex.Dataset, **f: Any) -> list[int]:
    cats = _categories(ds)
    out = []
    for s in ds.samples():
        if f.get("status") is not None and s.status != f["status"]:
            continue
        if f.get("format") is not None and s.format != f["format"]:
            continue
        ok = True
        for key, attr, cmp in (
            ("min_width", "width", lambda v, b: v >= b),
            ("max_width", "width", lambda v, b: v <= b),
            ("min_height", "height", lambda v, b: v >= b),
            ("max_height", "height", lambda v, b: v <= b),
        ):
            if f.get(key) is not None:
                v = getattr(s, attr)
                ok = ok and v is not None and cmp(v, f[key])
        if not ok:
            continue
        if f.get("path_glob") is not None and not fnmatch.fnmatchcase(s.path, f["path_glob"]):
            continue
        if f.get("category") is not None and f["category"] not in cats.get(s.id, set()):
            continue
        if f.get("has_annotations") is not None and (s.id in cats) != f["has_annotations"]:
            continue
        out.append(s.id)
    return out


filters = st.fixed_dictionaries(
    {},
    optional={
        "status": st.sampled_from(["indexed", "failed", "pending"]),
        "format": st.sampled_from(["JPEG", "PNG", "GIF"]),
        "min_width": st.integers(40, 120),
        "max_width": st.integers(40, 120),
        "min_height": st.integers(30, 90),
        "max_height": st.integers(30, 90),
        "path_glob": st.sampled_from(["part1/*", "*.png", "*0?.jpg", "broken*", "part[02]/*"]),
        "category": st.sampled_from(["cat", "dog", "bird"]),
        "has_annotations": st.booleans(),
    },
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(f=filters, page=st.integers(1, 25))
def test_filters_match_a_brute_force_filter(
    ds: fastindex.Dataset, f: dict[str, Any], page: int
) -> None:
    want = _brute(ds, **f)
    assert [s.id for s in ds.samples(**f)] == want
    # Keyset pages put together give the same rows.
    got: list[int] = []
    after = 0
    while True:
        rows = ds.samples(**f, after_id=after, limit=page)
        got += [s.id for s in rows]
        if len(rows) < page:
            break
        after = rows[-1].id
    assert got == want
    # iter_samples walks the same pages.
    assert [s.id for s in ds.iter_samples(**f, page=page)] == want


def test_the_fixture_has_every_kind_of_row(ds: fastindex.Dataset) -> None:
    assert _brute(ds, category="dog") and _brute(ds, has_annotations=False)
    assert _brute(ds, status="failed") and _brute(ds, format="PNG") and _brute(ds, format="JPEG")


def test_facets_match_counts_by_hand(ds: fastindex.Dataset) -> None:
    f = ds.facets()
    rows = ds.samples()
    formats: dict[str, int] = {}
    for s in rows:
        if s.format is not None:
            formats[s.format] = formats.get(s.format, 0) + 1
    assert f["format"] == formats
    cats = _categories(ds)
    assert f["category"] == {c: sum(c in v for v in cats.values()) for c in ("cat", "dog")}
    assert f["status"]["failed"] == len(_brute(ds, status="failed"))
    assert sum(f["status"].values()) == len(rows)


def test_facets_follow_a_delete_and_reingest(tmp_path: Path, db: Path) -> None:
    rows = make_images(tmp_path / "i", 9)
    ann = make_coco(tmp_path / "c.json", rows)
    a = fastindex.Dataset.create("a", db=db)
    finish(
        a, a.add_samples_from_coco(annotations_json=ann, images_path=tmp_path / "i", embed=False)
    )
    b = fastindex.Dataset.create("b", db=db)
    finish(
        b, b.add_samples_from_coco(annotations_json=ann, images_path=tmp_path / "i", embed=False)
    )
    fa = a.facets()
    assert fa["format"] == b.facets()["format"] and sum(fa["format"].values()) == 9
    a.delete()
    assert b.facets() == fa
    # Adding the same file again adds nothing, and counts nothing twice.
    finish(
        b, b.add_samples_from_coco(annotations_json=ann, images_path=tmp_path / "i", embed=False)
    )
    assert b.facets() == fa
    (rows,) = sql(db, ("SELECT COUNT(*) FROM format_counts WHERE dataset_id = ?", [a.id]))
    assert rows == [[0]]


@pytest.mark.parametrize(
    "bad",
    [
        {"status": "gone"},
        {"min_width": "10"},
        {"max_height": True},
        {"has_annotations": 1},
        {"format": ""},
        {"category": 3},
        {"after_id": -1},
        {"limit": 1.5},
    ],
)
def test_bad_filters_are_invalid_arguments(ds: fastindex.Dataset, bad: dict[str, Any]) -> None:
    with pytest.raises(InvalidArgumentError):
        ds.samples(**bad)


def test_unknown_category_matches_nothing(ds: fastindex.Dataset) -> None:
    assert ds.samples(category="unicorn") == []


def test_filter_queries_use_indexes(ds: fastindex.Dataset) -> None:
    """The plans SQLite picks: a format page walks the format index, a category page the
    category index, never a full scan of samples."""
    # Read in a child process (testkit.sql): two SQLite copies in one process break WAL locks.
    (rows,) = sql(
        ds.db,
        (
            "EXPLAIN QUERY PLAN SELECT s.id FROM samples s WHERE s.dataset_id = ?1 AND s.id > ?2"
            " AND s.format = ?5 ORDER BY s.id LIMIT ?3 OFFSET ?4",
            [ds.id, 0, 10, 0, "PNG"],
        ),
    )
    plan = " ".join(r[-1] for r in rows)
    assert "samples_by_format" in plan and "SCAN" not in plan


def test_a_version_2_store_is_migrated_with_counters_filled(tmp_path: Path, db: Path) -> None:
    rows = make_images(tmp_path / "i", 8)
    ann = make_coco(tmp_path / "c.json", rows)
    d = fastindex.Dataset.create("old", db=db)
    finish(
        d, d.add_samples_from_coco(annotations_json=ann, images_path=tmp_path / "i", embed=False)
    )
    want = d.facets()
    d.cancel()
    triggers = [
        "format_count_insert",
    ]
    sql(
        db,
        *[(f"DROP TRIGGER {t}", []) for t in triggers],
        ("DROP INDEX samples_by_format", []),
        ("DROP INDEX annotations_by_category", []),
        ("DROP TABLE format_counts", []),
        ("DROP TABLE category_counts", []),
        *[(statement, []) for statement in UNDO_LATER_COLUMNS],
        ("UPDATE meta SET value = '2' WHERE key = 'schema_version'", []),
        write=True,
    )
    again = fastindex.Dataset.load("old", db=db)
    assert again.facets() == want
    assert [s.id for s in again.samples(category="dog")] == _brute(again, category="dog")


def test_path_glob_reaches_names_that_are_not_utf8(tmp_path: Path, db: Path) -> None:
    import os

    from testkit import small_png

    root = tmp_path / "raw"
    root.mkdir()
    for name in (b"caf\xe9.png", b"cafe.png", b"other.png"):
        with open(os.path.join(os.fsencode(root), name), "wb") as f:
            f.write(small_png())
    d = fastindex.Dataset.create("raw", db=db)
    finish(d, d.add_images_from_path(root, embed=False))
    names = {os.fsencode(s.path) for s in d.samples(path_glob="caf*")}
    assert names == {b"caf\xe9.png", b"cafe.png"}
    assert len(d.samples(path_glob="*.png")) == 3
    assert {os.fsencode(s.path) for s in d.samples(path_glob="cafe*")} == {b"cafe.png"}
