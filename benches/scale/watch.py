"""Watch at scale: latency from a file landing in a watched folder to its row being `pending`
(visible) and `indexed`, on a dataset that already holds many rows; and a burst of files.

    python benches/scale/watch.py [--watch-rows 1000000] [--watch-files 200] [--watch-burst 10000]

The big tree is cheap: a few distinct tiny images hard-linked under many names (1M names take
no inodes, ~60 MB of folders). Phase 3 is off (embed=False): `indexed` is the end of the line.
One file at a time, two ways: written to a hidden temporary name then renamed in (what
`rsync`, browsers and careful tools do), and a plain copy (`shutil.copyfile`: create, write,
close). The clock starts just before the rename or the copy; a poller in the same process
looks the row up by path (an indexed glob, O(log n)) every 2 ms. The baseline is what it
takes without a watcher to pick one new file up: `add_images_from_path` on the whole tree
again (a sync).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

Row = tuple[str, str, str, str]

PER_DIR = 1000
LINKS_PER_SOURCE = 8 * 50_000
POLL_S = 0.002


def add_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("watch")
    g.add_argument("--watch-rows", type=int, default=1_000_000, help="rows already there")
    g.add_argument("--watch-files", type=int, default=200, help="files landed one at a time")
    g.add_argument("--watch-burst", type=int, default=10_000, help="files landed at once")
    g.add_argument("--watch-data", default=None, help="where the tree goes (kept for reruns)")


def _data_dir(args: argparse.Namespace) -> Path:
    if args.watch_data:
        return Path(args.watch_data)
    base = os.environ.get("FASTINDEX_BENCH_DATA", "bench-data")
    return Path(base) / "watch"


def _images() -> list[bytes]:
    import io

    from PIL import Image

    out = []
    for i, (w, h) in enumerate([(32, 24), (24, 32), (40, 30), (16, 16)]):
        for fmt in ("PNG", "JPEG"):
            buf = io.BytesIO()
            Image.new("RGB", (w, h), (40 * i, 90, 200 - 40 * i)).save(buf, fmt)
            out.append(buf.getvalue())
    return out


def make_tree(root: Path, n: int) -> Path:
    """`n` names under `root/tree/dNNNN/`, hard links to 8 tiny images (fresh copies every
    400,000 names); reused when there."""
    tree = root / "tree"
    marker = root / f".tree-{n}"
    if marker.exists():
        return tree
    shutil.rmtree(root, ignore_errors=True)
    sources = root / "sources"
    sources.mkdir(parents=True)
    images = _images()
    srcs: list[Path] = []
    for i in range(n):
        if i % LINKS_PER_SOURCE == 0:
            # A file takes at most 65,000 names (ext4): fresh copies for the next block.
            srcs = []
            for k, data in enumerate(images):
                p = sources / f"s{i // LINKS_PER_SOURCE}-{k}.{'png' if k % 2 == 0 else 'jpg'}"
                p.write_bytes(data)
                srcs.append(p)
        d, j = divmod(i, PER_DIR)
        folder = tree / f"d{d:04d}"
        if j == 0:
            folder.mkdir(parents=True)
        src = srcs[j % len(srcs)]
        os.link(src, folder / f"img{j:04d}{src.suffix}")
    marker.touch()
    return tree


def _pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def _ms(xs: list[float]) -> str:
    return f"{_pct(xs, 0.5) * 1000:.0f} / {_pct(xs, 0.99) * 1000:.0f} ms"


def _land_one(ds: Any, rel: str, land: Any) -> tuple[float, float]:
    """Seconds from `land()` to the row being visible and to it being `indexed`."""
    visible = None
    t0 = time.perf_counter()
    land()
    while True:
        rows = ds.samples(path_glob=rel, limit=1)
        now = time.perf_counter()
        if rows:
            if visible is None:
                visible = now - t0
            if rows[0].status == "indexed":
                return visible, now - t0
            if rows[0].status == "failed":
                raise RuntimeError(f"{rel}: {rows[0].error}")
        if now - t0 > 30:
            raise RuntimeError(f"{rel}: not indexed after 30 s")
        time.sleep(POLL_S)


def _wait(cond: Any, what: str, timeout: float = 600) -> None:
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise RuntimeError(f"gave up waiting for {what}")
        time.sleep(0.01)


def run(args: argparse.Namespace) -> list[Row]:
    import fastindex

    n, files, burst = args.watch_rows, args.watch_files, args.watch_burst
    root = _data_dir(args)
    t = time.perf_counter()
    tree = make_tree(root, n)
    made = time.perf_counter() - t
    png, jpg = _images()[0], _images()[1]
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        ds = fastindex.Dataset.create("watch-bench", db=os.path.join(tmp, "w.db"))
        for sub in ("incoming", "burst"):
            shutil.rmtree(tree / sub, ignore_errors=True)
        t = time.perf_counter()
        ds.add_images_from_path(tree, embed=False)
        assert ds.wait(3600)
        indexed_s = time.perf_counter() - t
        rows.append(
            (
                f"tree: {n:,} rows (hard links)",
                f"{indexed_s:.1f} s",
                "",
                f"phases 1+2; made in {made:.0f} s",
            )
        )

        (tree / "incoming").mkdir()
        (tree / "burst").mkdir()
        t = time.perf_counter()
        w = ds.watch(tree, embed=False)
        placed = time.perf_counter() - t
        _wait(lambda: w.stats()["full_syncs"] >= 1, "the first sync")
        caught_up = time.perf_counter() - t
        rows.append(
            (
                "watch start: watches placed / first sync",
                f"{placed:.1f} s / {caught_up:.1f} s",
                "",
                f"{n // PER_DIR + 3:,} folders",
            )
        )

        src = Path(tmp) / "src.jpg"
        src.write_bytes(jpg)
        renamed: list[tuple[float, float]] = []
        copied: list[tuple[float, float]] = []
        for i in range(files):
            if i % 2 == 0:
                tmpname = tree / "incoming" / f".part-{i}"
                tmpname.write_bytes(png)
                rel = f"incoming/r{i:04d}.png"
                renamed.append(_land_one(ds, rel, partial(os.rename, tmpname, tree / rel)))
            else:
                rel = f"incoming/c{i:04d}.jpg"
                copied.append(_land_one(ds, rel, partial(shutil.copyfile, src, tree / rel)))
        goal = "p99 < 1 s to indexed"
        for name, got in (("temp name + rename", renamed), ("plain copy", copied)):
            vis, idx = [v for v, _ in got], [x for _, x in got]
            rows.append((f"{name} -> visible, p50 / p99", _ms(vis), "", f"{len(got)} files"))
            rows.append((f"{name} -> indexed, p50 / p99", _ms(idx), goal, f"{len(got)} files"))

        # The baseline: no watcher, a sync of the whole tree picks the new file up.
        w.stop()
        (tree / "incoming" / "baseline.png").write_bytes(png)
        t = time.perf_counter()
        ds.add_images_from_path(tree, embed=False)
        assert ds.wait(600)
        base_s = time.perf_counter() - t
        rows.append(
            ("baseline: no watch, re-index tree -> indexed", f"{base_s:.2f} s", "", "1 new file")
        )
        w = ds.watch(tree, embed=False)
        _wait(lambda: w.stats()["full_syncs"] >= 1, "the first sync")

        before = w.stats()
        total0 = ds.get_loading_progress()["total"]
        t = time.perf_counter()
        for i in range(burst):
            (tree / "burst" / f"b{i:05d}.png").write_bytes(png)
        written = time.perf_counter() - t
        _wait(lambda: ds.get_loading_progress()["total"] == total0 + burst, "the burst's rows")
        visible = time.perf_counter() - t
        _wait(lambda: ds.get_loading_progress()["status"] == "complete", "the burst indexed")
        done = time.perf_counter() - t
        after = w.stats()
        w.stop()
        batches = after["batches"] - before["batches"]
        rows.append(
            (
                f"burst of {burst:,}: written / all visible / all indexed",
                f"{written:.2f} / {visible:.2f} / {done:.2f} s",
                "batched",
                f"{batches} transactions, {after['full_syncs'] - before['full_syncs']} full syncs",
            )
        )
        ds.delete()
    shutil.rmtree(tree / "incoming", ignore_errors=True)
    shutil.rmtree(tree / "burst", ignore_errors=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_args(parser)
    args = parser.parse_args()
    rows = run(args)
    header = ("measure", "value", "goal", "note")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
    for row in [header, tuple("-" * w for w in widths), *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    print(f"\n{os.uname().nodename}, load {os.getloadavg()[0]:.2f}", file=sys.stderr)


if __name__ == "__main__":
    main()
