"""The server under hostile clients, on a real socket (raw bytes: httpx would normalise `..`
away before it ever reached the server): traversal, foreign hosts and origins, huge ids,
links swapped in after indexing, decompression bombs, crowds and slow clients. Whatever is
sent, the answer is a 4xx JSON message, never a 500, and the server keeps serving."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fastindex
import httpx
import pytest
from fastindex.server import ServerHandle, start_server
from fastindex.server.errors import ForbiddenError, JSONResponse, NotFoundError
from fastindex.server.media import OpenFileResponse, make_thumbnail, open_sample_file
from PIL import Image
from server_support import make_images, probe_held, wait_until

websockets = pytest.importorskip("websockets")
from websockets.asyncio.client import connect  # noqa: E402
from websockets.exceptions import InvalidStatus  # noqa: E402

SECRET = b"SECRET-d41d8cd98f00b204"
BIG = 2**63


# -- helpers ---------------------------------------------------------------------------------------
def _addr(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    return host.strip("[]"), int(port)


def raw(
    url: str, target: bytes, *, host: bytes = b"127.0.0.1", extra: bytes = b""
) -> tuple[int, bytes]:
    """Send `GET target` as raw bytes; the status and the whole answer."""
    req = b"GET " + target + b" HTTP/1.1\r\nHost: " + host + b"\r\n" + extra
    return raw_request(url, req + b"Connection: close\r\n\r\n")


def raw_request(url: str, request: bytes) -> tuple[int, bytes]:
    with socket.create_connection(_addr(url), timeout=15) as s:
        s.sendall(request)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    answer = b"".join(chunks)
    m = re.match(rb"HTTP/1\.[01] (\d{3})", answer)
    assert m, answer[:200]
    return int(m.group(1)), answer


def body_of(answer: bytes) -> bytes:
    return answer.split(b"\r\n\r\n", 1)[1]


def assert_refused(status: int, answer: bytes, what: object) -> None:
    assert 400 <= status < 500, (what, status, answer[:300])
    assert SECRET not in answer and b"root:" not in answer, what
    body = body_of(answer)
    if body and b"event-stream" not in answer:
        assert json.loads(body)["message"], what


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A store with one indexed folder, a secret file beside (outside) it, and a server."""
    tmp = tmp_path_factory.mktemp("hostile")
    (tmp / "secret.txt").write_bytes(SECRET)
    root = tmp / "imgs"
    make_images(root, 6)
    db = str(tmp / "s.db")
    ds = fastindex.Dataset.create("d", db=db)
    ds.add_images_from_path(str(root), embed=False)
    assert ds.wait(60)
    samples = {s.path: s for s in ds.samples(limit=100)}
    with start_server(db, port=0, allowed_roots=[root]) as server:
        yield {"tmp": tmp, "root": root, "db": db, "ds": ds, "samples": samples, "server": server}


ROUTES = [
    "/api/datasets/{x}",
    "/api/tasks/{x}",
    "/api/progress/{x}",
    "/sse/progress/{x}",
    "/api/datasets/{x}/samples",
    "/api/samples/{x}",
    "/api/samples/{x}/thumbnail",
    "/api/samples/{x}/image",
    "/api/datasets/{x}/search?q=cat",
    "/api/datasets/1/similar/{x}",
    "/static/{x}",
    "/{x}",
]
TRAVERSALS = [
    "../../../../../../etc/passwd",
    "../secret.txt",
    "1/../../../secret.txt",
    "..%2f..%2f..%2f..%2fetc%2fpasswd",
    "%2e%2e/%2e%2e/%2e%2e/secret.txt",
    "%2e%2e%2f%2e%2e%2f%2e%2e%2fsecret.txt",
    "%252e%252e%252fsecret.txt",
    "..\\..\\..\\secret.txt",
    "..%5c..%5c..%5csecret.txt",
    "%00",
    "1%00",
    "..%00/secret.txt",
    "%2fetc%2fpasswd",
    "/etc/passwd",
    "....//....//....//etc/passwd",
    "1;/../../secret.txt",
    "%c0%ae%c0%ae/%c0%ae%c0%ae/secret.txt",
    "%ff%fe",
]


# -- traversal, hosts, origins ---------------------------------------------------------------------
@pytest.mark.parametrize("route", ROUTES)
def test_traversal_attempts_on_every_route(world: dict[str, Any], route: str) -> None:
    url = world["server"].url
    for attack in TRAVERSALS:
        status, answer = raw(url, route.format(x=attack).encode("latin-1"))
        assert_refused(status, answer, (route, attack))
    # A raw NUL or a bare space in the request line: the parser refuses it, in JSON.
    for target in (route.format(x="a\x00b").encode(), route.format(x="a b").encode()):
        status, answer = raw(url, target)
        assert_refused(status, answer, (route, target))
    status, _ = raw(url, b"/api/datasets")
    assert status == 200


def test_foreign_hosts_are_refused(world: dict[str, Any]) -> None:
    url = world["server"].url
    for host in (b"evil.example", b"evil.example:80", b"127.0.0.1.nip.io", b"10.0.0.1", b""):
        status, answer = raw(url, b"/api/datasets", host=host)
        assert status == 400, (host, answer)
        assert json.loads(body_of(answer))["error"] == "HostNotAllowed"
    # HTTP/1.0 without any Host header
    status, _ = raw_request(url, b"GET /api/datasets HTTP/1.0\r\n\r\n")
    assert status == 400
    for host in (b"localhost", b"127.0.0.1:1234", b"[::1]:80", b"LOCALHOST"):
        status, answer = raw(url, b"/api/datasets", host=host)
        assert status == 200, (host, answer)


def test_cross_origin_websocket_and_post_are_refused(world: dict[str, Any]) -> None:
    server: ServerHandle = world["server"]
    ws_url = server.url.replace("http", "ws") + f"/ws/progress/{world['ds'].id}"

    async def attempt(origin: str | None) -> Any:
        async with connect(ws_url, origin=origin, open_timeout=10) as ws:  # type: ignore[arg-type]
            return json.loads(await asyncio.wait_for(ws.recv(), 10))

    for origin in ("http://evil.example", "null", "http://127.0.0.1.evil.example:8000"):
        with pytest.raises(InvalidStatus) as e:
            asyncio.run(attempt(origin))
        assert e.value.response.status_code == 403, origin
        assert json.loads(e.value.response.body or b"")["error"] == "OriginNotAllowed"
    assert asyncio.run(attempt(server.url))["status"] == "complete"
    assert asyncio.run(attempt(None))["status"] == "complete"

    r = httpx.post(
        f"{server.url}/api/datasets",
        json={"name": "x", "images_path": str(world["root"])},
        headers={"origin": "http://evil.example"},
    )
    assert r.status_code == 403 and r.json()["error"] == "OriginNotAllowed"


def test_post_may_index_only_inside_allowed_roots(world: dict[str, Any]) -> None:
    url = world["server"].url
    root: Path = world["root"]
    for path in ("/", "/etc", str(world["tmp"]), f"{root}/../", "/proc/self"):
        r = httpx.post(f"{url}/api/datasets", json={"name": "x", "images_path": path})
        assert r.status_code == 403 and r.json()["error"] == "ForbiddenError", (path, r.text)
    r = httpx.post(
        f"{url}/api/datasets",
        json={"name": "x", "images_path": str(root), "annotations_json": "/proc/self/pagemap"},
    )
    assert r.status_code == 403 and "annotations_json" in r.json()["message"]
    link = world["tmp"] / "link-to-etc"
    link.symlink_to("/etc")
    r = httpx.post(f"{url}/api/datasets", json={"name": "x", "images_path": str(link)})
    assert r.status_code == 403


# -- huge ids --------------------------------------------------------------------------------------
ID_ROUTES = [
    "/api/datasets/{x}",
    "/api/tasks/{x}",
    "/api/progress/{x}",
    "/sse/progress/{x}",
    "/api/datasets/{x}/samples",
    "/api/samples/{x}",
    "/api/samples/{x}/thumbnail",
    "/api/samples/{x}/image",
    "/api/datasets/{x}/search?q=cat",
    "/api/datasets/{x}/similar/1",
    "/api/datasets/1/similar/{x}",
]


@pytest.mark.parametrize("route", ID_ROUTES)
def test_huge_and_negative_ids_are_a_4xx(world: dict[str, Any], route: str) -> None:
    url = world["server"].url
    for x in (BIG, BIG + 1, 2**64, 10**40, -1, -BIG - 1, BIG - 1):
        status, answer = raw(url, route.format(x=x).encode())
        assert_refused(status, answer, (route, x))


def test_huge_offsets_and_limits(world: dict[str, Any]) -> None:
    url = world["server"].url
    did = world["ds"].id
    for query in (
        f"samples?offset={BIG}",
        f"samples?offset={2**64}",
        "samples?offset=-1",
        f"samples?after_id={2**64}",
        "samples?after_id=-1",
        f"samples?limit={BIG}",
        f"search?q=cat&k={BIG}",
        f"search?q=cat&k={-BIG}",
        f"similar/1?k={2**64}",
    ):
        status, answer = raw(url, f"/api/datasets/{did}/{query}".encode())
        assert_refused(status, answer, query)
    r = httpx.get(f"{url}/api/datasets/{did}/samples", params={"after_id": BIG - 1})
    assert r.status_code == 200 and r.json()["items"] == []


def test_huge_ids_on_the_websocket(world: dict[str, Any]) -> None:
    base = world["server"].url.replace("http", "ws")

    async def attempt(x: int) -> None:
        async with connect(f"{base}/ws/progress/{x}", open_timeout=10) as ws:
            await asyncio.wait_for(ws.recv(), 10)

    for x, status in ((BIG, 422), (2**64, 422), (-1, 422), (BIG - 1, 404)):
        with pytest.raises(InvalidStatus) as e:  # refused at the handshake, with a JSON body
            asyncio.run(attempt(x))
        assert e.value.response.status_code == status, x
        assert json.loads(e.value.response.body or b"")["message"], x
    assert httpx.get(f"{world['server'].url}/api/datasets").status_code == 200


# -- files that changed after indexing -------------------------------------------------------------
def test_link_swapped_in_after_indexing_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    make_images(root, 4)
    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "secret.txt").write_bytes(SECRET)
    db = str(tmp_path / "s.db")
    ds = fastindex.Dataset.create("d", db=db)
    ds.add_images_from_path(str(root), embed=False)
    assert ds.wait(60)
    s0, s1, s2, s3 = sorted(ds.samples(limit=10), key=lambda s: s.path)
    with start_server(db, port=0, allowed_roots=[root]) as server:
        url = server.url

        def get(s: fastindex.Sample, part: str) -> httpx.Response:
            return httpx.get(f"{url}/api/samples/{s.id}/{part}", timeout=15)

        assert get(s0, "image").content == Path(s0.abs_path).read_bytes()
        # The file becomes a link to a file outside the root: refused.
        os.replace(s0.abs_path, tmp_path / "moved")
        os.symlink(tmp_path / "secret.txt", s0.abs_path)
        for part in ("image", "thumbnail"):
            r = get(s0, part)
            assert r.status_code == 403, r.text
            assert "outside" in r.json()["message"] and SECRET not in r.content
        # A link to another image inside the root is still inside: served.
        os.unlink(s0.abs_path)
        os.symlink(s1.abs_path, s0.abs_path)
        assert get(s0, "image").content == Path(s1.abs_path).read_bytes()
        # The folder above the file becomes a link out of the root.
        folder = Path(s2.abs_path).parent
        copy = outside / folder.name
        copy.mkdir()
        for f in folder.iterdir():
            (copy / f.name).write_bytes(SECRET)
        os.replace(folder, tmp_path / "moved-folder")
        os.symlink(copy, folder)
        for part in ("image", "thumbnail"):
            r = get(s2, part)
            assert r.status_code == 403 and SECRET not in r.content, r.text
        # The dataset's folder itself becomes a link (to a copy holding the secret).
        decoy = tmp_path / "decoy"
        decoy.mkdir()
        for sub in ("part0", "part1", "part2"):
            (decoy / sub).mkdir()
            (decoy / sub / Path(s1.path).name).write_bytes(SECRET)
        os.replace(root, tmp_path / "moved-root")
        os.symlink(decoy, root)
        for part in ("image", "thumbnail"):
            r = get(s1, part)
            assert r.status_code == 403 and "now leads to" in r.json()["message"], r.text
        os.unlink(root)
        os.replace(tmp_path / "moved-root", root)
        # A FIFO swapped in is refused at once (opening it must not wait for a writer).
        os.unlink(s3.abs_path)
        os.mkfifo(s3.abs_path)
        for part in ("image", "thumbnail"):
            r = get(s3, part)
            assert r.status_code == 403 and "regular file" in r.json()["message"], r.text
        assert httpx.get(f"{url}/api/datasets").status_code == 200


def _sample(root: Path, path: str) -> fastindex.Sample:
    return fastindex.Sample(
        id=1,
        dataset_id=1,
        job_id=1,
        root=str(root),
        path=path,
        size_bytes=None,
        mtime_ns=None,
        status="indexed",
        width=40,
        height=30,
        format="PNG",
        orientation=1,
        error=None,
        coco_width=None,
        coco_height=None,
        size_mismatch=False,
    )


@pytest.mark.parametrize("how", ["o_path", "portable"])
def test_open_sample_file_checks_the_file_it_opened(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    """Both ways of opening (Linux O_PATH + /proc, and the portable open + realpath + inode
    check) refuse links out of the root, FIFOs and folders, and serve links inside it."""
    if how == "portable":
        monkeypatch.delattr(os, "O_PATH", raising=False)
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "a.png").write_bytes(b"inside")
    (tmp_path / "secret").write_bytes(SECRET)
    (root / "out.png").symlink_to(tmp_path / "secret")
    (root / "in.png").symlink_to(root / "a.png")
    (root / "up").symlink_to(tmp_path)
    os.mkfifo(root / "fifo.png")
    with open_sample_file(_sample(root, "a.png")) as f:
        assert f.read() == b"inside"
    with open_sample_file(_sample(root, "in.png")) as f:
        assert f.read() == b"inside"
    for path, why in (
        ("out.png", "outside"),
        ("up/secret", "outside"),
        ("sub/../../secret", "outside"),
        ("fifo.png", "regular file"),
        ("sub", "regular file"),
    ):
        with pytest.raises(ForbiddenError, match=why):
            open_sample_file(_sample(root, path))
    with pytest.raises(NotFoundError, match="no longer on disk"):
        open_sample_file(_sample(root, "gone.png"))


def test_names_that_are_not_utf8_round_trip(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    root.mkdir()
    raw_name = b"caf\xe9 [x].png"
    Image.new("RGB", (40, 30), (200, 10, 10)).save(os.path.join(os.fsencode(root), raw_name))
    db = str(tmp_path / "s.db")
    ds = fastindex.Dataset.create("d", db=db)
    ds.add_images_from_path(str(root), embed=False)
    assert ds.wait(60)
    items = ds.samples(limit=10)
    if not items:
        pytest.skip("this build does not index names that are not UTF-8 yet")
    with start_server(db, port=0, allowed_roots=[root]) as server:
        r = httpx.get(f"{server.url}/api/datasets/{ds.id}/samples")
        assert r.status_code == 200, r.text
        (item,) = r.json()["items"]
        assert os.fsencode(item["path"]) == raw_name and os.fsencode(item["file_name"]) == raw_name
        assert b"\\udce9" in r.content  # the lone surrogate as a JSON escape
        img = httpx.get(f"{server.url}/api/samples/{item['id']}/image")
        assert img.status_code == 200
        with open(os.path.join(os.fsencode(root), raw_name), "rb") as f:
            assert img.content == f.read()
        assert "%E9" in img.headers["content-disposition"]
        assert httpx.get(f"{server.url}/api/samples/{item['id']}/thumbnail").status_code == 200


def test_a_file_whose_name_is_not_utf8_is_opened_and_named_byte_for_byte(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    root.mkdir()
    raw_name = b"caf\xe9 [1].png"
    with open(os.path.join(os.fsencode(root), raw_name), "wb") as f:
        Image.new("RGB", (40, 30), (9, 9, 9)).save(f, "PNG")
    with open(os.path.join(os.fsencode(root), raw_name), "rb") as f:
        data = f.read()
    sample = fastindex.Sample(
        id=1,
        dataset_id=1,
        job_id=1,
        root=str(root),
        path=os.fsdecode(raw_name),
        size_bytes=len(data),
        mtime_ns=None,
        status="indexed",
        width=40,
        height=30,
        format="PNG",
        orientation=1,
        error=None,
        coco_width=None,
        coco_height=None,
        size_mismatch=False,
    )
    with open_sample_file(sample) as f:
        assert f.read() == data
    response = OpenFileResponse(
        open_sample_file(sample), media_type="image/png", filename=sample.file_name
    )
    response.file.close()
    assert (
        response.headers["content-disposition"] == "inline; filename*=utf-8''caf%E9%20%5B1%5D.png"
    )
    assert response.headers["content-length"] == str(len(data))
    with open_sample_file(sample) as f, Image.open(io.BytesIO(make_thumbnail(f))) as im:
        assert im.size == (40, 30)


def test_json_keeps_lone_surrogates() -> None:
    name = os.fsdecode(b"dir/\xff\xfe-\xe9.png")
    body = JSONResponse({"path": name}).body
    assert json.loads(body)["path"] == name
    assert os.fsencode(json.loads(body)["path"]) == b"dir/\xff\xfe-\xe9.png"


# -- crowds and slow clients -----------------------------------------------------------------------
@contextlib.contextmanager
def open_files_at_least(n: int) -> Iterator[None]:
    """Raise this process's open-file limit to `n` (skip if the hard limit is lower)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < n:
        pytest.skip(f"needs {n} open files, the hard limit is {hard}")
    if soft != resource.RLIM_INFINITY and soft < n:
        resource.setrlimit(resource.RLIMIT_NOFILE, (n, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _open_sockets() -> int:
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            n += os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
    return n


async def _get(host: str, port: int, target: str) -> int:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(
            f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode()
        )
        await writer.drain()
        answer = await reader.read()
        return int(answer.split(b" ", 2)[1])
    finally:
        writer.close()


def _abort(ws: Any) -> None:
    """Drop a connection as a crashed client does: no close frame, a TCP reset."""
    sock = ws.transport.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    ws.transport.abort()


def test_500_connections_and_200_dropped_websockets(tmp_path: Path) -> None:
    make_images(tmp_path / "imgs", 5)
    db = str(tmp_path / "s.db")
    ds = fastindex.Dataset.create("d", db=db)
    with open_files_at_least(4096), probe_held(db, ds.id):
        ds.add_images_from_path(str(tmp_path / "imgs"), embed=False)  # stays pending: in progress
        sockets_before = _open_sockets()
        with start_server(db, port=0, allowed_roots=[tmp_path]) as server:
            host, port = _addr(server.url)
            hub = server.app.state.hub

            async def crowd() -> list[int]:
                # 500 connections open at once, then each asks for the progress.
                opened = await asyncio.gather(
                    *(asyncio.open_connection(host, port) for _ in range(500))
                )
                request = (
                    f"GET /api/progress/{ds.id} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                    "Connection: close\r\n\r\n"
                ).encode()

                async def ask(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> int:
                    writer.write(request)
                    await writer.drain()
                    answer = await reader.read()
                    writer.close()
                    return int(answer.split(b" ", 2)[1])

                return await asyncio.wait_for(asyncio.gather(*(ask(r, w) for r, w in opened)), 120)

            statuses = asyncio.run(crowd())
            assert statuses == [200] * 500

            async def watchers_then_drop() -> int:
                ws_url = server.url.replace("http", "ws") + f"/ws/progress/{ds.id}"
                clients = await asyncio.wait_for(
                    asyncio.gather(*(connect(ws_url, open_timeout=60) for _ in range(200))), 120
                )
                firsts = await asyncio.gather(*(asyncio.wait_for(c.recv(), 30) for c in clients))
                assert all(json.loads(m)["status"] == "in_progress" for m in firsts)
                watching = hub.watchers(ds.id)
                for c in clients:
                    _abort(c)
                return watching

            assert asyncio.run(watchers_then_drop()) == 200
            # The server notices each vanished watcher at its next message (heartbeat: 1 s).
            wait_until(lambda: hub.watchers() == 0, 30)
            assert asyncio.run(_get(host, port, "/api/datasets")) == 200
            wait_until(lambda: _open_sockets() <= sockets_before + 5, 30)  # every socket let go


def _slow_client(host: str, port: int, payload: bytes, every: float, out: list[Any]) -> None:
    """Sends `payload` one byte every `every` seconds until the server closes the socket;
    appends what the server said (b"" if nothing) and when it closed."""
    s = socket.create_connection((host, port), timeout=30)
    s.setblocking(False)
    got = b""
    try:
        for b in payload:
            try:
                s.send(bytes([b]))
            except (BrokenPipeError, ConnectionResetError):
                break
            time.sleep(every)
            try:
                chunk = s.recv(4096)
            except BlockingIOError:
                continue
            except ConnectionResetError:
                break
            got += chunk
            if not chunk or got.endswith(b"}"):
                break
        else:
            got = b"NOT CLOSED"
    finally:
        s.close()
    out.append((got, time.monotonic()))


def test_slow_loris_clients_are_timed_out_and_others_served(tmp_path: Path) -> None:
    db = str(tmp_path / "s.db")
    timeout = 2.0
    with start_server(db, port=0, request_timeout=timeout) as server:
        host, port = _addr(server.url)
        headers = b"GET /api/datasets HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Pad: " + b"a" * 100
        body = b"POST /api/datasets HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json"
        body += b"\r\nContent-Length: 400\r\n\r\n{" + b" " * 400
        out: list[Any] = []
        threads = [
            threading.Thread(target=_slow_client, args=(host, port, headers, 1.0, out))
            for _ in range(50)
        ]
        # Request line and headers at once, then a body that never finishes.
        threads += [
            threading.Thread(
                target=_slow_client, args=(host, port, body[:120], 0.0, []), daemon=True
            )
        ]
        started = time.monotonic()
        for t in threads:
            t.start()
        silent = [socket.create_connection((host, port), timeout=30) for _ in range(10)]
        # A kept-alive connection that goes idle after its answer.
        kept = socket.create_connection((host, port), timeout=30)
        kept.sendall(b"GET /api/datasets HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        # While all of them hold their sockets, a normal client is served.
        for _ in range(3):
            r = httpx.get(f"{server.url}/api/datasets", timeout=10)
            assert r.status_code == 200
        for t in threads:
            t.join(timeout + 20)  # a hang guard
            assert not t.is_alive()
        assert len(out) == 50
        for got, closed_at in out:
            assert got.startswith(b"HTTP/1.1 408"), got
            assert json.loads(body_of(got))["error"] == "RequestTimeout"
            assert closed_at - started < 50  # far from the 100 s the payload would take
        for s in silent:  # connections that never send a byte are closed too
            s.settimeout(timeout + 20)
            assert s.recv(4096).startswith(b"HTTP/1.1 408")
            s.close()
        answer = b""
        while chunk := kept.recv(4096):  # the answer, then the end (keep-alive timeout)
            answer += chunk
        kept.close()
        assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b'"next_after_id":null}')
        assert httpx.get(f"{server.url}/api/datasets").status_code == 200


def test_a_client_that_stops_reading_is_dropped(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    root.mkdir()
    big = root / "big.png"
    Image.new("RGB", (64, 64)).save(big)
    with big.open("ab") as f:  # a valid header, then 32 MB the probe never reads
        f.write(os.urandom(32 << 20))
    size = big.stat().st_size
    db = str(tmp_path / "s.db")
    ds = fastindex.Dataset.create("d", db=db)
    ds.add_images_from_path(str(root), embed=False)
    assert ds.wait(60)
    (sample,) = ds.samples()
    with start_server(db, port=0, write_timeout=1.0) as server:
        with socket.create_connection(_addr(server.url), timeout=30) as s:
            s.sendall(
                f"GET /api/samples/{sample.id}/image HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()
            )
            time.sleep(3)  # read nothing: the server's send buffer fills and stays full
            got = 0
            with contextlib.suppress(ConnectionResetError):
                while chunk := s.recv(1 << 20):
                    got += len(chunk)
        assert 0 < got < size  # what the kernel had buffered, then the end
        r = httpx.get(f"{server.url}/api/samples/{sample.id}/image", timeout=30)
        assert r.status_code == 200 and len(r.content) == size


def test_connection_cap_makes_room_and_refuses_when_all_are_busy(tmp_path: Path) -> None:
    make_images(tmp_path / "imgs", 3)
    db = str(tmp_path / "s.db")
    ds = fastindex.Dataset.create("d", db=db)
    cap = 20
    with probe_held(db, ds.id):
        ds.add_images_from_path(str(tmp_path / "imgs"), embed=False)
        with start_server(db, port=0, max_connections=cap, request_timeout=60) as server:
            host, port = _addr(server.url)
            # Idle sockets beyond the cap: each newcomer closes the one that waited longest.
            idle = [socket.create_connection((host, port), timeout=30) for _ in range(2 * cap)]
            assert asyncio.run(_get(host, port, "/api/datasets")) == 200
            closed: set[socket.socket] = set()

            def count_closed() -> bool:
                readable, _, _ = select.select([s for s in idle if s not in closed], [], [], 0)
                closed.update(s for s in readable if s.recv(4096) == b"")
                return len(closed) >= cap

            wait_until(count_closed, 30)
            for s in idle:
                s.close()
            # Every slot busy with a live stream: a newcomer is told to come back, in JSON.
            streams = []
            for _ in range(cap):
                c = httpx.Client(base_url=server.url, timeout=30)
                cm = c.stream("GET", f"/sse/progress/{ds.id}")
                r = cm.__enter__()
                assert r.status_code == 200
                streams.append((c, cm))
            status, answer = raw(server.url, b"/api/datasets")
            assert status == 503 and json.loads(body_of(answer))["error"] == "Busy"
            for c, cm in streams:
                cm.__exit__(None, None, None)
                c.close()
            wait_until(lambda: raw(server.url, b"/api/datasets")[0] == 200, 30)


# -- decompression bombs ---------------------------------------------------------------------------
def write_png(path: Path, width: int, height: int, *, rows: int | None = None) -> None:
    """An RGB PNG of `width` x `height` black pixels, written without holding it in memory;
    `rows` < height writes only that many rows (the header still declares the full size)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    comp = zlib.compressobj(1)
    block = (b"\x00" + bytes(3 * width)) * 64
    left = height if rows is None else rows
    parts = []
    while left > 0:
        n = min(64, left)
        parts.append(comp.compress(block if n == 64 else block[: n * (1 + 3 * width)]))
        left -= n
    parts.append(comp.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", b"".join(parts))
        + chunk(b"IEND", b"")
    )


def test_one_decode_for_six_requests_of_one_thumbnail(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    root.mkdir()
    write_png(root / "big.png", 4000, 3000)
    db = str(tmp_path / "s.db")
    ds = fastindex.Dataset.create("d", db=db)
    ds.add_images_from_path(str(root), embed=False)
    assert ds.wait(60)
    (sample,) = ds.samples()
    with start_server(db, port=0, allowed_roots=[root]) as server:

        async def six_at_once(sample_id: int) -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=server.url, timeout=120) as c:
                return await asyncio.gather(
                    *(c.get(f"/api/samples/{sample_id}/thumbnail") for _ in range(6))
                )

        answers = asyncio.run(six_at_once(sample.id))
        assert [r.status_code for r in answers] == [200] * 6
        assert len({r.content for r in answers}) == 1
        budget = server.app.state.decode_budget
        assert budget.decodes == 1 and budget.busy == 0
        assert asyncio.run(six_at_once(sample.id))[0].status_code == 200
        assert budget.decodes == 1  # from the cache


def _status_kb(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {key} for {pid}")


SERVE = """
import sys
from fastindex.server import start_server
server = start_server(sys.argv[1], port=0, allowed_roots=[sys.argv[2]])
print(server.url, flush=True)
sys.stdin.read()  # until the test closes it (or dies)
server.stop()
"""


def test_thumbnail_bombs_keep_memory_bounded(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    root.mkdir()
    Image.new("RGB", (64, 48), (10, 20, 30)).save(root / "small.png")
    write_png(root / "bomb30k.png", 30000, 30000, rows=64)  # declares 900 MP
    write_png(root / "big13k.png", 13000, 13000)  # 169 MP: just under Pillow's own limit
    # 63 MP each (~250 MB decoded): within the budget, so they are made, one at a time.
    write_png(root / "wide_a.png", 8000, 7900)
    write_png(root / "wide_b.png", 7900, 8000)
    db = str(tmp_path / "s.db")
    ds = fastindex.Dataset.create("d", db=db)
    ds.add_images_from_path(str(root), embed=False)
    assert ds.wait(60)
    ids = {Path(s.path).stem: s.id for s in ds.samples(limit=10)}
    assert set(ids) == {"small", "bomb30k", "big13k", "wide_a", "wide_b"}
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVE, db, str(root)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        assert url.startswith("http://"), url
        with httpx.Client(base_url=url, timeout=120) as c:
            assert c.get(f"/api/samples/{ids['small']}/thumbnail").status_code == 200
        idle_kb = _status_kb(proc.pid, "VmRSS")

        async def six_at_once(*names: str) -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=url, timeout=300) as c:
                return await asyncio.gather(
                    *(
                        c.get(f"/api/samples/{ids[names[i % len(names)]]}/thumbnail")
                        for i in range(6)
                    )
                )

        for names, status in (
            (("bomb30k",), 422),
            (("big13k",), 422),
            (("wide_a", "wide_b"), 200),
        ):
            answers = asyncio.run(six_at_once(*names))
            assert [r.status_code for r in answers] == [status] * 6, answers[0].text
            if status == 422:  # refused from the header: by Pillow's limit, or by ours
                assert re.search(
                    "pixels, more than|decompression bomb", answers[0].json()["message"]
                )
        peak_kb = _status_kb(proc.pid, "VmHWM")
        print(f"\nserver RSS idle {idle_kb / 1024:.0f} MB, peak {peak_kb / 1024:.0f} MB")
        assert (peak_kb - idle_kb) / 1024 < 500
        with httpx.Client(base_url=url, timeout=30) as c:
            assert c.get("/api/datasets").status_code == 200
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


# -- the command line ------------------------------------------------------------------------------
def _cli(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "fastindex.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "COLUMNS": "300", "NO_COLOR": "1"},
    )


def _url_from(proc: subprocess.Popen[str]) -> str:
    assert proc.stdout is not None
    for _ in range(50):
        line = proc.stdout.readline()
        m = re.search(r"(http://127\.0\.0\.1:\d+)", line)
        if m:
            return m.group(1)
        if not line:
            break
    raise AssertionError("no URL printed")


def _interrupt(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()


@pytest.mark.parametrize("how", ["serve", "index-serve"])
def test_cli_allows_only_the_folders_it_was_given(tmp_path: Path, how: str) -> None:
    allowed, other = tmp_path / "allowed", tmp_path / "other"
    make_images(allowed / "a", 2)
    make_images(allowed / "b", 2, start=10)
    make_images(other, 2, start=20)
    db = str(tmp_path / "s.db")
    if how == "serve":
        proc = _cli("serve", "--db", db, "--port", "0", "--allow-root", str(allowed))
    else:
        proc = _cli("index", str(allowed), "--db", db, "--no-embed", "--serve", "--port", "0")
    try:
        url = _url_from(proc)
        wait_until(lambda: httpx.get(f"{url}/api/datasets").status_code == 200, 30)

        def post(folder: Path) -> httpx.Response:
            body = {"name": "x", "images_path": str(folder), "embed": False}
            return httpx.post(f"{url}/api/datasets", json=body, timeout=30)

        assert post(allowed / "b").status_code == 202
        for folder in (other, tmp_path, Path("/")):
            r = post(folder)
            assert r.status_code == 403 and r.json()["error"] == "ForbiddenError", r.text
    finally:
        _interrupt(proc)
