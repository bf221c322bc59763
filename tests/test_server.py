"""The HTTP API through FastAPI's test client: every route, and every way a request can fail."""

from __future__ import annotations

import asyncio
import io
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fastindex
import pytest
from fastapi.testclient import TestClient
from fastindex.errors import (
    CancelledError,
    CocoError,
    DatasetExistsError,
    DatasetNotFoundError,
    EmbeddingError,
    FastIndexError,
    ImageError,
    InvalidArgumentError,
    NoEmbeddingsError,
    PathNotFoundError,
    SchemaVersionError,
    StoreError,
)
from fastindex.server import NotFoundError, NotReadyError, create_app, status_of
from fastindex.server.media import ThumbnailCache, make_thumbnail
from PIL import Image
from server_support import (
    PROGRESS_KEYS,
    PROGRESS_RATES,
    make_coco,
    make_images,
    probe_held,
    wait_until,
)


class Api:
    """A test client on a fresh store, with helpers to index and wait."""

    def __init__(self, client: TestClient, db: str, tmp: Path) -> None:
        self.c = client
        self.db = db
        self.tmp = tmp

    def add(self, name: str, images: Path, **body: Any) -> dict[str, Any]:
        r = self.c.post(
            "/api/datasets",
            json={"name": name, "images_path": str(images), "embed": False, **body},
        )
        assert r.status_code == 202, r.text
        out: dict[str, Any] = r.json()
        return out

    def progress(self, dataset_id: int) -> dict[str, Any]:
        r = self.c.get(f"/api/progress/{dataset_id}")
        assert r.status_code == 200, r.text
        out: dict[str, Any] = r.json()
        return out

    def wait(self, dataset_id: int) -> dict[str, Any]:
        p: dict[str, Any] = wait_until(
            lambda: (p := self.progress(dataset_id))["status"] == "complete" and p
        )
        return p

    def error(self, r: Any, status: int) -> str:
        assert r.status_code == status, r.text
        body = r.json()
        assert set(body) >= {"error", "message"}
        assert "Traceback" not in r.text
        msg: str = body["message"]
        return msg


@pytest.fixture
def api(tmp_path: Path) -> Iterator[Api]:
    db = str(tmp_path / "store.db")
    app = create_app(db, allowed_hosts=["testserver"], allowed_roots=[tmp_path])
    with TestClient(app) as client:
        yield Api(client, db, tmp_path)
        app.state.fastindex.close()


@pytest.fixture
def coco_ds(api: Api) -> dict[str, Any]:
    """A COCO dataset of 30 images (3 with EXIF orientation 6) and 2 broken files, indexed."""
    rows = make_images(api.tmp / "coco", 30, broken=2)
    ann = make_coco(api.tmp / "instances.json", rows)
    started = api.add("coco", api.tmp / "coco", annotations_json=str(ann))
    p = api.wait(started["dataset_id"])
    return {**started, "progress": p, "rows": rows}


# -- datasets and progress -------------------------------------------------------------------------
def test_post_answers_at_once_and_indexing_completes(api: Api) -> None:
    make_images(api.tmp / "imgs", 40, broken=3)
    started = api.add("photos", api.tmp / "imgs")
    assert set(started) == {"dataset_id", "task_group_id"}
    p = api.wait(started["dataset_id"])
    assert set(p) == PROGRESS_KEYS
    assert p["phases"] == {"probe": {"done": 43, "total": 43, "rate": None, "eta_s": None}}
    rates = PROGRESS_RATES - {"phases"}
    assert {k: p.pop(k) for k in rates} == dict.fromkeys(rates)
    del p["phases"]
    assert p == {
        "dataset_id": started["dataset_id"],
        "total": 43,
        "pending": 0,
        "indexed": 40,
        "embedding": 0,
        "ready": 0,
        "failed": 3,
        "missing": 0,
        "status": "complete",
        "error": None,
    }
    task = api.c.get(f"/api/tasks/{started['task_group_id']}").json()
    assert task["state"] == "started" and task["summary"]["added"] == 43
    assert task["progress"]["indexed"] == 40
    assert api.error(api.c.get("/api/tasks/999"), 404)


def test_progress_is_in_progress_while_rows_wait(api: Api) -> None:
    make_images(api.tmp / "a", 5)
    first = api.add("d", api.tmp / "a")
    api.wait(first["dataset_id"])
    make_images(api.tmp / "b", 7, start=100)
    with probe_held(api.db, first["dataset_id"]):
        api.add("d", api.tmp / "b")  # same name: added to the same dataset
        p = wait_until(lambda: (p := api.progress(first["dataset_id"]))["total"] == 12 and p)
        assert p["status"] == "in_progress" and p["pending"] == 7
    assert api.wait(first["dataset_id"])["indexed"] == 12


def test_adding_a_folder_again_adds_nothing(api: Api) -> None:
    make_images(api.tmp / "a", 6)
    first = api.add("d", api.tmp / "a")
    api.wait(first["dataset_id"])
    again = api.add("d", api.tmp / "a")
    assert again["dataset_id"] == first["dataset_id"]
    assert again["task_group_id"] != first["task_group_id"]
    task = wait_until(
        lambda: (
            (t := api.c.get(f"/api/tasks/{again['task_group_id']}").json())["state"] != "scanning"
            and t
        )
    )
    assert task["summary"]["added"] == 0 and task["summary"]["existing"] == 6
    assert api.wait(first["dataset_id"])["total"] == 6


def test_list_and_get_datasets(api: Api, coco_ds: dict[str, Any]) -> None:
    listed = api.c.get("/api/datasets").json()["items"]
    assert [d["name"] for d in listed] == ["coco"]
    assert listed[0]["progress"] == coco_ds["progress"]
    assert listed[0]["embeddings"] is False
    one = api.c.get(f"/api/datasets/{coco_ds['dataset_id']}").json()
    assert one["id"] == coco_ds["dataset_id"] and one["name"] == "coco"
    assert api.error(api.c.get("/api/datasets/999"), 404) == "no dataset with id 999"


def test_progress_of_unknown_dataset(api: Api) -> None:
    assert api.error(api.c.get("/api/progress/42"), 404) == "no dataset with id 42"
    api.error(api.c.get("/api/progress/abc"), 422)


@pytest.mark.parametrize(
    ("body", "status", "kind"),
    [
        ({"name": "x", "images_path": "MISSING"}, 400, "PathNotFoundError"),
        ({"name": "x", "images_path": "/"}, 403, "ForbiddenError"),
        ({"name": "x", "images_path": "/no/such/folder"}, 403, "ForbiddenError"),
        ({"name": "x", "images_path": "DIR/../.."}, 403, "ForbiddenError"),
        ({"name": "x", "images_path": "DIR\u0000"}, 400, "InvalidArgumentError"),
        (
            {"name": "x", "images_path": "DIR", "annotations_json": "/etc/passwd"},
            403,
            "ForbiddenError",
        ),
        ({"name": "x", "images_path": "FILE"}, 400, "InvalidArgumentError"),
        (
            {"name": "x", "images_path": "DIR", "annotations_json": "MISSING.json"},
            400,
            "PathNotFoundError",
        ),
        (
            {"name": "x", "images_path": "DIR", "annotations_json": "DIR"},
            400,
            "InvalidArgumentError",
        ),
        ({"name": "   ", "images_path": "DIR"}, 400, "InvalidArgumentError"),
        ({"name": "bad\nname", "images_path": "DIR"}, 400, "InvalidArgumentError"),
        ({"name": "", "images_path": "DIR"}, 422, "ValidationError"),
        ({"images_path": "DIR"}, 422, "ValidationError"),
        ({"name": "x", "images_path": "DIR", "embed": "maybe"}, 422, "ValidationError"),
        ({"name": "x", "images_path": "DIR", "unknown": 1}, 422, "ValidationError"),
    ],
)
def test_post_rejects_bad_requests(api: Api, body: dict[str, Any], status: int, kind: str) -> None:
    folder = api.tmp / "dir"
    folder.mkdir()
    (api.tmp / "file.txt").write_text("x")
    subst = {
        "DIR": str(folder),
        "FILE": str(api.tmp / "file.txt"),
        "MISSING": str(api.tmp / "no" / "such"),
        "MISSING.json": str(api.tmp / "no.json"),
    }
    body = {
        k: subst.get(v, v.replace("DIR", str(folder))) if isinstance(v, str) else v
        for k, v in body.items()
    }
    r = api.c.post("/api/datasets", json=body)
    api.error(r, status)
    assert r.json()["error"] == kind
    assert api.c.get("/api/datasets").json()["items"] == [] or status == 400


def test_post_needs_a_json_body(api: Api) -> None:
    api.error(
        api.c.post("/api/datasets", content=b"name=x", headers={"content-type": "text/plain"}), 422
    )
    api.error(
        api.c.post(
            "/api/datasets", content=b"{not json", headers={"content-type": "application/json"}
        ),
        422,
    )


def test_malformed_coco_file_is_reported_in_progress(api: Api) -> None:
    make_images(api.tmp / "imgs", 3)
    bad = api.tmp / "bad.json"
    bad.write_text('{"images": [{"id": 1}], "annotations": "nope"}')
    started = api.add("c", api.tmp / "imgs", annotations_json=str(bad))
    p = api.wait(started["dataset_id"])
    assert p["error"] is not None and p["error"].startswith("scan: ")
    assert p["total"] == 0
    task = api.c.get(f"/api/tasks/{started['task_group_id']}").json()
    assert task["state"] == "failed" and task["error"] in p["error"]


# -- samples ---------------------------------------------------------------------------------------
def test_samples_pages_and_filters(api: Api, coco_ds: dict[str, Any]) -> None:
    did = coco_ds["dataset_id"]
    page = api.c.get(f"/api/datasets/{did}/samples", params={"limit": 10}).json()
    assert page["total"] == 32 and page["after_id"] == 0 and len(page["items"]) == 10
    ids = [s["id"] for s in page["items"]]
    assert ids == sorted(ids) and page["next_after_id"] == ids[-1]
    nxt = api.c.get(
        f"/api/datasets/{did}/samples", params={"after_id": page["next_after_id"], "limit": 10}
    ).json()
    assert min(s["id"] for s in nxt["items"]) > ids[-1]
    item = page["items"][0]
    assert "root" not in item and item["file_name"] == os.path.basename(item["path"])
    assert item["annotations"] and "segmentation" not in item["annotations"][0]
    assert set(item["annotations"][0]["bbox"]) and len(item["annotations"][0]["bbox"]) == 4

    failed = api.c.get(f"/api/datasets/{did}/samples", params={"status": "failed"}).json()
    assert failed["total"] == 2 and len(failed["items"]) == 2
    assert all(s["error"] and s["path"].startswith("broken") for s in failed["items"])
    indexed = api.c.get(f"/api/datasets/{did}/samples", params={"status": "indexed", "limit": 1000})
    assert len(indexed.json()["items"]) == 30
    # Every row once, page by page, and the last page says so (no empty page after it).
    seen: list[int] = []
    after: int | None = 0
    while after is not None:
        body = api.c.get(f"/api/datasets/{did}/samples", params={"after_id": after, "limit": 8})
        seen += [s["id"] for s in body.json()["items"]]
        after = body.json()["next_after_id"]
    assert len(seen) == 32 == len(set(seen)) and seen == sorted(seen)
    past = api.c.get(f"/api/datasets/{did}/samples", params={"after_id": 2**40}).json()
    assert past["items"] == [] and past["next_after_id"] is None


@pytest.mark.parametrize("route", ["/api/datasets/{did}/samples", "/api/datasets"])
@pytest.mark.parametrize("offset", ["0", "10", "-1", "x"])
def test_offset_paging_is_refused_with_a_message(
    api: Api, coco_ds: dict[str, Any], route: str, offset: str
) -> None:
    r = api.c.get(route.format(did=coco_ds["dataset_id"]), params={"offset": offset})
    assert "after_id" in api.error(r, 400)


def test_datasets_page_by_key(api: Api) -> None:
    make_images(api.tmp / "imgs", 2)
    ids = [api.add(f"d{i}", api.tmp / "imgs")["dataset_id"] for i in range(5)]
    seen: list[int] = []
    after: int | None = 0
    while after is not None:
        body = api.c.get("/api/datasets", params={"after_id": after, "limit": 2}).json()
        assert len(body["items"]) <= 2
        seen += [d["id"] for d in body["items"]]
        after = body["next_after_id"]
    assert seen == sorted(ids)
    api.error(api.c.get("/api/datasets", params={"limit": 1001}), 422)


@pytest.mark.parametrize(
    "params",
    [{"status": "bogus"}, {"after_id": -1}, {"limit": 0}, {"limit": 1001}, {"limit": "many"}],
)
def test_samples_rejects_bad_parameters(
    api: Api, coco_ds: dict[str, Any], params: dict[str, Any]
) -> None:
    r = api.c.get(f"/api/datasets/{coco_ds['dataset_id']}/samples", params=params)
    assert api.error(r, 422)


def test_samples_of_unknown_dataset(api: Api) -> None:
    api.error(api.c.get("/api/datasets/7/samples"), 404)


def test_one_sample_with_annotations(api: Api, coco_ds: dict[str, Any]) -> None:
    did = coco_ds["dataset_id"]
    items = api.c.get(f"/api/datasets/{did}/samples", params={"limit": 100}).json()["items"]
    with_two = next(s for s in items if len(s["annotations"]) == 2)
    full = api.c.get(f"/api/samples/{with_two['id']}").json()
    assert full["id"] == with_two["id"] and "root" not in full
    cats = sorted(a["category"] for a in full["annotations"])
    assert cats[0] in ("cat", "dog") and len(cats) == 2
    assert any(a["segmentation"] for a in full["annotations"])
    declared = next(r for r in coco_ds["rows"] if r["file_name"] == full["path"])
    assert (full["coco_width"], full["coco_height"]) == (declared["width"], declared["height"])
    assert api.error(api.c.get("/api/samples/123456"), 404) == "no sample with id 123456"
    api.error(api.c.get("/api/samples/abc"), 422)


# -- files -----------------------------------------------------------------------------------------
def _by_name(api: Api, did: int) -> dict[str, dict[str, Any]]:
    items = api.c.get(f"/api/datasets/{did}/samples", params={"limit": 1000}).json()["items"]
    return {s["file_name"]: s for s in items}


def test_thumbnail_is_small_upright_and_cached(api: Api, coco_ds: dict[str, Any]) -> None:
    samples = _by_name(api, coco_ds["dataset_id"])
    rotated = samples["img00005.jpg"]  # orientation 6: stored landscape, shown portrait
    assert rotated["orientation"] == 6 and rotated["width"] > rotated["height"]
    r = api.c.get(f"/api/samples/{rotated['id']}/thumbnail")
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    with Image.open(io.BytesIO(r.content)) as im:
        assert im.format == "JPEG"
        assert im.size == (rotated["height"], rotated["width"])
    cache = api.c.app.state.thumbnails  # type: ignore[attr-defined]
    assert len(cache) == 1
    again = api.c.get(f"/api/samples/{rotated['id']}/thumbnail")
    assert again.content == r.content and len(cache) == 1
    tag = r.headers["etag"]
    not_modified = api.c.get(
        f"/api/samples/{rotated['id']}/thumbnail", headers={"if-none-match": tag}
    )
    assert not_modified.status_code == 304 and not_modified.content == b""


def test_thumbnail_of_a_large_image_is_bounded(api: Api) -> None:
    folder = api.tmp / "big"
    folder.mkdir()
    Image.new("RGB", (2400, 1200), (10, 200, 30)).save(folder / "big.jpg", quality=80)
    started = api.add("big", folder)
    api.wait(started["dataset_id"])
    (s,) = _by_name(api, started["dataset_id"]).values()
    r = api.c.get(f"/api/samples/{s['id']}/thumbnail")
    with Image.open(io.BytesIO(r.content)) as im:
        assert max(im.size) <= 320 and im.size[0] == 2 * im.size[1]


def test_original_image_with_its_content_type(api: Api, coco_ds: dict[str, Any]) -> None:
    samples = _by_name(api, coco_ds["dataset_id"])
    for name, ctype in (("img00000.jpg", "image/jpeg"), ("img00003.png", "image/png")):
        s = samples[name]
        r = api.c.get(f"/api/samples/{s['id']}/image")
        assert r.status_code == 200
        assert r.headers["content-type"] == ctype
        assert r.headers["x-content-type-options"] == "nosniff"
        assert r.content == (api.tmp / "coco" / s["path"]).read_bytes()


def test_files_of_failed_and_pending_samples_are_not_served(
    api: Api, coco_ds: dict[str, Any]
) -> None:
    samples = _by_name(api, coco_ds["dataset_id"])
    broken = samples["broken0.jpg"]
    for part in ("image", "thumbnail"):
        msg = api.error(api.c.get(f"/api/samples/{broken['id']}/{part}"), 409)
        assert msg.startswith(f"sample {broken['id']} is failed: ")

    make_images(api.tmp / "later", 2, start=500)
    with probe_held(api.db, coco_ds["dataset_id"]):
        api.add("coco", api.tmp / "later")
        wait_until(lambda: api.progress(coco_ds["dataset_id"])["pending"] == 2)
        pending = api.c.get(
            f"/api/datasets/{coco_ds['dataset_id']}/samples", params={"status": "pending"}
        ).json()["items"]
        for part in ("image", "thumbnail"):
            assert "is pending" in api.error(
                api.c.get(f"/api/samples/{pending[0]['id']}/{part}"), 409
            )
    api.wait(coco_ds["dataset_id"])


def test_file_removed_after_indexing(api: Api, coco_ds: dict[str, Any]) -> None:
    s = _by_name(api, coco_ds["dataset_id"])["img00001.jpg"]
    (api.tmp / "coco" / s["path"]).unlink()
    assert "no longer on disk" in api.error(api.c.get(f"/api/samples/{s['id']}/image"), 404)
    assert "no longer on disk" in api.error(api.c.get(f"/api/samples/{s['id']}/thumbnail"), 404)


def test_corrupt_file_after_indexing_is_a_422(api: Api, coco_ds: dict[str, Any]) -> None:
    s = _by_name(api, coco_ds["dataset_id"])["img00002.jpg"]
    path = api.tmp / "coco" / s["path"]
    path.write_bytes(path.read_bytes()[:40])  # header intact, pixels gone
    assert "cannot make a thumbnail" in api.error(
        api.c.get(f"/api/samples/{s['id']}/thumbnail"), 422
    )


@pytest.mark.parametrize(
    "url",
    [
        "/api/samples/..%2F..%2Fetc%2Fpasswd/image",
        "/api/samples/..%2F..%2Fetc%2Fpasswd/thumbnail",
        "/api/samples/%2Fetc%2Fpasswd/image",
        "/api/samples/1%2F..%2F..%2F..%2Fetc%2Fpasswd/image",
        "/api/samples/../../../../etc/passwd",
        "/api/samples/-1/image",
        "/api/samples/1e3/image",
        "/static/..%2F..%2F..%2F..%2Fetc%2Fpasswd",
        "/static/../../../../etc/passwd",
        "/static/%2e%2e/%2e%2e/server/app.py",
        "/static/..%5c..%5cserver%5capp.py",
        "/etc/passwd",
    ],
)
def test_no_request_path_reaches_the_filesystem(
    api: Api, coco_ds: dict[str, Any], url: str
) -> None:
    r = api.c.get(url)
    assert r.status_code in (404, 422), (url, r.status_code)
    assert b"root:" not in r.content and b"create_app" not in r.content
    assert r.json()["error"]


# -- search ----------------------------------------------------------------------------------------
def test_search_and_similar_answer_409_until_there_are_embeddings(
    api: Api, coco_ds: dict[str, Any]
) -> None:
    did = coco_ds["dataset_id"]
    msg = api.error(api.c.get(f"/api/datasets/{did}/search", params={"q": "a cat"}), 409)
    assert "no embeddings" in msg
    sid = next(iter(_by_name(api, did).values()))["id"]
    assert "no embeddings" in api.error(api.c.get(f"/api/datasets/{did}/similar/{sid}"), 409)


def test_search_and_similar_bad_requests(api: Api, coco_ds: dict[str, Any]) -> None:
    did = coco_ds["dataset_id"]
    api.error(api.c.get(f"/api/datasets/{did}/search"), 422)
    api.error(api.c.get(f"/api/datasets/{did}/search", params={"q": ""}), 422)
    api.error(api.c.get(f"/api/datasets/{did}/search", params={"q": "x", "k": 0}), 422)
    api.error(api.c.get("/api/datasets/99/search", params={"q": "x"}), 404)
    api.error(api.c.get(f"/api/datasets/{did}/similar/999999"), 404)
    make_images(api.tmp / "other", 1, start=900)
    other = api.add("other", api.tmp / "other")
    api.wait(other["dataset_id"])
    sid = next(iter(_by_name(api, other["dataset_id"]).values()))["id"]
    assert "no sample" in api.error(api.c.get(f"/api/datasets/{did}/similar/{sid}"), 404)


# -- the rest --------------------------------------------------------------------------------------
def test_page_static_files_and_docs(api: Api) -> None:
    page = api.c.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert '<script type="module" src="/static/app.js">' in page.text
    for name, ctype in (("app.js", "javascript"), ("style.css", "text/css")):
        r = api.c.get(f"/static/{name}")
        assert r.status_code == 200 and ctype in r.headers["content-type"]
    assert api.c.get("/docs").status_code == 200
    paths = api.c.get("/openapi.json").json()["paths"]
    for p in (
        "/api/datasets",
        "/api/progress/{dataset_id}",
        "/sse/progress/{dataset_id}",
        "/api/datasets/{dataset_id}/samples",
        "/api/samples/{sample_id}",
        "/api/samples/{sample_id}/thumbnail",
        "/api/samples/{sample_id}/image",
        "/api/datasets/{dataset_id}/search",
        "/api/datasets/{dataset_id}/similar/{sample_id}",
    ):
        assert p in paths
    api.error(api.c.get("/api/nothing"), 404)
    api.error(api.c.delete("/api/datasets"), 405)


def test_foreign_host_header_is_refused(tmp_path: Path) -> None:
    app = create_app(str(tmp_path / "s.db"))  # loopback names only
    with TestClient(app, base_url="http://127.0.0.1:8000") as c:
        assert c.get("/api/datasets").status_code == 200
        assert c.get("/api/datasets", headers={"host": "localhost:8000"}).status_code == 200
        assert c.get("/api/datasets", headers={"host": "evil.example:8000"}).status_code == 400


def test_store_errors_become_500_without_traceback(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*_: Any, **__: Any) -> Any:
        raise StoreError("/x.db: disk I/O error")

    monkeypatch.setattr(api.c.app.state.fastindex, "datasets", broken)  # type: ignore[attr-defined]
    r = api.c.get("/api/datasets")
    assert r.status_code == 500 and r.json() == {
        "error": "StoreError",
        "message": "/x.db: disk I/O error",
    }


def test_one_mapping_from_exceptions_to_status_codes() -> None:
    expected: list[tuple[FastIndexError, int]] = [
        (CocoError("x"), 422),
        (PathNotFoundError("x"), 400),
        (InvalidArgumentError("x"), 400),
        (DatasetNotFoundError("x"), 404),
        (NotFoundError("x"), 404),
        (DatasetExistsError("x"), 409),
        (NotReadyError("x"), 409),
        (NoEmbeddingsError("x"), 409),
        (EmbeddingError("x"), 409),
        (CancelledError("x"), 409),
        (ImageError("x"), 422),
        (StoreError("x"), 500),
        (SchemaVersionError("x"), 500),
        (FastIndexError("x"), 500),
    ]
    for exc, code in expected:
        assert status_of(exc) == code, exc


def test_not_a_store_is_refused_at_once(tmp_path: Path) -> None:
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"x" * 4096)
    with pytest.raises(StoreError):
        create_app(str(junk))


def test_thumbnail_cache_is_bounded() -> None:
    cache = ThumbnailCache(max_bytes=100)
    for i in range(10):
        cache.put((i, None, None), bytes(30))
    assert cache.nbytes <= 100 and len(cache) == 3
    assert cache.get((9, None, None)) is not None and cache.get((0, None, None)) is None
    cache.put((99, None, None), bytes(1000))  # larger than the whole cache: not kept
    assert cache.get((99, None, None)) is None


@pytest.mark.parametrize(
    ("mode", "fmt"),
    [
        ("RGBA", "PNG"),
        ("P", "PNG"),
        ("LA", "PNG"),
        ("I;16", "PNG"),
        ("L", "JPEG"),
        ("CMYK", "JPEG"),
        ("RGB", "GIF"),
        ("RGB", "BMP"),
        ("RGB", "WEBP"),
        ("RGB", "TIFF"),
    ],
)
def test_thumbnails_of_every_mode(tmp_path: Path, mode: str, fmt: str) -> None:
    path = tmp_path / f"x.{fmt.lower()}"
    Image.new("RGB", (400, 100), (200, 30, 30)).convert(mode).save(path, fmt)
    with Image.open(io.BytesIO(make_thumbnail(str(path)))) as im:
        assert im.format == "JPEG" and im.mode in ("RGB", "L") and im.size == (320, 80)


def test_thumbnail_of_a_non_image_raises_image_error(tmp_path: Path) -> None:
    p = tmp_path / "x.jpg"
    p.write_bytes(b"nope")
    with pytest.raises(ImageError, match="cannot make a thumbnail"):
        make_thumbnail(str(p))


@pytest.mark.parametrize("fmt", ["PPM", "ICO", "TGA"])
def test_thumbnails_only_of_formats_the_indexer_reads(tmp_path: Path, fmt: str) -> None:
    """A file swapped for another format Pillow knows (EPS would run Ghostscript) is refused."""
    p = tmp_path / "x.jpg"
    Image.new("RGB", (40, 30), (1, 2, 3)).save(p, fmt)
    with pytest.raises(ImageError, match="cannot make a thumbnail"):
        make_thumbnail(str(p))


def test_thumbnail_over_the_pixel_budget_is_refused_from_its_header(tmp_path: Path) -> None:
    p = tmp_path / "x.png"
    Image.new("L", (400, 300)).save(p)
    with pytest.raises(ImageError, match="400x300 is 120,000 pixels, more than the 100,000"):
        make_thumbnail(str(p), max_pixels=100_000)
    assert make_thumbnail(str(p), max_pixels=120_000)


def test_status_names_match_the_core() -> None:
    """The page and the API's `status` parameter name the statuses the store uses."""
    import re
    import typing
    from importlib import resources

    from fastindex.server.app import Status

    js = (resources.files("fastindex") / "static" / "api.js").read_text()
    m = re.search(r"export const STATUSES = (\[[^\]]*\]);", js)
    assert m is not None
    assert json.loads(m.group(1)) == list(fastindex.STATUSES)
    assert list(typing.get_args(Status)) == list(fastindex.STATUSES)


def test_decode_budget_bounds_pixels_and_jobs_at_once() -> None:
    from fastindex.server.media import DecodeBudget

    async def run(budget: DecodeBudget, jobs: list[tuple[str, int]]) -> list[tuple[str, str]]:
        order: list[tuple[str, str]] = []

        async def job(name: str, pixels: int) -> None:
            async with budget.hold(pixels):
                order.append(("start", name))
                await asyncio.sleep(0.02)
                order.append(("end", name))

        await asyncio.gather(*(job(n, p) for n, p in jobs))
        assert budget.busy == 0
        return order

    # b does not fit beside a; c does.
    order = asyncio.run(run(DecodeBudget(pixels=100, jobs=3), [("a", 60), ("b", 60), ("c", 30)]))
    assert order.index(("start", "b")) > order.index(("end", "a"))
    assert order.index(("start", "c")) < order.index(("end", "a"))
    # One larger than the whole budget runs, alone.
    order = asyncio.run(run(DecodeBudget(pixels=100, jobs=3), [("a", 10), ("big", 500)]))
    assert order.index(("start", "big")) > order.index(("end", "a"))
    # At most `jobs` at once, however small.
    order = asyncio.run(run(DecodeBudget(pixels=100, jobs=1), [("a", 1), ("b", 1)]))
    assert order == [("start", "a"), ("end", "a"), ("start", "b"), ("end", "b")]
