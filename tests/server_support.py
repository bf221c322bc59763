"""Data and helpers shared by the server tests: small real images made with Pillow, a COCO
file for them, and a way to hold phase 2 back so a run can be watched mid-way."""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from fastindex import _core
from PIL import Image

#: Debian's chromium for the browser tests (never a downloaded browser); `FASTINDEX_CHROMIUM`
#: names another.
CHROMIUM = os.environ.get("FASTINDEX_CHROMIUM", "/usr/bin/chromium")
#: How long a browser test waits for anything on a page (ms).
TIMEOUT_MS = 20_000

#: The keys of every progress message (`progress()` over HTTP, WebSocket and SSE): the counts
#: per status, the dataset's state, the store's rates and the last error.
PROGRESS_COUNTS = {
    "dataset_id",
    "total",
    "pending",
    "indexed",
    "embedding",
    "ready",
    "failed",
    "missing",
    "status",
}
PROGRESS_RATES = {"phases", "rate", "eta_s", "rate_phase"}
PROGRESS_KEYS = PROGRESS_COUNTS | PROGRESS_RATES | {"error"}

COLORS = [(239, 68, 68), (59, 130, 246), (16, 185, 129), (168, 85, 247), (245, 158, 11)]


def make_images(root: Path, n: int, *, broken: int = 0, start: int = 0) -> list[dict[str, Any]]:
    """`n` JPEG/PNG files (a few with an EXIF orientation) and `broken` non-images under
    `root`; returns COCO image rows for all of them (declared size = the upright size)."""
    root.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    for i in range(start, start + n):
        w, h = 48 + (i * 7) % 64, 32 + (i * 5) % 48
        img = Image.new("RGB", (w, h), COLORS[i % len(COLORS)])
        for x in range(0, w, 8):  # a stripe so thumbnails are not flat
            img.paste((255, 255, 255), (x, h // 3, x + 4, h // 3 + 6))
        sub = root / f"part{i % 3}"
        sub.mkdir(exist_ok=True)
        if i % 4 == 3:
            name, upright = f"img{i:05d}.png", (w, h)
            img.save(sub / name)
        else:
            name = f"img{i:05d}.jpg"
            exif = Image.Exif()
            orientation = 6 if i % 10 == 5 else 1
            exif[0x0112] = orientation
            img.save(sub / name, quality=85, exif=exif.tobytes())
            upright = (h, w) if orientation == 6 else (w, h)
        rows.append(
            {
                "id": i + 1,
                "file_name": f"{sub.name}/{name}",
                "width": upright[0],
                "height": upright[1],
            }
        )
    for j in range(broken):
        (root / f"broken{j}.jpg").write_bytes(b"this is not a jpeg " * (j + 1))
        rows.append({"id": 100_000 + j, "file_name": f"broken{j}.jpg", "width": 10, "height": 10})
    return rows


def make_coco(path: Path, images: list[dict[str, Any]]) -> Path:
    """A COCO detection file with one or two boxes per image, in its declared frame."""
    anns: list[dict[str, Any]] = []
    for im in images:
        w, h = im["width"], im["height"]
        anns.append(
            {
                "id": len(anns) + 1,
                "image_id": im["id"],
                "category_id": 1 + im["id"] % 2,
                "bbox": [w * 0.1, h * 0.1, w * 0.5, h * 0.6],
                "area": w * h * 0.3,
                "iscrowd": 0,
            }
        )
        if im["id"] % 3 == 0:
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": im["id"],
                    "category_id": 1,
                    "bbox": [w * 0.55, h * 0.5, w * 0.4, h * 0.45],
                    "area": w * h * 0.18,
                    "iscrowd": 0,
                    "segmentation": [[w * 0.55, h * 0.5, w * 0.95, h * 0.5, w * 0.95, h * 0.95]],
                }
            )
    coco = {
        "images": images,
        "annotations": anns,
        "categories": [
            {"id": 1, "name": "cat", "supercategory": "animal"},
            {"id": 2, "name": "dog", "supercategory": "animal"},
        ],
    }
    path.write_text(json.dumps(coco))
    return path


@contextlib.contextmanager
def probe_held(db: str, dataset_id: int) -> Iterator[Callable[[], None]]:
    """Hold the dataset's phase-2 lease as another process would: rows stay `pending` until
    the block ends or `release()` (yielded) is called; the pipeline retries about every
    second."""
    store = _core.Store(db)
    # A pipeline that just finished may still hold it for a moment.
    wait_until(lambda: store.acquire_lease(dataset_id, "probe", "test-holder", 600.0), 10)
    held = [True]

    def release() -> None:
        if held[0]:
            store.release_lease(dataset_id, "probe", "test-holder")
            held[0] = False

    try:
        yield release
    finally:
        release()


def wait_until(cond: Callable[[], Any], timeout: float = 30.0, every: float = 0.02) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {cond}")
        time.sleep(every)
