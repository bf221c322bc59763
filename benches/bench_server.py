"""The server under watch: does indexing slow down when many clients follow its progress, and
how fast are progress answers on a store of 1,000,000 samples?

    python benches/bench_server.py [--files 1000000] [--ws 100] [--pollers 20]
                                   [--poll-every 1.0] [--repeat 2] [--requests 2000]

On loopback: `fastindex serve` runs in a subprocess; this process posts a folder of tiny PNG
files (bench-data/tiny_N, made on first use), then times the run from the POST to the
`complete` message, alone and with `--ws` WebSocket clients and `--pollers` HTTP pollers
attached. In both scenarios one WebSocket observer in its own process sees the end of the
run, and a prober in its own process times `GET /api/progress` 20 times a second. Runs
alternate (alone, watched, alone, watched, ...) so that drift on a shared machine hits both.
Then `--requests` sequential `GET /api/progress` on the finished 1M-row store. Prints a
table; every wait is bounded, so it always stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

sys.path.insert(0, str(Path(__file__).resolve().parent))
import datagen

RUN_TIMEOUT = 900.0  # seconds, per indexing run


@dataclass
class Run:
    scenario: str
    seconds: float
    server_cpu: float
    total: int
    ws_messages: int = 0
    ws_clients: int = 0
    poll_latency_ms: list[float] = field(default_factory=list)
    probe_latency_ms: list[float] = field(default_factory=list)
    watchers_cpu: float = 0.0


def cpu_self() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


class Server:
    """`fastindex serve` on a free port, in a subprocess."""

    def __init__(self, db: str, root: Path) -> None:
        code = (
            "import sys; from fastindex.server import run_server; "
            "run_server(sys.argv[1], port=0, log_level='warning', allowed_roots=[sys.argv[2]])"
        )
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code, db, str(root)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # "fastindex serving DB at URL"
        if " at http" not in line:
            self.stop()
            raise RuntimeError(f"the server did not start: {line!r}")
        self.url = line.rsplit(" at ", 1)[1].strip()
        self.ws = self.url.replace("http://", "ws://")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                httpx.get(f"{self.url}/api/datasets", timeout=2)
                return
            except httpx.TransportError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError("the server does not answer")

    def cpu_seconds(self) -> float:
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        ticks = os.sysconf("SC_CLK_TCK")
        return (int(fields[11]) + int(fields[12])) / ticks  # utime + stime

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


async def ws_client(url: str, done: asyncio.Event, counts: list[int], i: int) -> float | None:
    """Follow progress until `complete`; reconnect if the socket drops. Returns when it saw
    `complete` (monotonic time) or None when told to stop first."""
    while not done.is_set():
        try:
            async with connect(url, open_timeout=30, max_queue=64) as ws:
                async for raw in ws:
                    counts[i] += 1
                    if json.loads(raw)["status"] == "complete":
                        return time.monotonic()
        except (ConnectionClosed, OSError, TimeoutError):
            await asyncio.sleep(0.05)
    return None


async def poller(base: str, did: int, every: float, done: asyncio.Event, lat: list[float]) -> None:
    async with httpx.AsyncClient(base_url=base, timeout=10) as c:
        while not done.is_set():
            t = time.perf_counter()
            r = await c.get(f"/api/progress/{did}")
            lat.append((time.perf_counter() - t) * 1000)
            if r.json()["status"] == "complete":
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), every)


def observe(ws_base: str, go: Any, out: Any) -> None:
    """In its own process, the same in both scenarios: follow one dataset's progress over a
    WebSocket and report when it said `complete` (CLOCK_MONOTONIC is shared by processes)."""
    did = go.get(timeout=RUN_TIMEOUT)
    done = asyncio.Event()
    out.put(asyncio.run(ws_client(f"{ws_base}/ws/progress/{did}", done, [0], 0)))


def probe_loop(base: str, go: Any, stop: Any, out: Any) -> None:
    """In its own process (so the crowd's event loop does not delay it): time progress
    requests, 20 a second, until told to stop."""
    did = go.get(timeout=RUN_TIMEOUT)
    cpu0 = cpu_self()
    lat = []
    with httpx.Client(base_url=base, timeout=10) as c:
        while not stop.is_set():
            t = time.perf_counter()
            c.get(f"/api/progress/{did}")
            lat.append((time.perf_counter() - t) * 1000)
            stop.wait(0.05)
    out.put((lat, cpu_self() - cpu0))


async def index_once(server: Server, root: Path, watchers: int, pollers: int, every: float) -> Run:
    ctx = multiprocessing.get_context("spawn")
    go_obs, obs_out = ctx.Queue(), ctx.Queue()
    go_probe, stop, probe_out = ctx.Queue(), ctx.Event(), ctx.Queue()
    watched = bool(watchers or pollers)
    helpers = [
        ctx.Process(target=observe, args=(server.ws, go_obs, obs_out)),
        ctx.Process(target=probe_loop, args=(server.url, go_probe, stop, probe_out)),
    ]
    for p in helpers:
        p.start()
    await asyncio.sleep(3)  # let the helpers start (spawning Python costs CPU)
    cpu0 = server.cpu_seconds()
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as c:
        t0 = time.monotonic()
        r = await c.post(
            "/api/datasets", json={"name": "bench", "images_path": str(root), "embed": False}
        )
        r.raise_for_status()
        did = r.json()["dataset_id"]
    go_obs.put(did)
    go_probe.put(did)
    url = f"{server.ws}/ws/progress/{did}"
    done = asyncio.Event()
    counts = [0] * watchers
    lat: list[float] = []
    crowd_cpu0 = cpu_self()
    crowd = [asyncio.ensure_future(ws_client(url, done, counts, i)) for i in range(watchers)]
    polls = [
        asyncio.ensure_future(poller(server.url, did, every, done, lat)) for _ in range(pollers)
    ]
    try:
        t_end = await asyncio.wait_for(
            asyncio.to_thread(obs_out.get, True, RUN_TIMEOUT), RUN_TIMEOUT
        )
    finally:
        done.set()
        stop.set()
        await asyncio.wait_for(asyncio.gather(*crowd, *polls, return_exceptions=True), 60)
    cpu = server.cpu_seconds() - cpu0
    crowd_cpu = cpu_self() - crowd_cpu0
    probed, _ = probe_out.get(timeout=60)
    for p in helpers:
        p.join(30)
    assert t_end is not None
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as c:
        total = (await c.get(f"/api/progress/{did}")).json()["total"]
    return Run(
        "watched" if watched else "alone",
        t_end - t0,
        cpu,
        total,
        ws_messages=sum(counts),
        ws_clients=watchers,
        poll_latency_ms=lat,
        probe_latency_ms=probed,
        watchers_cpu=crowd_cpu,
    )


def sequential_latency(base: str, did: int, n: int) -> list[float]:
    out = []
    with httpx.Client(base_url=base, timeout=10) as c:
        for _ in range(20):  # warm the connection and the server's thread-local stores
            c.get(f"/api/progress/{did}")
        for _ in range(n):
            t = time.perf_counter()
            r = c.get(f"/api/progress/{did}")
            out.append((time.perf_counter() - t) * 1000)
            assert r.status_code == 200
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--files", type=int, default=1_000_000, help="tiny PNG files to index")
    ap.add_argument("--ws", type=int, default=100, help="WebSocket clients in the watched runs")
    ap.add_argument("--pollers", type=int, default=20, help="HTTP pollers in the watched runs")
    ap.add_argument("--poll-every", type=float, default=1.0, help="seconds between two polls")
    ap.add_argument("--repeat", type=int, default=2, help="runs of each scenario (alternating)")
    ap.add_argument("--requests", type=int, default=2000, help="sequential progress requests")
    a = ap.parse_args()

    root = datagen.data_root() / f"tiny_{a.files}"
    t = time.monotonic()
    datagen.make_tiny(root, a.files)
    print(f"data: {root} ({time.monotonic() - t:.1f} s to make or check)", flush=True)

    runs: list[Run] = []
    latency: list[float] = []
    for rep in range(a.repeat):
        for watched in (False, True):
            with tempfile.TemporaryDirectory(prefix="fastindex-bench-server-") as tmp:
                server = Server(os.path.join(tmp, "b.db"), root)
                try:
                    run = asyncio.run(
                        index_once(
                            server,
                            root,
                            a.ws if watched else 0,
                            a.pollers if watched else 0,
                            a.poll_every,
                        )
                    )
                    runs.append(run)
                    print(
                        f"  run {rep + 1} {run.scenario:<8} {run.seconds:7.2f} s  "
                        f"server cpu {run.server_cpu:6.1f} s  watchers cpu "
                        f"{run.watchers_cpu:5.1f} s  {run.total:,} samples",
                        flush=True,
                    )
                    if watched and rep == a.repeat - 1:
                        latency = sequential_latency(server.url, 1, a.requests)
                finally:
                    server.stop()

    alone = [r for r in runs if r.scenario == "alone"]
    watched_runs = [r for r in runs if r.scenario == "watched"]
    t_alone = statistics.median(r.seconds for r in alone)
    t_watched = statistics.median(r.seconds for r in watched_runs)
    during = [x for r in watched_runs for x in r.probe_latency_ms]
    during_alone = [x for r in alone for x in r.probe_latency_ms]
    polled = [x for r in watched_runs for x in r.poll_latency_ms]
    per_client = [
        r.ws_messages / max(r.ws_clients, 1) / r.seconds for r in watched_runs if r.ws_clients
    ]
    n = runs[0].total
    rows = [
        (f"index, nobody watching (median of {len(alone)})", f"{t_alone:.2f} s"),
        (
            f"index, {a.ws} WebSocket + {a.pollers} pollers (median of {len(watched_runs)})",
            f"{t_watched:.2f} s",
        ),
        ("  slower by (goal < 10%)", f"{100 * (t_watched / t_alone - 1):.1f} %"),
        (
            "  server process CPU, alone / watched",
            f"{statistics.median(r.server_cpu for r in alone):.1f} / "
            f"{statistics.median(r.server_cpu for r in watched_runs):.1f} s",
        ),
        (
            "  the watchers' own CPU (100 WS + 20 pollers), median",
            f"{statistics.median(r.watchers_cpu for r in watched_runs):.1f} s",
        ),
        ("  WebSocket messages per client per second", f"{statistics.mean(per_client or [0]):.2f}"),
        (
            f"progress latency while indexing alone, p50 / p99 ({len(during_alone)} probes)",
            f"{pct(during_alone, 0.5):.2f} / {pct(during_alone, 0.99):.2f} ms",
        ),
        (
            f"progress latency while indexing + watched, p50 ({len(during)} probes)",
            f"{pct(during, 0.5):.2f} ms",
        ),
        ("progress latency while indexing + watched, p99", f"{pct(during, 0.99):.2f} ms"),
        (
            f"  as the {a.pollers} pollers saw it (their loop is shared), p50 / p99",
            f"{pct(polled, 0.5):.1f} / {pct(polled, 0.99):.1f} ms",
        ),
        (
            f"progress latency at {n:,} samples, p50 ({len(latency)} requests)",
            f"{pct(latency, 0.5):.2f} ms",
        ),
        (f"progress latency at {n:,} samples, p99 (goal < 10 ms)", f"{pct(latency, 0.99):.2f} ms"),
    ]
    print()
    print(f"fastindex server on loopback, {n:,} tiny PNG files, {os.cpu_count()} cores")
    print(f"{'measure':<66} {'value':>16}")
    print("-" * 83)
    for label, value in rows:
        print(f"{label:<66} {value:>16}")


if __name__ == "__main__":
    main()
