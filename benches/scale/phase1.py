"""Phase 1 at scale: the walk into pending rows, the re-index (sync) of the same tree unchanged
and after 0.1% of its files changed, were added or removed, and phase 2's peak memory.

The tree is `--phase1-files` real image files under nested folders (1,000 per folder), made
cheaply with HARD LINKS: a few hundred distinct tiny images (JPEG and PNG, a few hundred bytes
each), each linked under up to ~35,000 names (ext4 allows 65,000 links per inode). So 10M
files cost ~1 GB of directory blocks, not 10M inodes. The names share inodes: the walk still
lists and stats every name, but the probe (phase 2) reads the same few hundred files over and
over, from a warm page cache.

Every measure runs in a fresh process and reads its own VmHWM (/proc/self/status) at the
point measured: after `add_images_from_path(root, embed=False)` returns (phase 1 or the
sync), after `ds.wait()` (phase 2, in a process that did no phase 1). "Rows written" during a
re-index is counted by an audit trigger (AFTER INSERT/UPDATE/DELETE ON samples) that this
script adds to the store before the re-index and removes after: any write to a sample row
would leave a row in the audit table.

    python benches/bench_scale.py --only phase1 --phase1-files 2000000
    python benches/scale/phase1.py --phase1-files 100000 --phase1-baseline /work/main/python
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

PER_DIR = 1000
POOL = 300
DEFAULT_DATA = Path(os.environ.get("FASTINDEX_BENCH_DATA", "bench-data")) / "phase1"


def add_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("phase1")
    g.add_argument("--phase1-files", type=int, default=10_000_000, help="files in the tree")
    g.add_argument("--phase1-data", type=Path, default=DEFAULT_DATA, help="where the tree goes")
    g.add_argument(
        "--phase1-probe", action="store_true", help="also run phase 2 and report its peak RSS"
    )
    g.add_argument(
        "--phase1-baseline",
        type=Path,
        default=None,
        help="a python/ folder of another fastindex build: its phase 1 on the same tree too",
    )


# -- the tree -------------------------------------------------------------------------------------
def _pool(dest: Path) -> list[Path]:
    from PIL import Image

    dest.mkdir(parents=True, exist_ok=True)
    rng = random.Random(1)
    out = []
    for i in range(POOL):
        p = dest / f"p{i:03d}.{'png' if i % 3 == 0 else 'jpg'}"
        if not p.exists():
            w, h = rng.randrange(8, 64), rng.randrange(8, 64)
            im = Image.effect_noise((w, h), 20 + i % 50).convert("RGB")
            buf = io.BytesIO()
            im.save(buf, "PNG" if p.suffix == ".png" else "JPEG", quality=60)
            p.write_bytes(buf.getvalue())
        out.append(p)
    return out


BLOCK = 1_000_000


def rel_name(i: int, pool: list[Path]) -> str:
    """Name of file `i`: blocks of a million files under ten top folders each, 1,000 files
    per folder; block k is a copy (hard links, `cp -al`) of block 0."""
    k, j = divmod(i, BLOCK)
    d = j // PER_DIR
    return f"a{k * 10 + d // 100:04d}/b{d % 100:02d}/img_{j:08d}{pool[j % len(pool)].suffix}"


def make_tree(data: Path, n: int) -> Path:
    """`data/tree-N`: N hard links to the pool's images, 1,000 per folder (N up to a million,
    or a multiple of it)."""
    if n > BLOCK and n % BLOCK:
        raise SystemExit(f"--phase1-files: up to {BLOCK:,} or a multiple of it, got {n:,}")
    root = data / f"tree-{n}"
    marker = data / f"tree-{n}.complete"
    if marker.exists():
        return root
    pool = _pool(data / "pool")
    t0 = time.perf_counter()
    made: set[str] = set()
    for i in range(min(n, BLOCK)):
        rel = rel_name(i, pool)
        folder = rel.rsplit("/", 1)[0]
        if folder not in made:
            os.makedirs(root / folder, exist_ok=True)
            made.add(folder)
        with contextlib.suppress(FileExistsError):
            os.link(pool[i % len(pool)], root / rel)
    for k in range(1, n // BLOCK):
        for top in range(10):
            dest = root / f"a{k * 10 + top:04d}"
            if not dest.exists():
                tmp = dest.with_name(dest.name + ".part")
                shutil.rmtree(tmp, ignore_errors=True)
                subprocess.run(["cp", "-al", str(root / f"a{top:04d}"), str(tmp)], check=True)
                tmp.rename(dest)
        print(
            f"  tree: {(k + 1) * BLOCK:,} links, {time.perf_counter() - t0:.0f} s", file=sys.stderr
        )
    marker.write_text(str(n))
    return root


def change_tree(root: Path, n: int, fraction: float) -> dict[str, list[str]]:
    """Change, add and remove `fraction` of the files (a third each), spread over the tree."""
    pool = _pool(root.parent / "pool")
    k = max(3, int(n * fraction)) // 3
    rng = random.Random(7)
    picks = rng.sample(range(n), 2 * k)
    changed = [rel_name(i, pool) for i in picks[:k]]
    removed = [rel_name(i, pool) for i in picks[k:]]
    added = [f"a0000/b00/new_{j:06d}.jpg" for j in range(k)]
    for rel in changed:
        p = root / rel
        os.unlink(p)
        shutil.copyfile(pool[rng.randrange(len(pool))], p)  # a new inode: size and mtime differ
    for rel in removed:
        os.unlink(root / rel)
    for rel in added:
        os.link(pool[1], root / rel)
    return {"changed": changed, "removed": removed, "added": added}


def undo_changes(root: Path, n: int, done: dict[str, list[str]]) -> None:
    pool = _pool(root.parent / "pool")
    for rel in done["changed"] + done["removed"]:
        j = int(rel.rsplit("_", 1)[1].split(".")[0])  # the index in its block
        i = j
        p = root / rel
        if p.exists():
            os.unlink(p)
        os.link(pool[i % len(pool)], p)
    for rel in done["added"]:
        os.unlink(root / rel)


# -- measured children ----------------------------------------------------------------------------
CHILD = r"""
import json, os, sys, time
mode, db, root = sys.argv[1], sys.argv[2], sys.argv[3]
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
import fastindex
out = {}
if mode in ("index", "reindex"):
    ds = (fastindex.Dataset.create if mode == "index" else
          lambda n, db: fastindex.Dataset.load(n, db=db, resume=False))("bench", db=db)
    out["rss_before"] = hwm()
    t0, c0 = time.perf_counter(), os.times()
    job = ds.add_images_from_path(root, embed=False)
    out["seconds"] = time.perf_counter() - t0
    c1 = os.times()
    out["cpu"] = c1.user + c1.system - c0.user - c0.system
    out["io"] = dict(line.split(": ") for line in open("/proc/self/io").read().splitlines())
    out["hwm"] = hwm()
    out["summary"] = {k: v for k, v in job.summary.items() if k != "errors"}
    ds.cancel()
else:
    ds = fastindex.Dataset.load("bench", db=db, resume=False)
    out["rss_before"] = hwm()
    t0 = time.perf_counter()
    ds.resume()
    ds.wait()
    out["seconds"] = time.perf_counter() - t0
    out["hwm"] = hwm()
    out["progress"] = {k: v for k, v in ds.get_loading_progress().items() if isinstance(v, int)}
print(json.dumps(out))
"""


def child(mode: str, db: Path, root: Path, pythonpath: Path | None = None) -> dict[str, Any]:
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    r = subprocess.run(
        [sys.executable, "-c", CHILD, mode, str(db), str(root)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if r.returncode != 0:
        raise RuntimeError(f"{mode} failed: {r.stderr[-2000:]}")
    return dict(json.loads(r.stdout.strip().splitlines()[-1]))


AUDIT = """
CREATE TABLE IF NOT EXISTS bench_audit (op TEXT);
CREATE TRIGGER IF NOT EXISTS bench_audit_i AFTER INSERT ON samples BEGIN
    INSERT INTO bench_audit VALUES ('insert'); END;
CREATE TRIGGER IF NOT EXISTS bench_audit_u AFTER UPDATE ON samples BEGIN
    INSERT INTO bench_audit VALUES ('update'); END;
CREATE TRIGGER IF NOT EXISTS bench_audit_d AFTER DELETE ON samples BEGIN
    INSERT INTO bench_audit VALUES ('delete'); END;
"""


def audited(db: Path, fn: Any) -> tuple[Any, dict[str, int]]:
    """Run `fn()` with the audit triggers in the store; returns its result and the writes."""
    with sqlite3.connect(db) as c:
        c.executescript(AUDIT)
    try:
        result = fn()
    finally:
        with sqlite3.connect(db) as c:
            rows = dict(c.execute("SELECT op, COUNT(*) FROM bench_audit GROUP BY op").fetchall())
            c.executescript(
                "DROP TRIGGER bench_audit_i; DROP TRIGGER bench_audit_u; "
                "DROP TRIGGER bench_audit_d; DROP TABLE bench_audit;"
            )
    return result, rows


def mb(b: int) -> str:
    return f"{b / 1e6:,.0f} MB"


def run(args: argparse.Namespace) -> list[tuple[str, str, str, str]]:
    n = int(args.phase1_files)
    data = Path(args.phase1_data)
    data.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    root = make_tree(data, n)
    gen_s = time.perf_counter() - t0
    db = data / f"phase1-{n}.db"
    rows: list[tuple[str, str, str, str]] = []
    tag = f"{n:,} files"
    load = os.getloadavg()

    def fresh() -> None:
        for suffix in ("", "-wal", "-shm"):
            Path(f"{db}{suffix}").unlink(missing_ok=True)

    if args.phase1_baseline is not None:
        fresh()
        b = child("index", db, root, args.phase1_baseline)
        rows.append(
            (
                f"phase 1 (baseline build), {tag}",
                f"{b['seconds']:.1f} s, {mb(b['hwm'])}",
                "",
                f"peak RSS (VmHWM); {args.phase1_baseline}",
            )
        )
    fresh()
    p1 = child("index", db, root)
    rows.append(
        (
            f"phase 1, {tag}",
            f"{p1['seconds']:.1f} s ({n / p1['seconds']:,.0f}/s)",
            "",
            f"add_images_from_path(embed=False); tree made in {gen_s:.0f} s (0 if reused)",
        )
    )
    rows.append(
        (
            f"phase 1 peak RSS, {tag}",
            mb(p1["hwm"]),
            "< 1 GB",
            f"VmHWM of the indexing process ({mb(p1['rss_before'])} before the call)",
        )
    )
    same, writes = audited(db, lambda: child("reindex", db, root))
    s = same["summary"]
    rows.append(
        (
            f"re-index unchanged, {tag}",
            f"{same['seconds']:.1f} s ({same['seconds'] / p1['seconds']:.2f}x phase 1)",
            "<= phase 1",
            f"sample rows written: {sum(writes.values())}; unchanged {s['unchanged']:,}, "
            f"peak {mb(same['hwm'])}",
        )
    )
    done = change_tree(root, n, 0.001)
    try:
        moved, writes = audited(db, lambda: child("reindex", db, root))
    finally:
        undo_changes(root, n, done)
    s = moved["summary"]
    rows.append(
        (
            f"re-index after 0.1% changed, {tag}",
            f"{moved['seconds']:.1f} s ({moved['seconds'] / same['seconds']:.2f}x unchanged)",
            "< 2x unchanged",
            f"added {s['added']:,}, changed {s['changed']:,}, removed {s['removed']:,}; "
            f"sample rows written {sum(writes.values()):,}; peak {mb(moved['hwm'])}",
        )
    )
    if args.phase1_probe:
        p2 = child("probe", db, root)
        rows.append(
            (
                f"phase 2 peak RSS, {tag}",
                mb(p2["hwm"]),
                "< 500 MB",
                f"VmHWM of a process that only probed ({p2['seconds']:.0f} s, "
                f"{p2['progress'].get('indexed', 0):,} indexed)",
            )
        )
    rows.append(
        ("phase 1 load", f"{load[0]:.1f} {load[1]:.1f} {load[2]:.1f}", "", "loadavg at start")
    )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_args(parser)
    rows = run(parser.parse_args())
    header = ("measure", "value", "goal", "note")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
    for row in [header, tuple("-" * w for w in widths), *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


if __name__ == "__main__":
    main()
