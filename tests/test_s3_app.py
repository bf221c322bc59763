"""Buckets above the object-store core, end to end against a real moto server on loopback:
phase 3 reading objects, the server's `/image` and `/thumbnail` for object samples, COCO from
a bucket, the CLI, and the page showing a bucket's gallery. Nothing of fastindex is mocked:
the Rust reader talks S3 to moto, the server is a real uvicorn on 127.0.0.1, the page runs in
Chromium."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import fastindex
import httpx
import numpy as np
import pytest
import s3_support
from embed_helpers import make_folder, vectors_by_path
from fastindex import testing
from fastindex.errors import ObjectStoreError
from fastindex.objects import OBJECT_SCHEMES, is_object_uri
from fastindex.server import start_server
from PIL import Image
from s3_support import MotoServer, random_image
from server_support import make_coco, make_images, wait_until

# The fixtures of s3_support: a moto server for the session, a fresh bucket per test.
moto_server = s3_support.moto_server
bucket = s3_support.bucket

#: A hang guard only: each wait here finishes in well under a second when things work.
WAIT_S = 60


def upload_folder(moto: MotoServer, bucket: str, root: Path, prefix: str) -> dict[str, bytes]:
    """Every file under `root`, put at `prefix` + its path relative to `root`."""
    objects = {
        f"{prefix}{p.relative_to(root).as_posix()}": p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }
    moto.put(bucket, objects)
    return objects


def index(ds: fastindex.Dataset, path: str, **kw: Any) -> fastindex.Job:
    job = ds.add_images_from_path(path, **kw)
    assert job.wait(WAIT_S), job.progress()
    return job


def by_path(ds: fastindex.Dataset) -> dict[str, fastindex.Sample]:
    return {s.path: s for s in ds.samples(limit=10_000)}


# -- phase 3 ---------------------------------------------------------------------------------
def test_phase_3_from_a_bucket_equals_the_same_images_from_a_folder(
    moto_server: MotoServer, bucket: str, tmp_path: Path
) -> None:
    folder = tmp_path / "imgs"
    make_folder(folder, 10)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg" * 4)
    upload_folder(moto_server, bucket, folder, "photos/")
    model = testing.tiny_model(batch_size=4)
    local = fastindex.Dataset.create("local", db=tmp_path / "s.db")
    remote = fastindex.Dataset.create("remote", db=tmp_path / "s.db")
    index(local, folder, embed=model)
    index(remote, f"s3://{bucket}/photos/", embed=model)

    a, b = vectors_by_path(local, model), vectors_by_path(remote, model)
    assert sorted(a) == sorted(b) and len(a) == 10
    # The same bytes decoded by the same code: the vectors are equal, not just close.
    for path, v in a.items():
        np.testing.assert_array_equal(v, b[path])
    la, rb = by_path(local), by_path(remote)
    assert {p: s.status for p, s in la.items()} == {p: s.status for p, s in rb.items()}
    assert rb["broken.jpg"].status == "failed"


def test_an_object_gone_before_phase_3_fails_alone_with_its_reason(
    moto_server: MotoServer, bucket: str, tmp_path: Path
) -> None:
    folder = tmp_path / "imgs"
    make_folder(folder, 6)
    objects = upload_folder(moto_server, bucket, folder, "p/")
    ds = fastindex.Dataset.create("d", db=tmp_path / "s.db")
    index(ds, f"s3://{bucket}/p/", embed=False)
    gone = sorted(objects)[2]
    moto_server.delete(bucket, gone)
    ds.embed(testing.tiny_model(batch_size=4))
    assert wait_until(lambda: ds.get_loading_progress()["status"] == "complete", WAIT_S)
    p = ds.get_loading_progress()
    assert (p["ready"], p["failed"]) == (5, 1), p
    (failed,) = ds.samples(status="failed")
    assert failed.path == gone.removeprefix("p/")
    assert failed.error is not None and "not found" in failed.error and gone in failed.error


# -- the server ------------------------------------------------------------------------------
def test_image_and_thumbnail_of_object_samples(
    moto_server: MotoServer, bucket: str, tmp_path: Path
) -> None:
    # One image larger than the server's read chunk: it is sent in several ranged reads.
    big = random_image((1400, 1100), "BMP", 7)
    assert len(big) > 4 << 20
    objects = {"g/a.png": random_image((90, 60), "PNG", 1), "g/big.bmp": big}
    objects["g/sub/c.jpg"] = random_image((640, 480), "JPEG", 2)
    objects["g/gone.gif"] = random_image((30, 20), "GIF", 3)
    moto_server.put(bucket, objects)
    db = tmp_path / "s.db"
    ds = fastindex.Dataset.create("b", db=db)
    index(ds, f"s3://{bucket}/g/", embed=False)
    samples = by_path(ds)
    assert {p: s.status for p, s in samples.items()} == {
        "a.png": "indexed",
        "big.bmp": "indexed",
        "sub/c.jpg": "indexed",
        "gone.gif": "indexed",
    }
    with start_server(db, port=0, allowed_roots=[f"s3://{bucket}/"]) as server:
        for path, s in samples.items():
            if path == "gone.gif":
                continue
            r = httpx.get(f"{server.url}/api/samples/{s.id}/image", timeout=30)
            assert r.status_code == 200, r.text
            assert r.content == objects[f"g/{path}"]
            t = httpx.get(f"{server.url}/api/samples/{s.id}/thumbnail", timeout=30)
            assert t.status_code == 200, t.text
            assert t.headers["content-type"] == "image/jpeg"
            with Image.open(io.BytesIO(t.content)) as im:
                assert im.format == "JPEG" and max(im.size) <= 320
                assert im.size[0] / im.size[1] == pytest.approx(s.width / s.height, rel=0.05)
        assert (
            httpx.get(f"{server.url}/api/samples/{samples['a.png'].id}/image").headers[
                "content-type"
            ]
            == "image/png"
        )

        # Gone from the bucket since it was indexed: a 404 with a message, not a traceback.
        moto_server.delete(bucket, "g/gone.gif")
        gone = samples["gone.gif"].id
        for route in ("image", "thumbnail"):
            r = httpx.get(f"{server.url}/api/samples/{gone}/{route}")
            assert r.status_code == 404, r.text
            assert "no longer in the bucket" in r.json()["message"]

        # The store refuses the server's credentials: a 502 naming the bucket.
        with moto_server.auth_enforced():
            r = httpx.get(f"{server.url}/api/samples/{samples['a.png'].id}/image")
        assert r.status_code == 502, r.text
        assert "credentials refused" in r.json()["message"] and bucket in r.json()["message"]

        # A bucket prefix is indexed on request when it lies under an allowed one.
        moto_server.put(bucket, {"h/x.jpg": random_image((50, 40), "JPEG", 3)})
        r = httpx.post(
            f"{server.url}/api/datasets",
            json={"name": "more", "images_path": f"s3://{bucket}/h/", "embed": False},
        )
        assert r.status_code == 202, r.text
        did = r.json()["dataset_id"]
        wait_until(
            lambda: httpx.get(f"{server.url}/api/progress/{did}").json()["indexed"] == 1,
            WAIT_S,
        )
        r = httpx.post(
            f"{server.url}/api/datasets",
            json={"name": "no", "images_path": "s3://another-bucket/", "embed": False},
        )
        assert r.status_code == 403, r.text
        r = httpx.post(
            f"{server.url}/api/datasets",
            json={"name": "no", "images_path": f"s3://{bucket}/h/../x/", "embed": False},
        )
        assert r.status_code == 400, r.text


# -- COCO ------------------------------------------------------------------------------------
def _coco_view(ds: fastindex.Dataset) -> dict[str, Any]:
    out = {}
    for s in ds.samples(limit=10_000):
        boxes = sorted(
            (a.category, a.supercategory, a.bbox, a.area, a.iscrowd, json.dumps(a.segmentation))
            for a in ds.annotations(s.id)
        )
        out[s.path] = (
            s.status,
            s.width,
            s.height,
            s.format,
            s.orientation,
            s.coco_width,
            s.coco_height,
            s.size_mismatch,
            s.size_bytes,
            boxes,
        )
    return out


def test_coco_from_a_bucket_equals_coco_from_a_folder(
    moto_server: MotoServer, bucket: str, tmp_path: Path
) -> None:
    folder = tmp_path / "imgs"
    rows = make_images(folder, 14, broken=1)
    rows[0]["width"] += 3  # a declared size the header contradicts
    # Names that leave the images folder are refused from both, with their boxes.
    rows.append({"id": 9001, "file_name": "../outside.jpg", "width": 5, "height": 5})
    rows.append({"id": 9002, "file_name": "/etc/passwd", "width": 5, "height": 5})
    rows.append({"id": 9003, "file_name": "./part0/img00000.jpg", "width": 5, "height": 5})
    ann = make_coco(tmp_path / "instances.json", rows)
    upload_folder(moto_server, bucket, folder, "images/")
    moto_server.put(bucket, {"instances.json": ann.read_bytes()})
    db = tmp_path / "s.db"
    local = fastindex.Dataset.create("local", db=db)
    remote = fastindex.Dataset.create("remote", db=db)
    jl = local.add_samples_from_coco(annotations_json=ann, images_path=folder, embed=False)
    jr = remote.add_samples_from_coco(
        annotations_json=f"s3://{bucket}/instances.json",
        images_path=f"s3://{bucket}/images/",
        embed=False,
    )
    assert jl.wait(WAIT_S) and jr.wait(WAIT_S)
    for key in ("images", "added", "existing", "annotations", "categories", "rejected"):
        assert jl.summary[key] == jr.summary[key], key
    assert jr.summary["annotations_skipped"] == jl.summary["annotations_skipped"] > 0
    assert _coco_view(local) == _coco_view(remote)
    assert remote.facets()["category"] == local.facets()["category"]
    assert remote.get_loading_progress()["failed"] == 1  # broken0.jpg, as from the folder

    # The same file again: nothing added twice, boxes replaced, not doubled.
    again = remote.add_samples_from_coco(
        annotations_json=f"s3://{bucket}/instances.json",
        images_path=f"s3://{bucket}/images/",
        embed=False,
    )
    assert (again.summary["added"], again.summary["existing"]) == (0, jr.summary["added"])
    assert _coco_view(remote) == _coco_view(local)


def test_coco_from_a_bucket_reports_missing_images_and_refuses_bad_input(
    moto_server: MotoServer, bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rows = make_images(tmp_path / "imgs", 4)
    rows.append({"id": 77, "file_name": "part0/not-there.jpg", "width": 5, "height": 5})
    ann = make_coco(tmp_path / "instances.json", rows)
    upload_folder(moto_server, bucket, tmp_path / "imgs", "im/")
    moto_server.put(bucket, {"c/instances.json": ann.read_bytes(), "c/bad.json": b"[1, 2]"})
    ds = fastindex.Dataset.create("d", db=tmp_path / "s.db")
    job = ds.add_samples_from_coco(
        annotations_json=f"s3://{bucket}/c/instances.json",
        images_path=f"s3://{bucket}/im/",
        embed=False,
    )
    assert job.wait(WAIT_S)
    # Told by the listing, as a file missing on disk is: no row, its box skipped.
    assert job.summary["missing"] == ["part0/not-there.jpg"]
    assert job.summary["annotations_skipped"] == 1
    assert ds.get_loading_progress()["indexed"] == 4

    with pytest.raises(fastindex.CocoError, match="top level must be a JSON object"):
        ds.add_samples_from_coco(
            annotations_json=f"s3://{bucket}/c/bad.json", images_path=f"s3://{bucket}/im/"
        )
    monkeypatch.setenv("FASTINDEX_MAX_COCO_BYTES", "100")
    with pytest.raises(fastindex.CocoError, match="more than 100 bytes"):
        ds.add_samples_from_coco(
            annotations_json=f"s3://{bucket}/c/instances.json", images_path=f"s3://{bucket}/im/"
        )
    monkeypatch.delenv("FASTINDEX_MAX_COCO_BYTES")
    with pytest.raises(ObjectStoreError, match=r"s3://no-such-bucket-here"):
        ds.add_samples_from_coco(
            annotations_json=f"s3://{bucket}/c/instances.json",
            images_path="s3://no-such-bucket-here/im/",
        )
    with pytest.raises(ObjectStoreError, match="not found"):
        ds.add_samples_from_coco(
            annotations_json=f"s3://{bucket}/c/nope.json", images_path=f"s3://{bucket}/im/"
        )
    assert ds.get_loading_progress()["total"] == 4  # nothing written by the refused calls


# -- the CLI ---------------------------------------------------------------------------------
def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fastindex.cli", *args],
        capture_output=True,
        text=True,
        timeout=WAIT_S,
        env={**os.environ, "COLUMNS": "200"},
        check=False,
    )


def test_cli_indexes_a_bucket_and_names_a_missing_one_in_one_line(
    moto_server: MotoServer, bucket: str, tmp_path: Path
) -> None:
    make_folder(tmp_path / "imgs", 6)
    upload_folder(moto_server, bucket, tmp_path / "imgs", "photos/")
    db = str(tmp_path / "s.db")
    r = _cli("index", f"s3://{bucket}/photos/", "--db", db, "--no-embed", "--quiet")
    assert r.returncode == 0, r.stderr
    assert "photos: 6 added" in r.stderr and "indexed 6" in r.stderr
    ds = fastindex.Dataset.load("photos", db=db)
    assert ds.get_loading_progress()["indexed"] == 6

    r = _cli("index", "s3://no-such-bucket-here/photos/", "--db", db, "--no-embed")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "s3://no-such-bucket-here" in lines[0], r.stderr
    assert "Traceback" not in r.stderr
    # Nothing left behind by the refused call.
    listed = json.loads(_cli("list", "--db", db, "--json").stdout)["datasets"]
    assert [d["name"] for d in listed] == ["photos"]


# -- the page --------------------------------------------------------------------------------
@pytest.mark.browser
def test_the_page_shows_a_buckets_gallery(
    moto_server: MotoServer, bucket: str, tmp_path: Path, page: Any
) -> None:
    from playwright.sync_api import expect

    make_images(tmp_path / "imgs", 9)
    upload_folder(moto_server, bucket, tmp_path / "imgs", "gallery/")
    db = tmp_path / "s.db"
    ds = fastindex.Dataset.create("bucket", db=db)
    index(ds, f"s3://{bucket}/gallery/", embed=False)
    with start_server(db, port=0) as server:
        page.goto(f"{server.url}/?dataset={ds.id}")
        expect(page.locator("#run-status")).to_have_text("complete")
        expect(page.locator("#gallery .tile[data-status=indexed] img")).to_have_count(9)
        page.wait_for_function(
            "[...document.querySelectorAll('#gallery .tile img')]"
            ".every(i => i.complete && i.naturalWidth > 0)"
        )
        page.locator("#gallery .tile[data-status=indexed] .frame").first.click()
        expect(page.locator("#sample-dialog")).to_be_visible()


def test_object_uris_are_told_from_paths_as_the_core_tells_them() -> None:
    for scheme in OBJECT_SCHEMES:
        assert is_object_uri(f"{scheme}://b/k.jpg") and is_object_uri(f"{scheme.upper()}://b/")
    for path in ("/data/s3://b", "photos/s3://x", "http://b/k", "s3:/b/k", "s3"):
        assert not is_object_uri(path)
