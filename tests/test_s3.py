"""Object-storage roots (issue 9) against a real S3 API server: moto in server mode on
127.0.0.1 (tests/s3_support.py). Phases 1 and 2, the reader, and their failures: 403, 404,
a missing bucket, no server, and a server stopped and started again mid-phase."""

from __future__ import annotations

import contextlib
import io
import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import boto3
import fastindex
import pytest
from fastindex import _core
from PIL import Image
from s3_support import (
    MotoServer,
    bucket,  # noqa: F401  (fixture)
    generated_images,
    moto_server,  # noqa: F401  (fixture)
    random_image,
)
from testkit import AUDIT_SAMPLES, progress_counts, sql, status_counts, table_counts

pytestmark = pytest.mark.timeout(120)


def pillow(data: bytes) -> tuple[int, int, str]:
    with Image.open(io.BytesIO(data)) as im:
        return im.width, im.height, str(im.format)


def by_path(ds: fastindex.Dataset) -> dict[str, fastindex.Sample]:
    return {s.path: s for s in ds.samples()}


def add(ds: fastindex.Dataset, uri: str, **kw: Any) -> fastindex.Job:
    job = ds.add_images_from_path(uri, embed=False, **kw)
    assert job.wait(timeout=60), job.progress()
    return job


# -- phases 1 and 2 ------------------------------------------------------------------------------
def test_bucket_phases_1_and_2_equal_pillow(
    moto_server: MotoServer,  # noqa: F811
    bucket: str,  # noqa: F811
    db: Path,
) -> None:
    images = generated_images(48, prefix="photos/", subfolders=3, seed=1)
    images.update(generated_images(6, prefix="photos/", seed=2))  # first level, beside d0/..
    others = {
        "photos/notes.txt": b"not an image",
        "photos/d1/README.md": b"# no",
        "photos/d2/": b"",  # a folder marker
        "photos/.hidden.jpg": random_image((5, 5), "JPEG", 3),
        "photos/.cache/x.png": random_image((5, 5), "PNG", 4),
        "photos/d0/.thumbs/y.png": random_image((5, 5), "PNG", 5),
        "elsewhere/z.png": random_image((5, 5), "PNG", 6),
    }
    moto_server.put(bucket, {**images, **others})
    ds = fastindex.Dataset.create("b", db=db)
    job = add(ds, f"s3://{bucket}/photos")
    assert (job.summary["found"], job.summary["added"]) == (len(images), len(images))
    got = by_path(ds)
    assert set(got) == {k.removeprefix("photos/") for k in images}
    for key, data in images.items():
        s = got[key.removeprefix("photos/")]
        assert s.root == f"s3://{bucket}/photos/"
        assert s.status == "indexed", (key, s.error)
        assert (s.width, s.height, s.format) == pillow(data), key
        assert s.size_bytes == len(data)
    # the ETag is kept for the sync (S3's ETag of a single-part upload is the MD5, quoted)
    ((etag,),) = sql(db, ("SELECT etag FROM samples WHERE path = ?", ["d0/img000000.jpg"]))[0]
    head = moto_server.client().head_object(Bucket=bucket, Key="photos/d0/img000000.jpg")
    assert etag == head["ETag"]
    assert status_counts(db, ds.id)["indexed"] == len(images)

    # again: only new keys are added; hidden names when asked for
    moto_server.put(bucket, {"photos/d1/new.png": random_image((9, 8), "PNG", 7)})
    again = add(ds, f"s3://{bucket}/photos/")
    assert (again.summary["added"], again.summary["existing"]) == (1, len(images))
    hidden = add(ds, f"s3://{bucket}/photos/", include_hidden=True)
    assert hidden.summary["added"] == 3
    assert by_path(ds)["d1/new.png"].width == 9
    assert ds.get_loading_progress()["total"] == len(images) + 4


def test_headers_behind_large_segments_and_bad_objects(
    moto_server: MotoServer,  # noqa: F811
    bucket: str,  # noqa: F811
    db: Path,
) -> None:
    im = Image.frombytes("RGB", (33, 21), bytes(range(256)) * 8 + bytes(33 * 21 * 3 - 2048))
    buf = io.BytesIO()
    im.save(buf, "JPEG", icc_profile=bytes(200_000))  # SOF ~200 KB in: several ranges
    big_icc = buf.getvalue()
    objects = {
        "icc.jpg": big_icc,
        "tiny.png": random_image((1, 1), "PNG", 1),
        "empty.jpg": b"",
        "text.jpg": b"this is not a jpeg at all",
        "cut.png": random_image((40, 30), "PNG", 2)[:20],
    }
    moto_server.put(bucket, objects)
    ds = fastindex.Dataset.create("b", db=db)
    add(ds, f"s3://{bucket}")
    got = by_path(ds)
    assert (got["icc.jpg"].width, got["icc.jpg"].height, got["icc.jpg"].format) == (33, 21, "JPEG")
    assert (got["tiny.png"].width, got["tiny.png"].height) == (1, 1)
    for key in ("empty.jpg", "text.jpg", "cut.png"):
        assert got[key].status == "failed" and got[key].error, key
    assert "not a JPEG" in str(got["text.jpg"].error)


# -- failures --------------------------------------------------------------------------------
def test_object_deleted_after_listing_fails_with_404(
    moto_server: MotoServer,  # noqa: F811
    bucket: str,  # noqa: F811
    db: Path,
) -> None:
    images = generated_images(5, prefix="p/", seed=3)
    moto_server.put(bucket, images)
    ds = fastindex.Dataset.create("b", db=db)
    store = _core.Store(str(db))
    store.scan(ds.id, f"s3://{bucket}/p/")
    deleted = sorted(images)[2]
    moto_server.delete(bucket, deleted)
    assert store.probe_pending(ds.id) == 5
    got = by_path(ds)
    gone = got[deleted.removeprefix("p/")]
    assert gone.status == "failed"
    assert gone.error == f"not found (404): s3://{bucket}/{deleted}"
    assert sum(s.status == "indexed" for s in got.values()) == 4


def iam_user_keys(moto_server: MotoServer) -> dict[str, str]:  # noqa: F811
    """Keys of a new IAM user that may do anything in S3 but read `*/secret.png` (applied
    while moto checks requests, see `MotoServer.auth_enforced`)."""
    iam = boto3.client(
        "iam",
        endpoint_url=moto_server.endpoint,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    )
    name = f"u{time.monotonic_ns()}"
    iam.create_user(UserName=name)
    policy = {
        "Version": "2012-10-17",
        "Statement": [
            {"Effect": "Allow", "Action": "s3:*", "Resource": "*"},
            {"Effect": "Deny", "Action": "s3:GetObject", "Resource": "arn:aws:s3:::*/secret.png"},
        ],
    }
    iam.put_user_policy(UserName=name, PolicyName="p", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName=name)["AccessKey"]
    return {
        "AWS_ACCESS_KEY_ID": key["AccessKeyId"],
        "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"],
    }


def test_403_on_one_object_fails_that_row(
    moto_server: MotoServer,  # noqa: F811
    bucket: str,  # noqa: F811
    db: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    moto_server.put(bucket, {"open.png": random_image((4, 3), "PNG", 1), "secret.png": b"x"})
    ds = fastindex.Dataset.create("b", db=db)
    store = _core.Store(str(db))
    # Listed before moto checks signatures: moto 5 refuses object_store's signed LIST
    # (SignatureDoesNotMatch) while it accepts its signed GETs, the requests tested here.
    store.scan(ds.id, f"s3://{bucket}/")
    for k, v in iam_user_keys(moto_server).items():
        monkeypatch.setenv(k, v)
    with moto_server.auth_enforced():
        assert store.probe_pending(ds.id) == 2
    got = by_path(ds)
    assert got["open.png"].status == "indexed"
    assert got["secret.png"].status == "failed"
    assert str(got["secret.png"].error).startswith(
        f"access denied (403 AccessDenied): s3://{bucket}/secret.png"
    )


def test_wrong_credentials_fail_at_once_writing_nothing(
    moto_server: MotoServer,  # noqa: F811
    bucket: str,  # noqa: F811
    db: Path,
) -> None:
    moto_server.put(bucket, generated_images(3, seed=4))
    ds = fastindex.Dataset.create("b", db=db)
    before = table_counts(db)
    # while moto checks requests, the test key is unknown to its IAM
    with moto_server.auth_enforced(), pytest.raises(fastindex.ObjectStoreError) as e:
        ds.add_images_from_path(f"s3://{bucket}/", embed=False)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"s3://{bucket}: credentials refused (403 InvalidAccessKeyId)"), msg
    assert table_counts(db) == before


def test_missing_bucket_and_no_server_fail_at_once_writing_nothing(
    moto_server: MotoServer,  # noqa: F811
    db: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ds = fastindex.Dataset.create("b", db=db)
    before = table_counts(db)
    with pytest.raises(fastindex.ObjectStoreError) as e:
        ds.add_images_from_path("s3://no-such-bucket/photos/", embed=False)
    assert str(e.value).startswith("s3://no-such-bucket: bucket not found (404 NoSuchBucket)")
    assert isinstance(e.value, OSError)

    from s3_support import free_port

    dead = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", dead)
    t0 = time.monotonic()
    with pytest.raises(fastindex.ObjectStoreError) as e:
        ds.add_images_from_path("s3://any-bucket/x/", embed=False)
    assert time.monotonic() - t0 < 10  # a hang guard: no minutes of retries
    msg = str(e.value)
    assert msg.startswith(f"s3://any-bucket: cannot reach the object store at {dead}"), msg
    assert "\n" not in msg
    assert table_counts(db) == before

    with pytest.raises(fastindex.InvalidArgumentError):
        ds.add_images_from_path("s3:///no-bucket", embed=False)


# -- a server that goes away and comes back -----------------------------------------------------
def _wait_for(cond: Any, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.005)


def restarted_during(moto_server: MotoServer, call: Callable[[], Any], *, gets: int) -> Any:  # noqa: F811
    """Run `call` in a thread; once the server has answered `gets` more GETs, stop it for a
    second and start it again. Returns what `call` returned, or the error it raised."""
    before = moto_server.requests.get("GET", 0)
    outcome: list[Any] = []

    def run() -> None:
        try:
            outcome.append(call())
        except fastindex.FastIndexError as e:
            outcome.append(e)

    t = threading.Thread(target=run)
    t.start()
    _wait_for(lambda: moto_server.requests.get("GET", 0) >= before + gets)
    moto_server.stop()
    time.sleep(1.0)
    moto_server.start()
    t.join(60)
    assert not t.is_alive()
    return outcome[0]


# With the client's retries the outage is absorbed; without them (0) the phase ends with an
# ObjectStoreError, its rows stay pending, and the next run finishes them.
@pytest.mark.parametrize("retries", ["10", "0"])
def test_server_restarted_mid_phase_2_loses_nothing(
    moto_server: MotoServer,  # noqa: F811
    bucket: str,  # noqa: F811
    db: Path,
    monkeypatch: pytest.MonkeyPatch,
    retries: str,
) -> None:
    monkeypatch.setenv("FASTINDEX_OBJECT_RETRIES", retries)
    images = generated_images(300, prefix="r/", seed=5, max_side=24)
    moto_server.put_direct(bucket, images)
    ds = fastindex.Dataset.create("b", db=db)
    store = _core.Store(str(db))
    store.scan(ds.id, f"s3://{bucket}/r/")
    monkeypatch.setenv("FASTINDEX_OBJECT_REQUESTS", "4")  # slow enough to stop it part way
    outcome = restarted_during(moto_server, lambda: store.probe_pending(ds.id), gets=40)
    if retries == "0":  # the phase stopped on the error, naming the bucket; run it again
        assert isinstance(outcome, fastindex.ObjectStoreError), outcome
        assert str(outcome).startswith(f"s3://{bucket}: cannot reach the object store")
        assert 0 < status_counts(db, ds.id)["pending"] < len(images)
        store.probe_pending(ds.id)
    else:
        assert outcome == len(images)
    got = by_path(ds)
    assert len(got) == len(images)
    for key, data in images.items():
        s = got[key.removeprefix("r/")]
        assert s.status == "indexed", (key, s.error)
        assert (s.width, s.height, s.format) == pillow(data)
    counts = status_counts(db, ds.id)
    assert counts["indexed"] == len(images)
    assert ds.get_loading_progress()["indexed"] == len(images)


@pytest.mark.parametrize("retries", ["10", "0"])
def test_server_restarted_mid_listing_loses_and_doubles_nothing(
    moto_server: MotoServer,  # noqa: F811
    bucket: str,  # noqa: F811
    db: Path,
    monkeypatch: pytest.MonkeyPatch,
    retries: str,
) -> None:
    # Without the client's retries, the listing of `many/d/` resumes after its last key.
    monkeypatch.setenv("FASTINDEX_OBJECT_RETRIES", retries)
    keys = {f"many/d/k{i:05d}.jpg": b"x" for i in range(3500)}  # four pages
    keys.update({f"many/k{i}.png": b"x" for i in range(3)})
    moto_server.put_direct(bucket, keys)
    ds = fastindex.Dataset.create("b", db=db)
    store = _core.Store(str(db))
    # after the first check, the first level, a page of `many/d/` or more
    outcome = restarted_during(
        moto_server, lambda: store.scan(ds.id, f"s3://{bucket}/many/"), gets=3
    )
    assert isinstance(outcome, dict), outcome
    assert (outcome["found"], outcome["added"]) == (len(keys), len(keys))
    ((n, distinct),) = sql(db, ("SELECT COUNT(*), COUNT(DISTINCT path) FROM samples", []))[0]
    assert n == distinct == len(keys)
    assert ds.get_loading_progress()["total"] == len(keys)


def test_a_stopped_phase_2_resumes(
    moto_server: MotoServer,  # noqa: F811
    bucket: str,  # noqa: F811
    db: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    images = generated_images(200, seed=8, max_side=16)
    moto_server.put_direct(bucket, images)
    ds = fastindex.Dataset.create("b", db=db)
    store = _core.Store(str(db))
    store.scan(ds.id, f"s3://{bucket}")
    monkeypatch.setenv("FASTINDEX_OBJECT_REQUESTS", "2")
    stop = _core.StopFlag()
    gets = moto_server.requests.get("GET", 0)
    threading.Thread(
        target=lambda: (
            _wait_for(lambda: moto_server.requests.get("GET", 0) > gets + 20),
            stop.set(),
        )
    ).start()
    with pytest.raises(fastindex.CancelledError):
        store.probe_pending(ds.id, stop=stop)
    assert status_counts(db, ds.id)["pending"] > 0
    monkeypatch.delenv("FASTINDEX_OBJECT_REQUESTS")
    store.probe_pending(ds.id)
    assert status_counts(db, ds.id)["indexed"] == len(images)
    assert ds.get_loading_progress()["indexed"] == len(images)


def test_credentials_and_endpoint_from_an_aws_profile(
    moto_server: MotoServer,  # noqa: F811
    bucket: str,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    data = random_image((6, 5), "PNG", 9)
    moto_server.put(bucket, {"a.png": data})
    keys = iam_user_keys(moto_server)
    aws = tmp_path / ".aws"
    aws.mkdir()
    (aws / "credentials").write_text(
        "[default]\naws_access_key_id = wrong\naws_secret_access_key = wrong\n\n"
        f"[dev]\naws_access_key_id = {keys['AWS_ACCESS_KEY_ID']}\n"
        f"aws_secret_access_key = {keys['AWS_SECRET_ACCESS_KEY']}\n"
    )
    (aws / "config").write_text(
        f"[profile dev]\nregion = us-east-1\nendpoint_url = {moto_server.endpoint}\n"
    )
    monkeypatch.setenv("HOME", str(tmp_path))
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(k)
    monkeypatch.setenv("AWS_PROFILE", "dev")
    with moto_server.auth_enforced():  # only the profile's keys are accepted now
        assert _core.read_object(f"s3://{bucket}/a.png") == data
        monkeypatch.setenv("AWS_PROFILE", "nope")
        with pytest.raises(fastindex.ObjectStoreError, match="AWS_PROFILE=nope: no such profile"):
            _core.read_object(f"s3://{bucket}/a.png")


# -- the reader ----------------------------------------------------------------------------------
def test_read_object_and_objects_return_the_exact_bytes(
    moto_server: MotoServer,  # noqa: F811
    bucket: str,  # noqa: F811
) -> None:
    objects = generated_images(20, prefix="r/", seed=6)
    moto_server.put(bucket, objects)
    uris = [f"s3://{bucket}/{k}" for k in objects]
    data = next(iter(objects.values()))
    assert _core.read_object(uris[0]) == data
    assert _core.read_object(uris[0], 3, 10) == data[3:10]
    assert _core.read_object(uris[0], 5) == data[5:]
    assert _core.read_object(uris[0], None, 4) == data[:4]
    with pytest.raises(fastindex.ObjectStoreError, match=r"^s3://.*/r/nope\.png: not found"):
        _core.read_object(f"s3://{bucket}/r/nope.png")
    with pytest.raises(fastindex.InvalidArgumentError):
        _core.read_object("/not/a/uri.png")
    got = _core.read_objects([*uris, f"s3://{bucket}/r/nope.png", *uris[:2]], max_in_flight=8)
    assert got[: len(uris)] == list(objects.values())
    assert got[len(uris)] == f"not found (404): s3://{bucket}/r/nope.png"
    assert got[-2:] == list(objects.values())[:2]
    assert _core.read_objects([]) == []


# -- adding a prefix again: a sync by ETag and size ----------------------------------------------
def audited(db: Path) -> set[tuple[str, int]]:
    (rows,) = sql(db, ("SELECT op, id FROM audit", []))
    return {(op, i) for op, i in rows}


def test_adding_a_prefix_again_syncs_by_etag_and_size(
    moto_server: MotoServer,  # noqa: F811
    bucket: str,  # noqa: F811
    db: Path,
) -> None:
    images = generated_images(10, prefix="p/", subfolders=2, seed=11, max_side=32)
    # 8x3 and 4x6 BMPs have the same byte size: only the ETag tells them apart
    before, after = random_image((8, 3), "BMP", 1), random_image((4, 6), "BMP", 2)
    assert len(before) == len(after) and before != after
    images["p/d0/same-size.bmp"] = before
    moto_server.put(bucket, images)
    uri = f"s3://{bucket}/p/"
    ds = fastindex.Dataset.create("b", db=db)
    add(ds, uri)
    assert status_counts(db, ds.id)["indexed"] == len(images)
    ids = {p: s.id for p, s in by_path(ds).items()}
    sql(db, *AUDIT_SAMPLES, write=True)

    moto_server.put(bucket, {"p/d1/new.png": random_image((5, 7), "PNG", 3)})
    moto_server.put(bucket, {"p/d0/same-size.bmp": after})
    gone = next(k for k in images if k.startswith("p/d1/"))
    moto_server.delete(bucket, gone)
    store = _core.Store(str(db))
    s = store.scan(ds.id, uri)  # phase 1 only: the changed row waits for phase 2
    n = len(images)
    assert (s["found"], s["added"], s["changed"], s["removed"]) == (n, 1, 1, 1)
    assert (s["unchanged"], s["existing"]) == (n - 2, n - 1)
    got = by_path(ds)
    changed = got["d0/same-size.bmp"]
    assert (changed.status, changed.width, changed.height, changed.format) == (
        "pending",
        None,
        None,
        None,
    )
    assert got[gone.removeprefix("p/")].status == "missing"
    assert got["d1/new.png"].status == "pending"
    # only the three rows the sync had to write were written
    new_id = got["d1/new.png"].id
    assert audited(db) == {
        ("u", ids["d0/same-size.bmp"]),
        ("u", ids[gone.removeprefix("p/")]),
        ("i", new_id),
    }
    assert progress_counts(ds.get_loading_progress()) == status_counts(db, ds.id)
    ((etag,),) = sql(db, ("SELECT etag FROM samples WHERE id = ?", [changed.id]))[0]
    assert etag == moto_server.client().head_object(Bucket=bucket, Key="p/d0/same-size.bmp")["ETag"]

    store.probe_pending(ds.id)
    changed = ds.sample(changed.id)
    assert changed.status == "indexed"
    assert (changed.width, changed.height, changed.size_bytes) == (4, 6, len(after))
    assert ds.sample(new_id).status == "indexed"

    # unchanged now: nothing written; the deleted key put back: pending again
    sql(db, ("DELETE FROM audit", []), write=True)
    s = store.scan(ds.id, uri)
    assert (s["added"], s["changed"], s["removed"], s["unchanged"]) == (0, 0, 0, n)
    assert audited(db) == set()
    moto_server.put(bucket, {gone: images[gone]})
    s = store.scan(ds.id, uri)
    assert (s["added"], s["changed"], s["removed"], s["unchanged"]) == (0, 1, 0, n)
    assert ds.sample(ids[gone.removeprefix("p/")]).status == "pending"
    assert progress_counts(ds.get_loading_progress()) == status_counts(db, ds.id)


@pytest.mark.parametrize("how", ["refused", "stopped"])
def test_a_listing_that_fails_or_stops_marks_nothing_missing(
    moto_server: MotoServer,  # noqa: F811
    bucket: str,  # noqa: F811
    db: Path,
    how: str,
) -> None:
    keys = {f"m/d/k{i:05d}.jpg": b"x" for i in range(6000)}  # six pages
    moto_server.put_direct(bucket, keys)
    uri = f"s3://{bucket}/m/"
    ds = fastindex.Dataset.create("b", db=db)
    store = _core.Store(str(db))
    store.scan(ds.id, uri)
    for k in ["m/d/k00000.jpg", "m/d/k05999.jpg"]:
        moto_server.delete(bucket, k)
    lists = moto_server.requests.get("GET", 0)
    stop = _core.StopFlag()
    outcome: list[Any] = []

    def scan() -> None:
        try:
            outcome.append(store.scan(ds.id, uri, stop=stop))
        except fastindex.FastIndexError as e:
            outcome.append(e)

    t = threading.Thread(target=scan)
    with contextlib.ExitStack() as during:
        t.start()
        # the first check, the first level, a page of `m/d/`: then the rest fails
        _wait_for(lambda: moto_server.requests.get("GET", 0) >= lists + 3)
        if how == "refused":
            during.enter_context(moto_server.auth_enforced())
        else:
            stop.set()
        t.join(60)
    assert not t.is_alive()
    expected = fastindex.ObjectStoreError if how == "refused" else fastindex.CancelledError
    assert isinstance(outcome[0], expected), outcome
    assert status_counts(db, ds.id)["missing"] == 0
    assert ds.get_loading_progress()["missing"] == 0
    # a complete listing marks them
    s = store.scan(ds.id, uri)
    assert (s["removed"], s["unchanged"]) == (2, len(keys) - 2)
    assert status_counts(db, ds.id)["missing"] == 2
