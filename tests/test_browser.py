"""The page, end to end, in headless Chromium (Debian's, driven by Python playwright) against a
real server on 127.0.0.1: the bar moves to complete, the gallery fills, polling takes over
when the WebSocket fails, search opens only once embeddings exist."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import fastindex
import httpx
import pytest
from fastindex.server import ServerHandle, start_server
from playwright.sync_api import Page, WebSocketRoute, expect
from server_support import make_coco, make_images, probe_held, wait_until

pytestmark = pytest.mark.browser

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"


def _post(server: ServerHandle, **body: Any) -> dict[str, Any]:
    r = httpx.post(f"{server.url}/api/datasets", json=body, timeout=30)
    assert r.status_code == 202, r.text
    out: dict[str, Any] = r.json()
    return out


def _progress(server: ServerHandle, dataset_id: int) -> dict[str, Any]:
    out: dict[str, Any] = httpx.get(f"{server.url}/api/progress/{dataset_id}").json()
    return out


def _complete(server: ServerHandle, dataset_id: int) -> dict[str, Any]:
    p: dict[str, Any] = wait_until(
        lambda: (p := _progress(server, dataset_id))["status"] == "complete" and p
    )
    return p


def test_bar_moves_to_complete_and_gallery_fills(page: Page, tmp_path: Path) -> None:
    db = str(tmp_path / "s.db")
    rows = make_images(tmp_path / "coco", 30, broken=2)
    ann = make_coco(tmp_path / "instances.json", rows)
    make_images(tmp_path / "more", 20, start=1000)
    with start_server(db, port=0, allowed_roots=[tmp_path]) as server:
        did = _post(
            server,
            name="holiday",
            images_path=str(tmp_path / "coco"),
            annotations_json=str(ann),
            embed=False,
        )["dataset_id"]
        _complete(server, did)
        with probe_held(db, did) as release:
            _post(server, name="holiday", images_path=str(tmp_path / "more"), embed=False)
            wait_until(lambda: _progress(server, did)["pending"] == 20)

            page.goto(f"{server.url}/?dataset={did}&page_size=24")
            expect(page.locator("#transport")).to_have_attribute("data-mode", "websocket")
            expect(page.locator("#run-status")).to_have_text("indexing")
            expect(page.locator("#n-total")).to_have_text("52")
            expect(page.locator("#n-pending")).to_have_text("20")
            before = int(page.locator("#bar").get_attribute("aria-valuenow") or "-1")
            assert 0 < before < 100
            # The first page: COCO images, upright thumbnails with their boxes drawn on them.
            tiles = page.locator("#gallery .tile")
            # A page is 24 tiles; on a slow machine the pager can come into view before the
            # thumbnails have their size, and the next page follows at once.
            page.wait_for_function("document.querySelectorAll('#gallery .tile').length >= 24")
            assert tiles.count() in (24, 48, 52)
            expect(page.locator("#gallery .tile[data-status=indexed] img").first).to_be_visible()
            page.wait_for_function(
                "[...document.querySelectorAll('#gallery .tile img')]"
                ".every(i => i.complete && i.naturalWidth > 0)"
            )
            assert page.locator("#gallery .tile svg rect").count() >= 24
            expect(page.locator("#search-input")).to_be_disabled()
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "page-mid-run.png"), full_page=True)

            # Scrolling on loads the next pages by key, each sample once; the last holds
            # the rows phase 2 has not reached.
            expect(page.locator("#page-range")).to_have_text(
                re.compile(r"^(24|48|52) shown of 52$")
            )
            for _ in range(2):  # two more pages at most
                n = tiles.count()
                if n >= 52:
                    break
                page.locator("#pager").scroll_into_view_if_needed()
                page.mouse.wheel(0, 4000)
                page.wait_for_function(f"document.querySelectorAll('#gallery .tile').length > {n}")
            expect(tiles).to_have_count(52)
            ids = [int(i) for i in tiles.evaluate_all("ts => ts.map(t => t.dataset.id)")]
            assert ids == sorted(set(ids)) and len(ids) == 52
            expect(page.locator("#load-more")).to_be_hidden()
            expect(page.locator("#gallery .tile[data-status=pending]").first).to_be_visible()
            page.screenshot(path=str(ARTIFACTS / "page-mid-run-pending.png"))
            release()

            expect(page.locator("#run-status")).to_have_text("complete")
        expect(page.locator("#bar")).to_have_attribute("aria-valuenow", "100")
        expect(page.locator("#n-indexed")).to_have_text("50")
        expect(page.locator("#n-pending")).to_have_text("0")
        expect(page.locator("#eta")).to_have_text("done")
        # The gallery filled in place: the pending tiles became thumbnails.
        expect(page.locator("#gallery .tile[data-status=pending]")).to_have_count(0)
        expect(page.locator("#gallery .tile[data-status=indexed] img")).to_have_count(50)
        # Failed files, with their reasons.
        expect(page.locator("#failed-card")).to_be_visible()
        expect(page.locator("#failed-list li")).to_have_count(2)
        expect(page.locator("#failed-list li .reason").first).to_contain_text("unsupported image")
        # One sample, larger, with its boxes and categories.
        page.click("#to-top")
        expect(page.locator("#gallery .tile").first).to_have_attribute("data-id", "1")
        page.locator("#gallery .tile[data-status=indexed] .frame").first.click()
        expect(page.locator("#sample-dialog")).to_be_visible()
        expect(page.locator("#sample-anns li").first).to_be_visible()
        assert page.locator("#sample-figure svg rect").count() >= 1
        expect(page.locator("#sample-similar")).to_be_disabled()
        page.screenshot(path=str(ARTIFACTS / "page-sample.png"))


@pytest.mark.parametrize("how", ["websocket-refused", "query-flag"])
def test_polling_takes_over_without_websocket(page: Page, tmp_path: Path, how: str) -> None:
    db = str(tmp_path / "s.db")
    make_images(tmp_path / "imgs", 12, broken=1)
    ds = fastindex.Dataset.create("d", db=db)
    opened: list[str] = []
    if how == "websocket-refused":

        def refuse(ws: WebSocketRoute) -> None:
            opened.append(ws.url)
            ws.close(code=1011, reason="blocked by the test")

        page.route_web_socket("**/ws/progress/**", refuse)
    query = "&transport=poll" if how == "query-flag" else ""
    with (
        start_server(db, port=0, allowed_roots=[tmp_path]) as server,
        probe_held(db, ds.id) as release,
    ):
        _post(server, name="d", images_path=str(tmp_path / "imgs"), embed=False)
        wait_until(lambda: _progress(server, ds.id)["pending"] == 13)
        page.goto(f"{server.url}/?dataset={ds.id}{query}")
        expect(page.locator("#transport")).to_have_attribute("data-mode", "polling")
        expect(page.locator("#transport-text")).to_have_text("live · polling")
        expect(page.locator("#n-pending")).to_have_text("13")
        release()
        expect(page.locator("#run-status")).to_have_text("complete")
        expect(page.locator("#n-indexed")).to_have_text("12")
        expect(page.locator("#gallery .tile[data-status=indexed]")).to_have_count(12)
    assert bool(opened) == (how == "websocket-refused")


def test_search_opens_only_once_embeddings_exist(page: Page, tmp_path: Path) -> None:
    testing = pytest.importorskip("fastindex.testing")
    pytest.importorskip("open_clip")
    db = str(tmp_path / "s.db")
    make_images(tmp_path / "imgs", 16)
    ds = fastindex.Dataset.create("d", db=db)
    model = testing.tiny_model()
    with (
        start_server(db, port=0, embed_model=model, allowed_roots=[tmp_path]) as server,
        probe_held(db, ds.id) as release,
    ):
        _post(server, name="d", images_path=str(tmp_path / "imgs"), embed=True)
        wait_until(lambda: _progress(server, ds.id)["pending"] == 16)
        page.goto(f"{server.url}/?dataset={ds.id}")
        expect(page.locator("#run-status")).to_have_text("indexing")
        expect(page.locator("#search-input")).to_be_disabled()
        expect(page.locator("#search-btn")).to_be_disabled()
        expect(page.locator("#search-hint")).to_contain_text("once embeddings are ready")
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "page-search-disabled.png"))
        expect(page.locator("#gallery .tile .similar").first).to_be_disabled()
        release()

        expect(page.locator("#run-status")).to_have_text("complete", timeout=60_000)
        expect(page.locator("#n-ready")).to_have_text("16")
        expect(page.locator("#search-input")).to_be_enabled()
        page.fill("#search-input", "a red square")
        page.click("#search-btn")
        expect(page.locator("#results-head")).to_be_visible()
        expect(page.locator("#results-title")).to_contain_text("a red square")
        expect(page.locator("#gallery .tile .score").first).to_be_visible()
        assert page.locator("#gallery .tile").count() == 16
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "page-search.png"))

        first = page.locator("#gallery .tile").first
        first_id = first.get_attribute("data-id")
        first.locator(".similar").click()
        expect(page.locator("#results-title")).to_contain_text("similar to")
        expect(page.locator("#gallery .tile").first).to_have_attribute("data-id", first_id or "")
        page.click("#results-clear")
        expect(page.locator("#results-head")).to_be_hidden()
        expect(page.locator("#gallery .tile .score")).to_have_count(0)
