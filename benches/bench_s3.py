"""Phases 1+2 over a bucket: fastindex beside what users run today, against one S3 server.

    python benches/bench_s3.py [--objects 100000] [--baseline-objects N] [--delay-ms 20]
                               [--server moto|s3s-fs]

One run, one server (benches/s3_harness.py: moto on 127.0.0.1 in its own process, the
generated images put straight into its backend; or with `--server s3s-fs` the same objects as
files served by s3s-fs, a Rust S3 server whose CPU per request is far below moto's). Rows:

* loopback: `add_images_from_path("s3://bench/photos/", embed=False)` until every row is
  probed, beside the baseline: s3fs lists the prefix, then 32 threads each open an object and
  read `PIL.Image.open(f).size` (LightlyStudio's way);
* the same two through a proxy that delays every request by `--delay-ms` (real S3's time to
  first byte is 10-50 ms), which also counts the bytes of every response: the median per
  object in phase 2 (headers included) beside the baseline's.

Each measurement runs in a fresh process. `--baseline-objects` limits the baseline to the
first N objects (its time is then also given scaled to all of them, and the table says so).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
BUCKET, PREFIX = "bench", "photos/"
EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff")


class Child:
    """A harness process (`s3_harness.py serve|proxy`): started, READY read, closed."""

    def __init__(self, *args: str) -> None:
        self.p = subprocess.Popen(
            [sys.executable, str(HERE / "s3_harness.py"), *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.p.stdout is not None
        line = self.p.stdout.readline()
        if not line.startswith("READY"):
            raise SystemExit(f"s3_harness {args[0]} did not start: {line!r}")
        words = line.split()
        self.port = int(words[1])
        #: The process that answers requests (a server the harness started, or itself).
        self.server_pid = int(words[2]) if len(words) > 2 else self.p.pid

    def ask(self, command: str) -> str:
        assert self.p.stdin is not None and self.p.stdout is not None
        self.p.stdin.write(command + "\n")
        self.p.stdin.flush()
        out = self.p.stdout.readline()
        if command == "dump":
            self.p.stdout.readline()  # OK
        return out

    def close(self) -> None:
        if self.p.stdin is not None:
            self.p.stdin.close()
        try:
            self.p.wait(10)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait()


def s3_env(port: int) -> dict[str, str]:
    return {
        **os.environ,
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench",
        "AWS_REGION": "us-east-1",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ALLOW_HTTP": "true",
    }


def run_child(kind: str, port: int, *extra: str) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, __file__, f"_{kind}", *extra],
        env=s3_env(port),
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        raise SystemExit(f"{kind} failed:\n{out.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


# -- the measured processes ------------------------------------------------------------------
def child_fastindex(args: argparse.Namespace) -> dict[str, Any]:
    import fastindex

    db = os.path.join(tempfile.mkdtemp(prefix="bench-s3-", dir=args.tmp), "s.db")
    ds = fastindex.Dataset.load_or_create("bucket", db=db)
    t0 = time.perf_counter()
    job = ds.add_images_from_path(f"s3://{BUCKET}/{PREFIX}", embed=False)
    listed = time.perf_counter() - t0
    job.wait()
    total = time.perf_counter() - t0
    p = ds.get_loading_progress()
    return {
        "cpu_s": time.process_time(),
        "listed_s": listed,
        "total_s": total,
        "rows": p["total"],
        "failed": p["failed"],
        "indexed": p["indexed"],
        "error": job.error,
    }


def child_baseline(args: argparse.Namespace) -> dict[str, Any]:
    import s3fs
    from PIL import Image

    fs = s3fs.S3FileSystem(
        key="bench",
        secret="bench",
        client_kwargs={"endpoint_url": os.environ["AWS_ENDPOINT_URL"], "region_name": "us-east-1"},
    )
    t0 = time.perf_counter()
    if args.walk:  # folder by folder, one LIST each (see --server)
        found = [f"{d}/{f}" for d, _, files in fs.walk(f"{BUCKET}/{PREFIX}") for f in files]
    else:
        found = fs.find(f"{BUCKET}/{PREFIX}")
    keys = [k for k in found if k.lower().endswith(EXTENSIONS)]
    listed = time.perf_counter() - t0
    if args.limit:
        keys = keys[: args.limit]

    def size(key: str) -> tuple[int, int] | None:
        try:
            with fs.open(key, "rb") as f:
                return Image.open(f).size
        except Exception:
            return None

    with ThreadPoolExecutor(32) as pool:
        sizes = list(pool.map(size, keys))
    total = time.perf_counter() - t0
    return {
        "cpu_s": time.process_time(),
        "listed_s": listed,
        "total_s": total,
        "rows": len(keys),
        "failed": sum(s is None for s in sizes),
    }


# -- the driver ------------------------------------------------------------------------------
def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run(kind: str, port: int, servers: list[Child], *extra: str) -> dict[str, Any]:
    """One measured process against `port`, with the CPU the `servers` used meanwhile."""
    before = [cpu_s(c.server_pid) for c in servers]
    out = run_child(kind, port, *extra)
    after = [cpu_s(c.server_pid) for c in servers]
    out["server_cpu_s"] = sum(a - b for a, b in zip(after, before, strict=True))
    return out


def per_object(responses: list[list[Any]], *, listing: bool) -> list[int]:
    return [b for line, b in responses if ("list-type" in line) == listing]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--objects", type=int, default=100_000)
    p.add_argument("--baseline-objects", type=int, default=0, help="0: all of them")
    p.add_argument("--delay-ms", type=float, default=20.0)
    p.add_argument("--tmp", default=os.environ.get("FASTINDEX_BENCH_DATA", tempfile.gettempdir()))
    p.add_argument(
        "--server",
        choices=("moto", "s3s-fs"),
        default="moto",
        help="moto (the issue's server) or s3s-fs (a Rust S3 server over a folder: the files"
        " are kept under --tmp for reruns; needs `cargo install s3s-fs --version 0.14.1"
        " --features binary`)",
    )
    p.add_argument("--s3s-fs-bin", default="s3s-fs", help="the s3s-fs binary")
    args = p.parse_args()
    os.makedirs(args.tmp, exist_ok=True)
    load = os.getloadavg()
    t = time.perf_counter()
    where = ("--objects", str(args.objects), "--bucket", BUCKET, "--prefix", PREFIX)
    if args.server == "moto":
        moto = Child("serve", *where)
    else:
        root = os.path.join(args.tmp, "s3s-fs-root")
        moto = Child("serve-fs", *where, "--root", root, "--bin", args.s3s_fs_bin)
    gen_s = time.perf_counter() - t
    limit = ("--limit", str(args.baseline_objects or 0))
    if args.server == "s3s-fs":
        # s3fs's `find` takes s3s-fs's answer for a folder's name for an object and lists
        # nothing under it; `walk` (a LIST per folder, as os.walk) lists every key.
        limit += ("--walk",)
    try:
        fi = run("fastindex", moto.port, [moto], "--tmp", args.tmp)
        base = run("baseline", moto.port, [moto], *limit)
        proxy = Child("proxy", "--upstream", str(moto.port), "--delay-ms", str(args.delay_ms))
        try:
            proxy.ask("reset")
            fi_d = run("fastindex", proxy.port, [moto], "--tmp", args.tmp)
            fi_bytes = json.loads(proxy.ask("dump"))
            proxy.ask("reset")
            base_d = run("baseline", proxy.port, [moto], *limit)
            base_bytes = json.loads(proxy.ask("dump"))
        finally:
            proxy.close()
    finally:
        moto.close()
    n, nb = args.objects, base["rows"]
    scale = n / nb if nb else 1.0
    scaled = f"; ran {nb:,}, time x{scale:.0f}" if nb != n else ""
    d = f"+{args.delay_ms:g} ms/request"

    def fi_row(what: str, f: dict[str, Any], goal: str) -> tuple[str, str, str, str]:
        note = f"LIST {f['listed_s']:.1f} s; {f['indexed']:,} indexed, {f['failed']} failed"
        return (f"fastindex phases 1+2, {what}", f"{f['total_s']:.1f} s", goal, note)

    def all_of_them(b: dict[str, Any]) -> float:
        # The baseline lists every object whatever it opens: only the opening is scaled.
        return float(b["listed_s"] + (b["total_s"] - b["listed_s"]) * scale)

    def base_row(what: str, b: dict[str, Any]) -> tuple[str, str, str, str]:
        note = f"LIST {b['listed_s']:.1f} s{scaled}"
        return (f"s3fs + PIL, 32 threads, {what}", f"{all_of_them(b):.1f} s", "", note)

    def ratio(f: dict[str, Any], b: dict[str, Any]) -> str:
        return f"{all_of_them(b) / f['total_s']:.1f}x"

    def ms(x: float, k: int) -> str:
        return f"{x / k * 1000:.3f} ms"

    def median_kib(v: list[int]) -> str:
        return f"{statistics.median(v) / 1024:.1f} KiB" if v else "-"

    fi_r, base_r = fi_bytes["responses"], base_bytes["responses"]
    gets, bgets = per_object(fi_r, listing=False), per_object(base_r, listing=False)
    n_lists = (len(per_object(fi_r, listing=True)), len(per_object(base_r, listing=True)))
    flight = (
        f"{fi_bytes['max_in_flight']} / {base_bytes['max_in_flight']}",
        f"mean {fi_bytes['mean_in_flight']:.0f} / {base_bytes['mean_in_flight']:.0f}",
    )
    rows = [
        (f"objects (generated into {args.server})", f"{n:,}", "100,000", f"{gen_s:.0f} s set-up"),
        fi_row("loopback", fi, ""),
        base_row("loopback", base),
        ("speed-up, loopback", ratio(fi, base), ">= 20x", ""),
        fi_row(d, fi_d, "< 30 s"),
        base_row(d, base_d),
        (f"speed-up, {d}", ratio(fi_d, base_d), "", ""),
        (
            "phase 2 bytes per response, median",
            median_kib(gets),
            "< 8 KiB",
            f"{len(gets):,} GETs for {n:,} objects (headers in)",
        ),
        (
            "baseline bytes per response, median",
            median_kib(bgets),
            "",
            f"{len(bgets):,} GETs for {nb:,} objects",
        ),
        ("LIST requests fastindex / baseline", f"{n_lists[0]} / {n_lists[1]}", "", ""),
        ("requests in flight, fastindex / baseline", flight[0], ">= 70", flight[1]),
        ("client CPU per object, fastindex", ms(fi["cpu_s"], n), "", "loopback run"),
        ("client CPU per object, baseline", ms(base["cpu_s"], nb), "", "loopback run"),
        (f"{args.server} CPU per object, fastindex", ms(fi["server_cpu_s"], n), "", "LIST in"),
        (f"{args.server} CPU per object, baseline", ms(base["server_cpu_s"], nb), "", "LIST in"),
    ]
    print(
        f"\nbench_s3: {os.cpu_count()} CPUs, load average before {load[0]:.2f} "
        f"{load[1]:.2f} {load[2]:.2f}, after {os.getloadavg()[0]:.2f}\n"
    )
    head = ("measure", "value", "goal", "note")
    widths = [max(len(r[i]) for r in [*rows, head]) for i in range(4)]
    for r in [head, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1].startswith("_"):
        kind = sys.argv[1][1:]
        cp = argparse.ArgumentParser()
        cp.add_argument("--tmp", default=tempfile.gettempdir())
        cp.add_argument("--limit", type=int, default=0)
        cp.add_argument("--walk", action="store_true")
        a = cp.parse_args(sys.argv[2:])
        res = child_fastindex(a) if kind == "fastindex" else child_baseline(a)
        print(json.dumps(res))
    else:
        main()
