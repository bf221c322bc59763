"""The page's rate and time left during a slow embed, in headless Chromium (Debian's, driven
by Python playwright) against a real server: they come from the store's record of commits,
so they never read 0/s or go blank between two batch commits, and a page opened mid-run
shows them at once."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import httpx
import pytest
from embed_helpers import slow_model
from fastindex.server import start_server
from playwright.sync_api import Browser, WebSocketRoute, expect
from server_support import make_images, wait_until

pytestmark = pytest.mark.browser

N = 16
ZERO = re.compile(r"^0([.,]0*)?/s")
NONE = "\u2013"  # what the page shows for no value
RATE = re.compile(r"^\d[\d.,]*/s · embed$")

# Every change of the progress card, as the user saw it.
RECORD = """
window.__seen = [];
document.addEventListener("DOMContentLoaded", () => {
  const text = (id) => document.getElementById(id).textContent;
  new MutationObserver(() =>
    window.__seen.push({
      ready: Number(text("n-ready").replace(/\\D/g, "")),
      state: text("run-status"),
      rate: text("rate"),
      eta: text("eta"),
    }),
  ).observe(document.getElementById("progress-card"), {
    subtree: true, childList: true, characterData: true,
  });
});
"""


def _progress(url: str, dataset_id: int) -> dict[str, Any]:
    out: dict[str, Any] = httpx.get(f"{url}/api/progress/{dataset_id}").json()
    return out


def test_rate_and_time_left_hold_through_a_slow_embed(browser: Browser, tmp_path: Path) -> None:
    pytest.importorskip("open_clip")
    db = str(tmp_path / "s.db")
    make_images(tmp_path / "imgs", N)
    model = slow_model(forward_s=1.5, batch_size=2)  # a commit every ~1.5 s
    errors: list[str] = []
    ctx = browser.new_context(viewport={"width": 1280, "height": 900})
    with start_server(db, port=0, embed_model=model, allowed_roots=[tmp_path]) as server:
        r = httpx.post(
            f"{server.url}/api/datasets",
            json={"name": "d", "images_path": str(tmp_path / "imgs"), "embed": True},
        )
        assert r.status_code == 202, r.text
        did = r.json()["dataset_id"]
        page = ctx.new_page()
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.add_init_script(RECORD)
        page.goto(f"{server.url}/?dataset={did}")
        expect(page.locator("#run-status")).to_have_text("indexing")

        # Two commits in: a page opened now, whose live feed never answers (no WebSocket
        # message, every progress poll refused), shows the rate and time left from the
        # dataset list it loads first.
        wait_until(lambda: _progress(server.url, did)["ready"] >= 4, timeout=60)
        late = ctx.new_page()
        late.on("pageerror", lambda e: errors.append(str(e)))
        late.route("**/api/progress/**", lambda route: route.abort())
        late.route_web_socket("**/ws/progress/**", lambda ws: _silent(ws))
        late.goto(f"{server.url}/?dataset={did}")
        expect(late.locator("#rate")).to_have_text(RATE)
        expect(late.locator("#eta")).not_to_have_text(NONE)
        assert late.locator("#run-status").text_content() == "indexing"
        late.close()

        expect(page.locator("#run-status")).to_have_text("complete", timeout=90_000)
        expect(page.locator("#n-ready")).to_have_text(str(N))
        seen: list[dict[str, Any]] = page.evaluate("window.__seen")
    ctx.close()
    assert errors == [], errors

    moving = [s for s in seen if 0 < s["ready"] < N and s["state"] == "indexing"]
    assert len({s["ready"] for s in moving}) >= 3, seen  # several commits were watched
    for s in moving:
        assert RATE.match(s["rate"]) and not ZERO.match(s["rate"]), s
        assert s["eta"] not in (NONE, "", "done"), s
    assert seen[-1]["eta"] == "done"


def _silent(ws: WebSocketRoute) -> None:
    """Accept the page's WebSocket and never send on it."""
