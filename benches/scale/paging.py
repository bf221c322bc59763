"""Cost follows the work at 10M rows: adding 10 files, progress, and gallery pages by key.

A store that fastindex created gets `--paging-rows` rows (10M by default) inserted directly
with SQL (a finished dataset: realistic camera/day paths, 99.5% `ready` with probed sizes, 10%
PNG, 0.5% `failed` with a reason; counters filled as fastindex keeps them). Then, each in a
fresh process:

- adding 10 files to that dataset: the store work of phase 1 (`Store.scan` of a folder of 10
  files) and phase 2 (`Store.probe_pending`), in ms, several times; with `--paging-baseline
  DIR` (a `python/` folder of another build, e.g. main's) first with that build on the same
  store, then with this one (which migrates the store to its schema on open: timed too);
- `progress()` p99, from the store and over HTTP;
- a gallery page (`limit` 60, the page's default) p50/p99 over HTTP
  (`/api/datasets/{id}/samples?after_id=...&limit=60`, a real server on 127.0.0.1 in its own
  process) and through `Dataset.samples`, at the first page, the middle and the end, without a
  filter and with a status or format filter.

The store is generated once under `--paging-data` and copied for each run (the baseline's
schema is older). Run it under the shared lock: `flock /work/helpers/bigbench.lock python3
benches/bench_scale.py --only paging`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

Row = tuple[str, str, str, str]

PAGE = 60
#: Paths like the files of a camera fleet: one folder per camera and day.
_GEN = r"""
import json, sqlite3, sys, time
db, n, dataset_id, job_id, root_id = sys.argv[1], int(sys.argv[2]), *map(int, sys.argv[3:6])
con = sqlite3.connect(db, isolation_level=None)
con.execute("PRAGMA journal_mode = DELETE")
con.execute("PRAGMA synchronous = OFF")
con.execute("PRAGMA cache_size = -1048576")
# The format counter's trigger costs an upsert a row: off while generating, counted after.
(trigger,) = con.execute(
    "SELECT sql FROM sqlite_master WHERE type = 'trigger' AND name = 'format_count_insert'"
).fetchone()
con.execute("DROP TRIGGER format_count_insert")
step = 1_000_000
t0 = time.time()
for lo in range(0, n, step):
    hi = min(n, lo + step)
    con.execute("BEGIN")
    con.execute(
        '''WITH RECURSIVE k(i) AS (SELECT ?1 UNION ALL SELECT i + 1 FROM k WHERE i < ?2)
        INSERT INTO samples (dataset_id, job_id, root_id, path, size_bytes, mtime_ns, status,
                             width, height, format, orientation, error)
        SELECT ?3, ?4, ?5,
            printf('cam%02d/2026-%04d/IMG_%08d.%s', i / 625000, i / 2000, i,
                   CASE WHEN i % 10 = 0 THEN 'png' ELSE 'jpg' END),
            200000 + i % 50000, 1780000000000000000 + i * 1000,
            CASE WHEN i % 200 = 7 THEN 'failed' ELSE 'ready' END,
            CASE WHEN i % 200 = 7 THEN NULL WHEN i % 3 = 0 THEN 1920 ELSE 4032 END,
            CASE WHEN i % 200 = 7 THEN NULL WHEN i % 3 = 0 THEN 1080 ELSE 3024 END,
            CASE WHEN i % 200 = 7 THEN NULL WHEN i % 10 = 0 THEN 'PNG' ELSE 'JPEG' END,
            CASE WHEN i % 200 = 7 THEN NULL ELSE 1 END,
            CASE WHEN i % 200 = 7 THEN 'not a JPEG file: starts with 0x00 0x00' END
        FROM k''',
        (lo + 1, hi, dataset_id, job_id, root_id),
    )
    con.execute("COMMIT")
    print(f"  {hi:,} rows, {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
con.execute("BEGIN")
con.execute(trigger)
for status, n_st in con.execute(
    "SELECT status, COUNT(*) FROM samples WHERE dataset_id = ? GROUP BY status", (dataset_id,)
).fetchall():
    con.execute(
        "INSERT OR REPLACE INTO counts (dataset_id, job_id, status, n) VALUES (?, ?, ?, ?)",
        (dataset_id, job_id, status, n_st),
    )
con.execute("DELETE FROM format_counts WHERE dataset_id = ?", (dataset_id,))
con.execute(
    "INSERT INTO format_counts (dataset_id, format, n) SELECT dataset_id, format, COUNT(*) "
    "FROM samples WHERE dataset_id = ? AND format IS NOT NULL GROUP BY dataset_id, format",
    (dataset_id,),
)
con.execute("COMMIT")
con.execute("PRAGMA journal_mode = WAL")
con.close()
"""

# Adds 10 files `reps` times and reports the store work of each (a fresh process: the
# store's first open, a migration for a newer build, is timed apart).
_ADD = r"""
import json, sys, time
from fastindex import _core
db, dataset_id, folders = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
t0 = time.perf_counter()
store = _core.Store(db)
opened = time.perf_counter() - t0
out = {"open_ms": opened * 1e3, "version": _core.SCHEMA_VERSION, "adds": []}
for folder in folders:
    t0 = time.perf_counter()
    summary = store.scan(dataset_id, folder)
    t1 = time.perf_counter()
    probed = store.probe_pending(dataset_id)
    t2 = time.perf_counter()
    out["adds"].append([(t1 - t0) * 1e3, (t2 - t1) * 1e3, summary["added"], probed])
print(json.dumps(out))
"""

_SERVE = r"""
import sys
from fastindex.server import run_server
run_server(sys.argv[1], host="127.0.0.1", port=int(sys.argv[2]), log_level="warning")
"""


def add_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("paging")
    g.add_argument("--paging-rows", type=int, default=10_000_000, help="rows in the store")
    g.add_argument(
        "--paging-data",
        default=os.path.join(os.environ.get("FASTINDEX_BENCH_DATA", "bench-data"), "paging"),
        help="folder for the generated store",
    )
    g.add_argument(
        "--paging-baseline",
        default=None,
        help="a python/ folder of another build (e.g. main's) to compare the add of 10 files",
    )
    g.add_argument("--paging-requests", type=int, default=200, help="requests per measure")


def _python(pythonpath: str | None) -> dict[str, str]:
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    return env


def _child(code: str, *args: str, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    return done.stdout.strip()


def _this_python() -> str:
    return str(Path(__file__).resolve().parents[2] / "python")


def _generate(data: Path, rows: int, pythonpath: str) -> tuple[Path, dict[str, int]]:
    """The base store (made once, by the build that measures first), and its ids."""
    base = data / f"base-{rows}.db"
    meta = data / f"base-{rows}.json"
    if base.exists() and meta.exists():
        return base, json.loads(meta.read_text())
    for p in data.glob(f"base-{rows}.db*"):
        p.unlink()
    root = data / "root"
    root.mkdir(parents=True, exist_ok=True)
    made = _child(
        "import json, sys, fastindex\n"
        "ds = fastindex.Dataset.create('cameras', db=sys.argv[1])\n"
        "job = ds.add_images_from_path(sys.argv[2], embed=False)\n"
        "job.wait(); ds.cancel()\n"
        "from fastindex import _core\n"
        "print(json.dumps({'dataset_id': ds.id, 'job_id': job.id, 'root': 1, "
        "'version': _core.SCHEMA_VERSION}))",
        str(base),
        str(root),
        env=_python(pythonpath),
    )
    ids = json.loads(made)
    t0 = time.time()
    print(f"generating {rows:,} rows in {base} ...", file=sys.stderr, flush=True)
    subprocess.run(
        [
            sys.executable,
            "-c",
            _GEN,
            str(base),
            str(rows),
            str(ids["dataset_id"]),
            str(ids["job_id"]),
            str(ids["root"]),
        ],
        check=True,
    )
    ids["gen_s"] = round(time.time() - t0)
    meta.write_text(json.dumps(ids))
    return base, ids


def _ten_files(data: Path, tag: str, reps: int) -> list[str]:
    from PIL import Image

    out = []
    for r in range(reps):
        folder = data / f"new-{tag}-{time.time_ns()}-{r}"
        folder.mkdir(parents=True)
        for i in range(10):
            Image.new("RGB", (32 + i, 24)).save(folder / f"IMG_new_{i:02d}.jpg", "JPEG")
        out.append(str(folder))
    return out


def _add_ten(db: Path, data: Path, did: int, pythonpath: str, tag: str) -> dict[str, Any]:
    folders = _ten_files(data, tag, 5)
    out: dict[str, Any] = json.loads(
        _child(_ADD, str(db), str(did), *folders, env=_python(pythonpath))
    )
    for f in folders:
        shutil.rmtree(f, ignore_errors=True)
    return out


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(args: argparse.Namespace) -> list[Row]:
    rows: list[Row] = []
    data = Path(args.paging_data).resolve()
    data.mkdir(parents=True, exist_ok=True)
    n = args.paging_rows
    this = _this_python()
    first = args.paging_baseline or this
    base, ids = _generate(data, n, first)
    did = ids["dataset_id"]
    size = base.stat().st_size
    rows.append(
        (
            "store generated",
            f"{n:,} rows, {size / 2**30:.1f} GiB",
            "",
            f"SQL inserts into a v{ids['version']} store ({ids.get('gen_s', '?')} s, kept)",
        )
    )
    db = data / "work.db"
    for p in data.glob("work.db*"):
        p.unlink()
    shutil.copyfile(base, db)

    def add_rows(label: str, got: dict[str, Any]) -> None:
        p1 = [a[0] for a in got["adds"]]
        p2 = [a[1] for a in got["adds"]]
        assert all(a[2] == 10 and a[3] == 10 for a in got["adds"]), got
        rows.append(
            (
                f"add 10 files, {label}",
                f"phase 1 {statistics.median(p1):.1f} ms + phase 2 {statistics.median(p2):.1f} ms",
                "ms of store work",
                f"median of {len(p1)} (max {max(p1):.1f} + {max(p2):.1f});"
                f" schema v{got['version']}",
            )
        )

    if args.paging_baseline:
        add_rows("baseline", _add_ten(db, data, did, args.paging_baseline, "base"))
    got = _add_ten(db, data, did, this, "this")
    if args.paging_baseline and ids["version"] != got["version"]:
        rows.append(
            (
                f"migrate v{ids['version']} -> v{got['version']} on open",
                f"{got['open_ms'] / 1e3:.1f} s",
                "",
                f"once, in place, {n:,} rows (builds the queues' partial indexes)",
            )
        )
    add_rows("this build", got)
    got = _add_ten(db, data, did, this, "again")
    add_rows("this build, again", got)

    rows += _progress_and_pages(db, did, n, args.paging_requests)
    for p in data.glob("work.db*"):
        p.unlink()
    return rows


def _progress_and_pages(db: Path, did: int, n: int, reps: int) -> list[Row]:
    sys.path.insert(0, _this_python())
    import fastindex
    import httpx
    from fastindex import _core

    rows: list[Row] = []
    store = _core.Store(str(db))
    times = []
    for _ in range(max(1000, reps)):
        t0 = time.perf_counter()
        store.progress(did)
        times.append((time.perf_counter() - t0) * 1e3)
    rows.append(
        (
            "progress() p99",
            f"{_pct(times, 0.99):.3f} ms",
            "O(1)",
            f"Store.progress at {n:,} rows, p50 {_pct(times, 0.5):.3f} ms",
        )
    )
    # Depths: the first page, the middle, the end (the last ids).
    depths = {"first": 0, "middle": n // 2, "end": n - 30}
    filters: dict[str, dict[str, str]] = {
        "no filter": {},
        "status=failed": {"status": "failed"},
        "format=PNG": {"format": "PNG"},
        "status=ready": {"status": "ready"},
    }
    ds = fastindex.Dataset(store, did, "cameras")
    for fname, f in filters.items():
        for dname, after in depths.items():
            times = []
            for i in range(reps + 10):
                t0 = time.perf_counter()
                got = ds.samples(after_id=after, limit=PAGE, **f)  # type: ignore[arg-type]
                if i >= 10:
                    times.append((time.perf_counter() - t0) * 1e3)
            assert got or dname == "end"
            rows.append(
                (
                    f"ds.samples page, {fname}, {dname}",
                    f"p99 {_pct(times, 0.99):.2f} ms",
                    "< 20 ms",
                    f"p50 {_pct(times, 0.5):.2f} ms, {len(got)} rows",
                )
            )
    del store, ds
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-c", _SERVE, str(db), str(port)], env=_python(_this_python())
    )
    try:
        url = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=url, timeout=30) as c:
            deadline = time.time() + 120
            while True:
                try:
                    if c.get("/api/datasets").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.time() > deadline:
                    raise RuntimeError("server did not start")
                time.sleep(0.2)
            times = []
            for i in range(reps + 10):
                t0 = time.perf_counter()
                c.get(f"/api/progress/{did}").raise_for_status()
                if i >= 10:
                    times.append((time.perf_counter() - t0) * 1e3)
            rows.append(
                (
                    "GET /api/progress p99",
                    f"{_pct(times, 0.99):.2f} ms",
                    "",
                    f"p50 {_pct(times, 0.5):.2f} ms, real server on 127.0.0.1",
                )
            )
            for fname, f in filters.items():
                for dname, after in depths.items():
                    times = []
                    for i in range(reps + 10):
                        t0 = time.perf_counter()
                        r = c.get(
                            f"/api/datasets/{did}/samples",
                            params={"after_id": after, "limit": PAGE, **f},
                        )
                        r.raise_for_status()
                        if i >= 10:
                            times.append((time.perf_counter() - t0) * 1e3)
                    body = r.json()
                    rows.append(
                        (
                            f"HTTP gallery page, {fname}, {dname}",
                            f"p99 {_pct(times, 0.99):.2f} ms",
                            "< 20 ms",
                            f"p50 {_pct(times, 0.5):.2f} ms, {len(body['items'])} items",
                        )
                    )
    finally:
        server.terminate()
        server.wait(30)
    return rows
