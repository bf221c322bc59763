"""The page's filter bar in headless Chromium against a real server: facet counts appear and
grow while indexing runs, and choosing a format, a category or a size narrows the gallery to
what the API says."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import fastindex
import httpx
import pytest
from fastindex.server import start_server
from playwright.sync_api import Page, expect
from server_support import TIMEOUT_MS, make_coco, make_images, probe_held, wait_until

pytestmark = pytest.mark.browser


def _gallery_ids(page: Page) -> list[int]:
    ids: list[int] = page.eval_on_selector_all(
        "#gallery [data-id]", "els => els.map(e => Number(e.dataset.id))"
    )
    return ids


def test_filter_bar_counts_update_live_and_filter_the_gallery(page: Page, tmp_path: Path) -> None:
    db = str(tmp_path / "s.db")
    rows = make_images(tmp_path / "coco", 30, broken=2)
    ann = make_coco(tmp_path / "instances.json", rows)
    with start_server(db, port=0, allowed_roots=[tmp_path]) as server:
        ds = fastindex.Dataset.create("pets", db=db)
        # Phase 2 held back: the page opens before any format is known.
        with probe_held(db, ds.id) as release:
            ds2 = fastindex.Dataset.load("pets", db=db, resume=False)
            # The COCO ingest reads headers in its pass; a plain folder leaves them to phase 2.
            make_images(tmp_path / "more", 12, start=500)
            ds2.add_images_from_path(tmp_path / "more", embed=False)
            page.goto(f"{server.url}/?dataset={ds.id}&page_size=100")
            expect(page.locator("#facets [data-facet=format]")).to_contain_text(
                "none yet", timeout=TIMEOUT_MS
            )
            expect(page.locator('#filters .chip[data-filter="pending"] .count')).to_have_text(
                "12", timeout=TIMEOUT_MS
            )
            release()
            # Counts arrive while the page stays open (no reload).
            expect(
                page.locator('#facets [data-facet=format] [data-facet-value="JPEG"] .count')
            ).to_have_text("9", timeout=TIMEOUT_MS)
            expect(
                page.locator('#facets [data-facet=format] [data-facet-value="PNG"] .count')
            ).to_have_text("3", timeout=TIMEOUT_MS)
            ds2.add_samples_from_coco(
                annotations_json=ann, images_path=tmp_path / "coco", embed=False
            )
        wait_until(lambda: ds.get_loading_progress()["status"] == "complete")
        facets = httpx.get(f"{server.url}/api/datasets/{ds.id}/facets").json()
        png = str(facets["format"]["PNG"])
        expect(page.locator('#facets [data-facet-value="PNG"] .count')).to_have_text(
            png, timeout=TIMEOUT_MS
        )
        expect(
            page.locator('#facets [data-facet=category] [data-facet-value="dog"] .count')
        ).to_have_text(str(facets["category"]["dog"]), timeout=TIMEOUT_MS)
        expect(page.locator('#filters .chip[data-filter="failed"] .count')).to_have_text(
            "2", timeout=TIMEOUT_MS
        )

        def api_ids(**params: Any) -> list[int]:
            r = httpx.get(
                f"{server.url}/api/datasets/{ds.id}/samples", params={"limit": 100, **params}
            )
            return [s["id"] for s in r.json()["items"]]

        page.click('#facets [data-facet-value="PNG"]')
        want = api_ids(format="PNG")
        assert len(want) == int(png)
        page.wait_for_function(
            f"document.querySelectorAll('#gallery [data-id]').length === {len(want)}"
        )
        assert _gallery_ids(page) == want

        page.click('#facets [data-facet-value="PNG"]')  # off again
        page.click('#facets [data-facet-value="dog"]')
        page.fill('#facets input[name="min_width"]', "70")
        page.press('#facets input[name="min_width"]', "Enter")
        page.locator('#facets input[name="min_width"]').dispatch_event("change")
        want = api_ids(category="dog", min_width=70)
        assert 0 < len(want) < facets["category"]["dog"]
        page.wait_for_function(
            f"document.querySelectorAll('#gallery [data-id]').length === {len(want)}"
        )
        assert _gallery_ids(page) == want

        page.click("#facets [data-filter-clear]")
        page.wait_for_function("document.querySelectorAll('#gallery [data-id]').length === 44")
