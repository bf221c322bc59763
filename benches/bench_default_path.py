"""The default path (embeddings on) against the fast path (embeddings off).

    python benches/bench_default_path.py [--files 10000] [--repeat 5]

Two measurements, each in a fresh subprocess on a fresh store, best of `--repeat`:

- `Dataset.add_images_from_path(folder)` with `embed` left at its default, and with
  `embed=False`: the time the call takes to return (phase 1; phases 2 and 3 then run in the
  background). The default must not import torch in the caller's thread.
- `fastindex index DIR --serve --port 0`, and the same with `--no-embed`: from the start of the
  process to the first samples served by `GET /api/datasets/{id}/samples`.

Uses the mixed JPEG/PNG files of bench_scan.py (generated under bench-data/ on first use). Run
it with PYTHONPATH pointing at another checkout to compare with that (the script uses only the
public API and the command line).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import datagen

ADD = """
import os, sys, time
t0 = time.perf_counter()
import fastindex
t1 = time.perf_counter()
ds = fastindex.Dataset.create("bench", db=sys.argv[1])
t2 = time.perf_counter()
ds.add_images_from_path(sys.argv[2], **({} if sys.argv[3] == "default" else {"embed": False}))
t3 = time.perf_counter()
print(f"{t3 - t2} {t1 - t0}", flush=True)
os._exit(0)  # the background phases are not measured here
"""


def time_add(folder: Path, embed: str) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        out = subprocess.run(
            [sys.executable, "-c", ADD, os.path.join(tmp, "s.db"), str(folder), embed],
            capture_output=True,
            text=True,
            timeout=300,
        )
        if out.returncode != 0:
            raise RuntimeError(out.stderr)
        return float(out.stdout.split()[0])


def time_first_samples(folder: Path, extra: list[str]) -> float:
    """Seconds from the start of `fastindex index --serve` to a non-empty samples page."""
    with tempfile.TemporaryDirectory() as tmp:
        db = os.path.join(tmp, "s.db")
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            [
                *(sys.executable, "-m", "fastindex.cli", "index", str(folder), "--db", db),
                *("--serve", "--port", "0", "--name", "bench", *extra),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert proc.stderr is not None
            url = None
            for line in proc.stderr:
                m = re.search(r"serving (http://\S+)", line)
                if m:
                    url = m.group(1)
                    break
            if url is None:
                raise RuntimeError(f"the CLI ended without serving (exit {proc.wait()})")
            # Drain stderr so the CLI never blocks on a full pipe.
            threading.Thread(target=proc.stderr.read, daemon=True).start()
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                try:
                    with urllib.request.urlopen(
                        f"{url}/api/datasets/1/samples?limit=10", timeout=5
                    ) as r:
                        if json.load(r)["items"]:
                            return time.perf_counter() - t0
                except OSError:
                    pass
                time.sleep(0.005)
            raise RuntimeError("no samples served within 120 s")
        finally:
            proc.kill()
            proc.wait()


def best(f: object, repeat: int, *args: object) -> float:
    return min(f(*args) for _ in range(repeat))  # type: ignore[operator]


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--files", type=int, default=10_000, help="mixed JPEG/PNG files")
    ap.add_argument("--repeat", type=int, default=5, help="runs per row (best is kept)")
    a = ap.parse_args()

    folder = datagen.data_root() / f"mixed_{a.files}"
    datagen.make_mixed(folder, a.files, seed=1)
    import fastindex

    rows = [
        ("add_images_from_path", "embed default", best(time_add, a.repeat, folder, "default")),
        ("add_images_from_path", "embed=False", best(time_add, a.repeat, folder, "off")),
        ("index --serve: first samples", "default", best(time_first_samples, a.repeat, folder, [])),
        (
            "index --serve: first samples",
            "--no-embed",
            best(time_first_samples, a.repeat, folder, ["--no-embed"]),
        ),
    ]
    print()
    print(
        f"machine: {os.cpu_count()} cores; python {sys.version.split()[0]}; "
        f"fastindex from {os.path.dirname(fastindex.__file__)}"
    )
    print(f"{a.files:,} files, best of {a.repeat}, each run in a fresh process and store")
    print()
    print(f"| {'what':<30} | {'embeddings':<14} | {'seconds':>8} |")
    print(f"| {'-' * 30} | {'-' * 14} | {'-' * 8}:|")
    for what, who, s in rows:
        print(f"| {what:<30} | {who:<14} | {s:8.3f} |")
    d, f = rows[0][2], rows[1][2]
    print()
    print(f"default / embed=False: {d / f:.2f}x; first samples, default: {rows[2][2]:.2f} s")


if __name__ == "__main__":
    main()
