"""Filters, facets and the export download over HTTP, through a real server on 127.0.0.1."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fastindex
import httpx
import pytest
from fastindex.server import ServerHandle, start_server
from server_support import make_coco, make_images, wait_until


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerHandle, int, str]]:
    tmp = tmp_path_factory.mktemp("curate")
    db = str(tmp / "s.db")
    rows = make_images(tmp / "coco", 30, broken=2)
    ann = make_coco(tmp / "instances.json", rows)
    with start_server(db, port=0, allowed_roots=[tmp]) as server:
        r = httpx.post(
            f"{server.url}/api/datasets",
            json={
                "name": "c",
                "images_path": str(tmp / "coco"),
                "annotations_json": str(ann),
                "embed": False,
            },
            timeout=30,
        )
        assert r.status_code == 202, r.text
        did = r.json()["dataset_id"]
        wait_until(
            lambda: httpx.get(f"{server.url}/api/progress/{did}").json()["status"] == "complete"
        )
        yield server, did, db


def _ids(server: ServerHandle, did: int, **params: Any) -> list[int]:
    r = httpx.get(f"{server.url}/api/datasets/{did}/samples", params={"limit": 1000, **params})
    assert r.status_code == 200, r.text
    return [s["id"] for s in r.json()["items"]]


@pytest.mark.parametrize(
    "params",
    [
        {"format": "PNG"},
        {"min_width": 60, "max_height": 60},
        {"path_glob": "part1/*"},
        {"category": "dog"},
        {"has_annotations": "false"},
        {"has_annotations": "true", "status": "indexed"},
        {"status": "failed"},
        {"category": "dog", "format": "JPEG", "min_height": 40},
    ],
)
def test_http_filters_equal_the_python_api(
    served: tuple[ServerHandle, int, str], params: dict[str, Any]
) -> None:
    server, did, db = served
    ds = fastindex.Dataset.load("c", db=db, resume=False)
    kw = {
        k: ({"true": True, "false": False}.get(v, v) if isinstance(v, str) else v)
        for k, v in params.items()
    }
    assert _ids(server, did, **params) == [s.id for s in ds.samples(**kw)]


def test_http_keyset_paging(served: tuple[ServerHandle, int, str]) -> None:
    server, did, _ = served
    want = _ids(server, did, format="JPEG")
    got: list[int] = []
    after = 0
    while True:
        body = httpx.get(
            f"{server.url}/api/datasets/{did}/samples",
            params={"format": "JPEG", "limit": 4, "after_id": after},
        ).json()
        got += [s["id"] for s in body["items"]]
        if body["next_after_id"] is None:
            break
        after = body["next_after_id"]
    assert got == want and len(want) > 4


def test_http_facets_and_bad_params(served: tuple[ServerHandle, int, str]) -> None:
    server, did, _ = served
    f = httpx.get(f"{server.url}/api/datasets/{did}/facets").json()
    assert f["status"]["failed"] == 2 and f["total"] == 32
    assert set(f["format"]) == {"JPEG", "PNG"} and set(f["category"]) == {"cat", "dog"}
    body = httpx.get(f"{server.url}/api/datasets/{did}/samples", params={"format": "PNG"}).json()
    assert body["total"] == f["format"]["PNG"] == len(body["items"])
    for bad in (
        {"min_width": "x"},
        {"has_annotations": "maybe"},
        {"status": "gone"},
        {"min_width": -1},
    ):
        r = httpx.get(f"{server.url}/api/datasets/{did}/samples", params=bad)
        assert r.status_code == 422 and "Traceback" not in r.text and r.json()["message"]
    assert httpx.get(f"{server.url}/api/datasets/999/facets").status_code == 404


def test_export_download_coco_and_csv(
    served: tuple[ServerHandle, int, str], tmp_path: Path
) -> None:
    server, did, db = served
    ds = fastindex.Dataset.load("c", db=db, resume=False)
    with httpx.stream(
        "GET", f"{server.url}/api/datasets/{did}/export", params={"format": "coco"}
    ) as r:
        assert r.status_code == 200
        assert "attachment" in r.headers["content-disposition"]
        data = b"".join(r.iter_bytes())
    doc = json.loads(data)
    local = io.BytesIO()
    ds.export(local, format="coco")
    assert data == local.getvalue()
    assert len(doc["images"]) == 32 and len(doc["annotations"]) == len(ds.annotations())

    r = httpx.get(
        f"{server.url}/api/datasets/{did}/export", params={"format": "csv", "status": "failed"}
    )
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(r.text)))
    assert len(rows) == 2 and all(x["status"] == "failed" and x["error"] for x in rows)

    r = httpx.get(f"{server.url}/api/datasets/{did}/export", params={"format": "xml"})
    assert r.status_code == 422
    assert httpx.get(f"{server.url}/api/datasets/999/export").status_code == 404


def test_export_download_parquet(served: tuple[ServerHandle, int, str], tmp_path: Path) -> None:
    pq = pytest.importorskip("pyarrow.parquet")
    server, did, _ = served
    r = httpx.get(f"{server.url}/api/datasets/{did}/export", params={"format": "parquet"})
    assert r.status_code == 200
    (tmp_path / "x.parquet").write_bytes(r.content)
    assert pq.read_table(tmp_path / "x.parquet").num_rows == 32
