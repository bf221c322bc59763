"""Phases 1 and 2 and the COCO ingest, measured beside plain-Python and Pillow baselines.

    python benches/bench_scan.py [--files 100000] [--big 1000000] [--coco-boxes 700000]
                                 [--no-cold] [--repeat 3]

Generates its data under bench-data/ (or $FASTINDEX_BENCH_DATA) on first use, runs every
measurement in a fresh subprocess and prints a table. Peak RSS is the measuring process's own
VmHWM, counted from the start of the timed work (not ru_maxrss, which a forked child inherits
from its parent). fastindex is timed through `Dataset.add_images_from_path` with its defaults
but `embed=False`: phase 1 is the call itself, phase 2 the background work after it returns,
until `job.wait()`. The plain-Python baseline writes a samples table like fastindex's, into an
SQLite store set up like fastindex's (WAL, synchronous=NORMAL), created before its timer.
Cold-cache rows need root (they write /proc/sys/vm/drop_caches) and are skipped otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import datagen


def drop_caches() -> bool:
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def warm(root: Path) -> None:
    for dirpath, _, names in os.walk(root):
        for n in names:
            with open(os.path.join(dirpath, n), "rb") as f:
                f.read(65536)


def list_files(root: Path) -> list[str]:
    out = []
    for dirpath, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        out.extend(os.path.join(dirpath, n) for n in names if not n.startswith("."))
    return out


def peak_rss_mb() -> float:
    """This process's own peak RSS (VmHWM), in MiB. Not `ru_maxrss`: a child started by fork
    and exec inherits the parent's peak in it (every row read 805 MB once the data was
    generated in the same run)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak() -> None:
    """Start the peak afresh from the current RSS (Linux: 5 into clear_refs), so that a
    row's peak is the measured work's and not the setup's."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # then the peak counts from exec (setup included)


def python_store(db: str) -> sqlite3.Connection:
    """The baseline's store, set up like fastindex's (open.rs: WAL, synchronous=NORMAL,
    temp_store=MEMORY, 64 MiB cache) with the same kind of samples table, before any timer."""
    con = sqlite3.connect(db, isolation_level=None)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("PRAGMA synchronous=NORMAL")
    con.execute("PRAGMA temp_store=MEMORY")
    con.execute("PRAGMA cache_size=-65536")
    con.execute(
        "CREATE TABLE samples (id INTEGER PRIMARY KEY, dataset_id INTEGER NOT NULL,"
        " root_id INTEGER NOT NULL, path TEXT NOT NULL, size_bytes INTEGER, mtime_ns INTEGER,"
        " status TEXT NOT NULL DEFAULT 'pending', UNIQUE (root_id, path))"
    )
    con.execute("CREATE INDEX samples_by_dataset ON samples (dataset_id, id)")
    return con


def one(kind: str, root: str, extra: str, cold: bool) -> dict[str, float]:
    """Run one measurement in this (fresh) process. fastindex is timed through its public
    calls with their defaults but `embed=False` (the default would load a CLIP model and
    start phase 3 in the background, which neither baseline does)."""
    import fastindex

    tmp = tempfile.mkdtemp(prefix="fastindex-bench-")
    db = os.path.join(tmp, "b.db")
    rows = 0
    if kind in ("pillow", "pillow32") and not cold:
        warm(Path(root))
    if kind in ("scan", "probe"):
        # Phase 1 is the call (it returns once every file has its row); phase 2 runs in the
        # background from then on and is timed until the job is done.
        ds = fastindex.Dataset.create("b", db=db)
        if kind == "probe" and not cold:
            warm(Path(root))
        if cold:
            drop_caches()
        reset_peak()
        t = time.perf_counter()
        job = ds.add_images_from_path(root, embed=False)
        if kind == "scan":
            dt = time.perf_counter() - t
            rss = peak_rss_mb()
            rows = job.summary["added"]
            job.cancel()
            return {"seconds": dt, "rows": rows, "rss_mb": rss}
        t = time.perf_counter()  # phase 2 alone: from the return of phase 1
        reset_peak()
        job.wait()
        rows = job.progress()["total"]
    elif kind == "python-scan":
        con = python_store(db)
        if cold:
            drop_caches()
        reset_peak()
        t = time.perf_counter()
        exts = tuple("." + e for e in fastindex.IMAGE_EXTENSIONS)
        batch = []
        for dirpath, dirs, names in os.walk(root):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            for n in names:
                if n.lower().endswith(exts) and not n.startswith("."):
                    full = os.path.join(dirpath, n)
                    st = os.stat(full)
                    rel = os.path.relpath(full, root)
                    batch.append((1, 1, rel, st.st_size, st.st_mtime_ns))
        con.execute("BEGIN")
        con.executemany(
            "INSERT OR IGNORE INTO samples (dataset_id, root_id, path, size_bytes, mtime_ns)"
            " VALUES (?, ?, ?, ?, ?)",
            batch,
        )
        con.execute("COMMIT")
        rows = len(batch)
    elif kind in ("pillow", "pillow32"):
        from concurrent.futures import ThreadPoolExecutor

        from PIL import Image

        files = list_files(Path(root))
        if cold:
            drop_caches()

        def size(p: str) -> tuple[int, int]:
            with Image.open(p) as im:
                return im.size

        reset_peak()
        t = time.perf_counter()
        if kind == "pillow":
            rows = len([size(p) for p in files])
        else:
            with ThreadPoolExecutor(32) as ex:
                rows = len(list(ex.map(size, files, chunksize=64)))
    elif kind == "coco":
        ds = fastindex.Dataset.create("b", db=db)
        if cold:
            drop_caches()
        reset_peak()
        t = time.perf_counter()
        job = ds.add_samples_from_coco(annotations_json=extra, images_path=root, embed=False)
        job.wait()
        rows = job.progress()["total"]
    else:
        raise SystemExit(f"unknown kind {kind}")
    dt = time.perf_counter() - t
    return {"seconds": dt, "rows": rows, "rss_mb": peak_rss_mb()}


def run(
    kind: str, root: Path, extra: str = "", cold: bool = False, repeat: int = 1
) -> dict[str, float]:
    best: dict[str, float] | None = None
    for _ in range(repeat):
        out = subprocess.run(
            [sys.executable, __file__, "--one", kind, str(root), extra, "cold" if cold else "warm"],
            check=True,
            capture_output=True,
            text=True,
        )
        r = json.loads(out.stdout.strip().splitlines()[-1])
        if best is None or r["seconds"] < best["seconds"]:
            best = r
    assert best is not None
    return best


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--files", type=int, default=100_000, help="mixed JPEG/PNG files for phase 2")
    ap.add_argument("--small", type=int, default=10_000, help="files for the phase-1 timing")
    ap.add_argument("--big", type=int, default=1_000_000, help="files for the large walk (0: skip)")
    ap.add_argument(
        "--coco-boxes", type=int, default=700_000, help="boxes in the COCO file (0: skip)"
    )
    ap.add_argument("--no-cold", action="store_true", help="skip the cold-cache rows")
    ap.add_argument("--repeat", type=int, default=3, help="runs per warm row (best is kept)")
    ap.add_argument("--one", nargs=4, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        kind, root, extra, state = a.one
        print(json.dumps(one(kind, root, extra, state == "cold")))
        return

    base = datagen.data_root()
    t = time.perf_counter()
    small = base / f"mixed_{a.small}"
    datagen.make_mixed(small, a.small, seed=1)
    mixed = base / f"mixed_{a.files}"
    images = datagen.make_mixed(mixed, a.files)
    if a.big:
        datagen.make_tiny(base / f"tiny_{a.big}", a.big)
    coco = base / f"coco_{a.files}_{a.coco_boxes}.json"
    if a.coco_boxes:
        datagen.make_coco(coco, images, a.coco_boxes)
    print(f"data ready in {time.perf_counter() - t:.1f} s under {base}", file=sys.stderr)
    can_drop = not a.no_cold and drop_caches()

    rows: list[tuple[str, str, dict[str, float]]] = []

    def add(what: str, who: str, r: dict[str, float]) -> None:
        rows.append((what, who, r))
        print(f"  {what:<34} {who:<22} {r['seconds']:8.3f} s", file=sys.stderr)

    add(f"phase 1 scan, {a.small:,} files", "fastindex", run("scan", small, repeat=a.repeat))
    add(
        f"phase 1 scan, {a.small:,} files",
        "os.walk+stat+sqlite3",
        run("python-scan", small, repeat=a.repeat),
    )
    if a.big:
        big = base / f"tiny_{a.big}"
        label = f"phase 1 scan, {a.big:,} files"
        add(label, "fastindex", run("scan", big, repeat=2))
        add(label, "os.walk+stat+sqlite3", run("python-scan", big, repeat=2))
        if can_drop:
            label = f"phase 1 scan, {a.big:,}, cold cache"
            add(label, "fastindex", run("scan", big, cold=True))
            add(label, "os.walk+stat+sqlite3", run("python-scan", big, cold=True))
    add(f"phase 2 probe warm, {a.files:,}", "fastindex", run("probe", mixed, repeat=a.repeat))
    add(f"phase 2 probe warm, {a.files:,}", "Pillow .size", run("pillow", mixed, repeat=1))
    if can_drop:
        add(f"phase 2 probe cold, {a.files:,}", "fastindex", run("probe", mixed, cold=True))
        add(f"phase 2 probe cold, {a.files:,}", "Pillow .size", run("pillow", mixed, cold=True))
        add(
            f"phase 2 probe cold, {a.files:,}",
            "Pillow .size, 32 threads",
            run("pillow32", mixed, cold=True),
        )
    if a.coco_boxes:
        label = f"COCO {a.files // 1000}k img/{a.coco_boxes // 1000}k box, ph 1+2"
        add(label, "fastindex", run("coco", mixed, str(coco), repeat=a.repeat))

    print()
    print(f"machine: {os.cpu_count()} cores; python {sys.version.split()[0]}")
    print(
        f"| {'what':<40} | {'who':<24} | {'seconds':>8} | {'files/s':>10} | {'peak RSS MB':>11} |"
    )
    print(f"|{'-' * 42}|{'-' * 26}|{'-' * 10}|{'-' * 12}|{'-' * 13}|")
    for what, who, r in rows:
        rate = r["rows"] / r["seconds"] if r["seconds"] else float("nan")
        secs, rss = r["seconds"], r["rss_mb"]
        print(f"| {what:<40} | {who:<24} | {secs:8.3f} | {rate:10,.0f} | {rss:11.0f} |")


if __name__ == "__main__":
    main()
