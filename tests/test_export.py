"""Exports read back: COCO ingested again equals the original (boxes and segmentation byte for
byte), CSV through the csv module, Parquet through pyarrow; embeddings as .npy and Parquet."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import fastindex
import pytest
from fastindex import _core
from fastindex.errors import InvalidArgumentError
from fastindex.export import COLUMNS
from server_support import make_coco, make_images
from testkit import finish


def _coco_dataset(tmp_path: Path, db: Path, *, broken: int = 1) -> tuple[fastindex.Dataset, Path]:
    images = tmp_path / "images"
    rows = make_images(images, 24, broken=broken)
    ann = make_coco(tmp_path / "coco.json", rows)
    # A segmentation written as no json.dumps would write it, to see it kept byte for byte.
    data = json.loads(ann.read_text())
    text = ann.read_text()
    odd = '{"counts": [1, 2,3 ,4], "size": [ 10,20 ] }'
    data["annotations"].append(
        {
            "id": 999,
            "image_id": 1,
            "category_id": 2,
            "bbox": [1.5, 2.25, 3e-1, 4],
            "area": 0.1,
            "iscrowd": 1,
            "segmentation": "__ODD__",
        }
    )
    text = json.dumps(data).replace('"__ODD__"', odd)
    ann.write_text(text)
    ds = fastindex.Dataset.create("orig", db=db)
    finish(ds, ds.add_samples_from_coco(annotations_json=ann, images_path=images, embed=False))
    return ds, images


def _samples_by_path(ds: fastindex.Dataset) -> dict[str, Any]:
    return {s.path: s for s in ds.samples()}


def _raw_annotations(ds: fastindex.Dataset) -> dict[str, list[tuple[Any, ...]]]:
    paths = {s.id: s.path for s in ds.samples()}
    out: dict[str, list[tuple[Any, ...]]] = {}
    for a in _core.Store(str(ds.db)).annotations(ds.id, None):
        _id, sample_id, cat, sup, bbox, area, iscrowd, seg = a
        out.setdefault(paths[sample_id], []).append((cat, sup, bbox, area, iscrowd, seg))
    return {k: sorted(v, key=repr) for k, v in out.items()}


def test_coco_export_ingests_back_to_the_same_dataset(tmp_path: Path, db: Path) -> None:
    ds, _images = _coco_dataset(tmp_path, db)
    out = tmp_path / "out.json"
    info = ds.export(out, format="coco")
    assert info["format"] == "coco" and info["bytes"] == out.stat().st_size
    doc = json.loads(out.read_text())
    assert {c["name"] for c in doc["categories"]} == {"cat", "dog"}
    # Probed sizes (EXIF-rotated files keep their stored header size).
    by_id = {s.id: s for s in ds.samples()}
    for im in doc["images"]:
        s = by_id[im["id"]]
        if s.width is not None:
            assert (im["width"], im["height"]) == (s.width, s.height)
    assert '"segmentation": {"counts": [1, 2,3 ,4], "size": [ 10,20 ] }' in out.read_text()

    again = fastindex.Dataset.create("again", db=db)
    job = again.add_samples_from_coco(
        annotations_json=out, images_path=doc["info"]["images_root"], embed=False
    )
    finish(again, job)
    a, b = _samples_by_path(ds), _samples_by_path(again)
    # Images the COCO file lists: all of the original's (the broken file too: it was listed
    # as a sample of the folder only if the COCO file named it).
    assert set(a) == set(b)
    for path, s in a.items():
        t = b[path]
        assert (t.width, t.height, t.format, t.status) == (s.width, s.height, s.format, s.status)
    assert _raw_annotations(again) == _raw_annotations(ds)
    assert sum(len(v) for v in _raw_annotations(ds).values()) == len(doc["annotations"])


def test_coco_export_of_a_filtered_subset(tmp_path: Path, db: Path) -> None:
    ds, _ = _coco_dataset(tmp_path, db)
    buf = io.BytesIO()
    ds.export(buf, format="coco", category="dog")
    doc = json.loads(buf.getvalue())
    dog_ids = {s.id for s in ds.samples(category="dog")}
    assert {im["id"] for im in doc["images"]} == dog_ids
    assert {a["image_id"] for a in doc["annotations"]} <= dog_ids
    # Every box of those samples, not only the dog boxes.
    assert len(doc["annotations"]) == sum(len(ds.annotations(i)) for i in dog_ids)


def _folder_dataset(tmp_path: Path, db: Path) -> fastindex.Dataset:
    make_images(tmp_path / "imgs", 30, broken=3)
    ds = fastindex.Dataset.create("plain", db=db)
    finish(ds, ds.add_images_from_path(tmp_path / "imgs", embed=False))
    return ds


def _expected_rows(ds: fastindex.Dataset) -> list[dict[str, Any]]:
    return [s.to_dict() for s in ds.samples()]


def test_csv_export_reads_back_with_status_and_error(tmp_path: Path, db: Path) -> None:
    ds = _folder_dataset(tmp_path, db)
    out = tmp_path / "s.csv"
    ds.export(out, format="csv")
    with open(out, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0].keys()) == COLUMNS
    want = _expected_rows(ds)
    assert len(rows) == len(want) == 33
    for got, w in zip(rows, want, strict=True):
        assert int(got["id"]) == w["id"] and got["path"] == w["path"]
        assert got["status"] == w["status"]
        assert got["error"] == (w["error"] or "")
        assert got["width"] == ("" if w["width"] is None else str(w["width"]))
    assert sum(r["status"] == "failed" for r in rows) == 3
    assert all(r["error"] for r in rows if r["status"] == "failed")


def test_parquet_export_reads_back_with_pyarrow(tmp_path: Path, db: Path) -> None:
    pq = pytest.importorskip("pyarrow.parquet")
    ds = _folder_dataset(tmp_path, db)
    out = tmp_path / "s.parquet"
    ds.export(out, format="parquet")
    table = pq.read_table(out)
    assert table.column_names == list(COLUMNS)
    got = table.to_pylist()
    want = _expected_rows(ds)
    assert [r["id"] for r in got] == [w["id"] for w in want]
    for g, w in zip(got, want, strict=True):
        for c in COLUMNS:
            assert g[c] == w[c], c


def test_parquet_export_streams_in_row_groups(tmp_path: Path, db: Path) -> None:
    pq = pytest.importorskip("pyarrow.parquet")
    from fastindex import export

    ds = _folder_dataset(tmp_path, db)
    chunks = list(export.iter_parquet(ds._store, ds.id))
    # a small page size shows the pages arrive one by one
    paged = list(export.iter_samples(ds._store, ds.id, page=7))
    assert [len(p) for p in paged] == [7, 7, 7, 7, 5]
    out = tmp_path / "c.parquet"
    out.write_bytes(b"".join(chunks))
    assert pq.read_table(out).num_rows == 33


def test_export_refuses_unknown_format_and_bad_filters(tmp_path: Path, db: Path) -> None:
    ds = _folder_dataset(tmp_path, db)
    with pytest.raises(InvalidArgumentError, match="export format"):
        ds.export(tmp_path / "x", format="xml")
    with pytest.raises(InvalidArgumentError, match="status"):
        ds.export(tmp_path / "x", format="csv", status="gone")
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.part").exists()


def test_embeddings_export_npy_and_parquet(tmp_path: Path, db: Path) -> None:
    np = pytest.importorskip("numpy")
    pq = pytest.importorskip("pyarrow.parquet")
    pytest.importorskip("open_clip")
    from fastindex.testing import tiny_model

    make_images(tmp_path / "imgs", 6)
    ds = fastindex.Dataset.create("emb", db=db)
    finish(ds, ds.add_images_from_path(tmp_path / "imgs", embed=tiny_model()))
    ids, vectors = ds.embeddings()
    assert len(ids) == 6
    info = ds.export_embeddings(tmp_path / "e.npy", format="npy")
    assert (np.load(tmp_path / "e.npy") == vectors).all()
    assert (np.load(info["ids"]) == ids).all()
    ds.export_embeddings(tmp_path / "e.parquet", format="parquet")
    t = pq.read_table(tmp_path / "e.parquet").to_pydict()
    assert t["sample_id"] == list(ids)
    assert np.allclose(np.array(t["embedding"], dtype=np.float32), vectors)
