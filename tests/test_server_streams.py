"""Progress streams, watched from the start of a real indexing run to its end: WebSocket
(through the test client and a real server), Server-Sent Events, and the hub behind both."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fastindex
import httpx
import pytest
from fastapi.testclient import TestClient
from fastindex.server import ServerHandle, create_app, start_server
from fastindex.server.streams import ProgressHub
from server_support import PROGRESS_KEYS, make_images, probe_held, wait_until
from starlette.testclient import WebSocketDenialResponse
from starlette.websockets import WebSocketDisconnect
from websockets.exceptions import ConnectionClosed
from websockets.sync import client as ws_client


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    app = create_app(str(tmp_path / "s.db"), allowed_hosts=["testserver"], allowed_roots=[tmp_path])
    with TestClient(app) as c:
        yield c
        app.state.fastindex.close()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerHandle]:
    with start_server(str(tmp_path / "s.db"), port=0, allowed_roots=[tmp_path]) as s:
        yield s


def _post(base: Any, name: str, folder: Path) -> dict[str, Any]:
    r = base.post("/api/datasets", json={"name": name, "images_path": str(folder), "embed": False})
    assert r.status_code == 202, r.text
    out: dict[str, Any] = r.json()
    return out


def _check_run(messages: list[dict[str, Any]], n: int) -> None:
    """From the first message (all pending) to the last (complete), counts only move on."""
    assert messages[0]["status"] == "in_progress" and messages[0]["pending"] == n
    assert messages[-1]["status"] == "complete"
    assert messages[-1]["indexed"] + messages[-1]["failed"] == n
    assert all(m["status"] == "in_progress" for m in messages[:-1])
    pending = [m["pending"] for m in messages]
    assert pending == sorted(pending, reverse=True)
    for m in messages:
        assert set(m) == PROGRESS_KEYS
        # the store's rates ride along: phase 2's rows done, and a rate only while it runs
        probe = m["phases"]["probe"]
        assert (probe["done"], probe["total"]) == (m["total"] - m["pending"], m["total"])
        if m["status"] == "complete":
            assert probe["rate"] is None and m["rate"] is None


def test_websocket_from_start_to_complete(client: TestClient, tmp_path: Path) -> None:
    make_images(tmp_path / "imgs", 40, broken=2)
    ds = fastindex.Dataset.create("d", db=str(tmp_path / "s.db"))
    with probe_held(str(tmp_path / "s.db"), ds.id) as release:
        _post(client, "d", tmp_path / "imgs")
        with client.websocket_connect(f"/ws/progress/{ds.id}") as ws:
            first = ws.receive_json()
            while first["total"] < 42:  # phase 1 is still committing rows
                assert first["status"] == "in_progress"
                first = ws.receive_json()
            # Nothing changes while phase 2 waits, and the socket still speaks (heartbeat).
            again = ws.receive_json()
            assert again == first and first["status"] == "in_progress"
            release()
            messages = [first]
            while messages[-1]["status"] != "complete":
                messages.append(ws.receive_json())
            with pytest.raises(WebSocketDisconnect) as closed:
                ws.receive_json()
            assert closed.value.code == 1000
    _check_run(messages, 42)
    assert messages[-1]["failed"] == 2


def test_websocket_of_a_complete_dataset_says_so_once(client: TestClient, tmp_path: Path) -> None:
    make_images(tmp_path / "imgs", 3)
    did = _post(client, "d", tmp_path / "imgs")["dataset_id"]
    wait_until(lambda: client.get(f"/api/progress/{did}").json()["status"] == "complete")
    with client.websocket_connect(f"/ws/progress/{did}") as ws:
        assert ws.receive_json()["status"] == "complete"
        with pytest.raises(WebSocketDisconnect):
            ws.receive_json()


def test_websocket_refusals(client: TestClient, tmp_path: Path) -> None:
    """Refused handshakes answer with an HTTP status and the JSON error, as routes do."""
    with pytest.raises(WebSocketDenialResponse) as e, client.websocket_connect("/ws/progress/77"):
        pass
    assert e.value.status_code == 404
    assert json.loads(e.value.content)["message"] == "no dataset with id 77"
    fastindex.Dataset.create("d", db=str(tmp_path / "s.db"))
    with (
        pytest.raises(WebSocketDenialResponse) as e,
        client.websocket_connect("/ws/progress/1", headers={"origin": "https://evil.example"}),
    ):
        pass
    assert e.value.status_code == 403
    assert json.loads(e.value.content)["error"] == "OriginNotAllowed"
    with (
        pytest.raises(WebSocketDenialResponse) as e,
        client.websocket_connect(f"/ws/progress/{2**63}"),
    ):
        pass
    assert e.value.status_code == 422
    with client.websocket_connect("/ws/progress/1", headers={"origin": "http://testserver"}) as ws:
        assert ws.receive_json()["status"] == "complete"


def test_sse_from_start_to_complete(server: ServerHandle, tmp_path: Path) -> None:
    make_images(tmp_path / "imgs", 25, broken=1)
    db = str(tmp_path / "s.db")
    ds = fastindex.Dataset.create("d", db=db)
    messages: list[dict[str, Any]] = []
    with probe_held(db, ds.id) as release, httpx.Client(base_url=server.url, timeout=30) as c:
        _post(c, "d", tmp_path / "imgs")
        with c.stream("GET", f"/sse/progress/{ds.id}") as r:
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/event-stream")
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                m = json.loads(line[len("data: ") :])
                if m["total"] < 26:
                    continue  # phase 1 has not committed yet
                messages.append(m)
                if len(messages) == 1:
                    release()
        # The stream ended by itself after the last message.
    _check_run(messages, 26)


def test_sse_of_unknown_dataset_is_404(client: TestClient) -> None:
    r = client.get("/sse/progress/5")
    assert r.status_code == 404 and r.json()["error"] == "DatasetNotFoundError"


def test_real_server_websocket_and_stop(tmp_path: Path) -> None:
    db = str(tmp_path / "s.db")
    make_images(tmp_path / "imgs", 10)
    ds = fastindex.Dataset.create("d", db=db)
    server = start_server(db, port=0, allowed_roots=[tmp_path])
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    assert host == "127.0.0.1" and int(port) > 0
    with probe_held(db, ds.id), httpx.Client(base_url=server.url) as c:
        _post(c, "d", tmp_path / "imgs")
        with ws_client.connect(f"ws://{host}:{port}/ws/progress/{ds.id}", open_timeout=10) as ws:
            assert json.loads(ws.recv(timeout=10))["status"] == "in_progress"
            t0 = time.monotonic()
            server.stop()
            assert time.monotonic() - t0 < 8
            assert not server.running
            with pytest.raises(ConnectionClosed):
                while True:
                    ws.recv(timeout=5)
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{server.url}/api/datasets")


# -- the hub ---------------------------------------------------------------------------------------
def test_hub_reads_once_for_all_watchers_at_a_bounded_rate() -> None:
    reads = 0

    def read(dataset_id: int) -> dict[str, Any]:
        nonlocal reads
        reads += 1
        return {"dataset_id": dataset_id, "status": "in_progress", "n": reads}

    async def main() -> list[int]:
        hub = ProgressHub(read, interval=0.02, heartbeat=1.0)

        async def watch() -> int:
            got = 0
            async with hub.subscribe(1) as sub:
                async for _ in sub.messages():
                    got += 1
                    if got == 10:
                        break
            return got

        counts = await asyncio.gather(*(watch() for _ in range(50)))
        await asyncio.sleep(0.1)
        assert hub.watchers() == 0
        return list(counts)

    assert asyncio.run(main()) == [10] * 50
    assert reads < 30  # one read per tick for the 50 watchers, not 500


def test_hub_heartbeat_and_final_message() -> None:
    state = {"status": "in_progress"}

    def read(dataset_id: int) -> dict[str, Any]:
        return {"dataset_id": dataset_id, **state}

    async def main() -> list[str]:
        hub = ProgressHub(read, interval=0.01, heartbeat=0.05)
        got: list[str] = []
        async with hub.subscribe(3) as sub:
            async for text in sub.messages():
                got.append(text)
                if len(got) == 3:  # the same answer, again and again while work runs
                    state["status"] = "complete"
        return got

    got = asyncio.run(main())
    assert [json.loads(t)["status"] for t in got] == ["in_progress"] * 3 + ["complete"]


def test_hub_close_ends_streams() -> None:
    async def main() -> None:
        hub = ProgressHub(lambda i: {"status": "in_progress"}, interval=0.01)

        async def watch() -> None:
            async with hub.subscribe(1) as sub:
                async for _ in sub.messages():
                    pass

        task = asyncio.ensure_future(watch())
        await asyncio.sleep(0.05)
        hub.close()
        await asyncio.wait_for(task, 2)
        async with hub.subscribe(1) as sub:  # after close: ends at once
            assert [m async for m in sub.messages()] == []

    asyncio.run(main())


def test_port_in_use_is_a_clear_error(tmp_path: Path) -> None:
    import socket

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    try:
        port = taken.getsockname()[1]
        with pytest.raises(
            fastindex.InvalidArgumentError, match=f"cannot listen on 127.0.0.1:{port}"
        ):
            start_server(str(tmp_path / "s.db"), port=port)
    finally:
        taken.close()
