"""Search and "similar images" over HTTP, with a real (tiny, random-weight) CLIP model."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fastindex
import pytest
from fastapi.testclient import TestClient
from fastindex.server import create_app
from server_support import make_images, probe_held, wait_until

testing = pytest.importorskip("fastindex.testing")
pytest.importorskip("open_clip")


@pytest.fixture(scope="module")
def model() -> Any:
    return testing.tiny_model()


@pytest.fixture
def client(tmp_path: Path, model: Any) -> Iterator[TestClient]:
    app = create_app(
        str(tmp_path / "s.db"),
        embed_model=model,
        allowed_hosts=["testserver"],
        allowed_roots=[tmp_path],
    )
    with TestClient(app) as c:
        yield c
        app.state.fastindex.close()


def _progress(c: TestClient, did: int) -> dict[str, Any]:
    out: dict[str, Any] = c.get(f"/api/progress/{did}").json()
    return out


def test_search_and_similar_once_embeddings_exist(client: TestClient, tmp_path: Path) -> None:
    db = str(tmp_path / "s.db")
    make_images(tmp_path / "imgs", 12, broken=1)
    ds = fastindex.Dataset.create("d", db=db)
    with probe_held(db, ds.id):
        r = client.post(
            "/api/datasets",
            json={"name": "d", "images_path": str(tmp_path / "imgs"), "embed": True},
        )
        assert r.status_code == 202
        wait_until(lambda: _progress(client, ds.id)["pending"] == 13)
        early = client.get(f"/api/datasets/{ds.id}/search", params={"q": "red"})
        assert early.status_code == 409 and "no embeddings yet" in early.json()["message"]
        assert client.get(f"/api/datasets/{ds.id}").json()["embeddings"] is True
    p = wait_until(lambda: (p := _progress(client, ds.id))["status"] == "complete" and p, 120)
    assert (p["ready"], p["failed"], p["error"]) == (12, 1, None)

    found = client.get(f"/api/datasets/{ds.id}/search", params={"q": "a red square", "k": 5})
    assert found.status_code == 200, found.text
    items = found.json()["items"]
    assert len(items) == 5 and all(s["status"] == "ready" and "root" not in s for s in items)
    scores = [s["score"] for s in items]
    assert scores == sorted(scores, reverse=True)

    first = items[0]["id"]
    like = client.get(f"/api/datasets/{ds.id}/similar/{first}", params={"k": 4}).json()["items"]
    assert like[0]["id"] == first and len(like) == 4

    failed = client.get(f"/api/datasets/{ds.id}/samples", params={"status": "failed"}).json()
    broken = failed["items"][0]["id"]
    r = client.get(f"/api/datasets/{ds.id}/similar/{broken}")
    assert r.status_code == 409 and "has no embedding" in r.json()["message"]
