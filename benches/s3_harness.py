"""The servers `bench_s3.py` measures against, each in a process of its own (so that neither
competes for the measured process's GIL):

    python benches/s3_harness.py serve --objects N [--bucket B --prefix P/]
        moto's S3 server on a free 127.0.0.1 port, `N` generated images put straight into
        its backend (seconds, not the minutes N PUTs over HTTP take); prints `READY <port>`
        and serves until stdin closes.
    python benches/s3_harness.py serve-fs --objects N --root DIR [--bin s3s-fs]
        the same objects as files under DIR/<bucket>/<prefix>, served by s3s-fs (an S3 server
        in Rust over a folder, from crates.io: `cargo install s3s-fs --version 0.14.1
        --features binary`) on a free 127.0.0.1 port: a server whose CPU per request is
        small, to see what the clients do when the server is not the bottleneck; prints
        `READY <port> <server pid>`.
    python benches/s3_harness.py proxy --upstream PORT [--delay-ms 20]
        a TCP proxy in front of it that holds each request for `delay` before passing it on
        (the time to first byte of a real S3 request, 10-50 ms) and counts the bytes of each
        response; prints `READY <port>`, then answers `reset` / `dump` lines on stdin
        (`dump` prints one JSON line: `{"responses": [[request line, response bytes], ...],
        "max_in_flight", "mean_in_flight"}`, requests sent and not yet answered).

moto's LIST sorts every key of the bucket for every page (2 s a page at 100k keys here), so
both fastindex and the baseline would measure moto's listing. `serve` replaces moto's
`list_objects_v2` with one over a sorted index of the (unchanging) keys: the same pages,
tokens and common prefixes, in O(page).
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import io
import json
import logging
import random
import sys
import threading
import time
from typing import Any

from PIL import Image

#: Bench objects: JPEG and PNG photos-like noise, 8-60 KB each (the "small objects" of the
#: issue; larger than the 8 KiB phase 2 should read, so the bytes row means something).
SHAPES = [(256, 192), (320, 240), (400, 300), (480, 360), (240, 320), (300, 400)]


def image_pool(seed: int = 0, n: int = 48) -> list[tuple[bytes, str]]:
    rng = random.Random(seed)
    out: list[tuple[bytes, str]] = []
    for i in range(n):
        w, h = rng.choice(SHAPES)
        img = Image.effect_noise((w // 6, h // 6), 30 + i).convert("RGB").resize((w, h))
        buf = io.BytesIO()
        if i % 4 == 3:
            img.resize((w // 3, h // 3)).save(buf, "PNG")
            out.append((buf.getvalue(), "png"))
        else:
            kw: dict[str, Any] = {"quality": rng.choice([70, 80, 90])}
            if i % 5 == 0:
                exif = Image.Exif()
                exif[0x0112] = rng.choice([1, 6, 8])
                kw["exif"] = exif.tobytes()
            img.save(buf, "JPEG", **kw)
            out.append((buf.getvalue(), "jpg"))
    return out


def object_names(n: int, prefix: str, per_dir: int = 1000) -> list[tuple[str, int]]:
    """`(key, pool index)` of `n` objects in `per_dir`-sized "folders" under `prefix`."""
    rng = random.Random(1)
    return [(f"{prefix}d{i // per_dir:04d}/img_{i:07d}", rng.randrange(48)) for i in range(n)]


def _fast_listing() -> None:
    from moto.s3.models import FakeKey, S3Backend
    from moto.utilities.utils import md5_hash

    index: dict[int, tuple[int, list[str]]] = {}
    lock = threading.Lock()

    def names_of(bucket: Any) -> list[str]:
        with lock:
            n = len(bucket.keys)
            got = index.get(id(bucket))
            if got is None or got[0] != n:
                got = (n, sorted(bucket.keys.keys()))
                index[id(bucket)] = got
            return got[1]

    def list_objects_v2(
        self: Any,
        bucket: Any,
        prefix: str | None,
        delimiter: str | None,
        continuation_token: str | None,
        start_after: str | None,
        max_keys: int,
    ) -> tuple[list[FakeKey | str], bool, str | None]:
        names = names_of(bucket)
        prefix = prefix or ""
        after = self._pagination_tokens.get(continuation_token) if continuation_token else None
        after = after or start_after
        i = bisect.bisect_left(names, prefix)
        if after:
            i = max(i, bisect.bisect_right(names, after))
            if delimiter and after.endswith(delimiter):  # a common prefix: skip what it holds
                i = max(i, bisect.bisect_left(names, after + "\U0010ffff"))
        items: list[FakeKey | str] = []
        while i < len(names) and names[i].startswith(prefix) and len(items) < max_keys:
            rest = names[i][len(prefix) :]
            if delimiter and delimiter in rest:
                folder = prefix + rest.split(delimiter, 1)[0] + delimiter
                items.append(folder)
                i = bisect.bisect_left(names, folder + "\U0010ffff", i)
            else:
                items.append(bucket.keys[names[i]])
                i += 1
        truncated = i < len(names) and names[i].startswith(prefix) and max_keys > 0
        token = None
        if truncated:
            last = items[-1]
            name = last.name if isinstance(last, FakeKey) else last
            token = md5_hash(name.encode("utf-8")).hexdigest()
            self._pagination_tokens[token] = name
        return items, truncated, token

    S3Backend.list_objects_v2 = list_objects_v2  # type: ignore[method-assign]


def serve(args: argparse.Namespace) -> None:
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    import boto3
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.moto_server.werkzeug_app import create_backend_app
    from moto.s3.models import s3_backends
    from werkzeug.serving import WSGIRequestHandler, make_server

    class _Handler(WSGIRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as S3 clients expect

        def log_request(self, *args: Any, **kwargs: Any) -> None:
            pass

    _fast_listing()
    # S3's app alone, not moto's dispatcher (which looks the service up for every request
    # among all of moto's: 40% of a ranged GET's time here). The same S3 code answers.
    app = create_backend_app("s3")
    server = make_server("127.0.0.1", 0, app, threaded=True, request_handler=_Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    client = boto3.client(
        "s3",
        endpoint_url=f"http://127.0.0.1:{port}",
        aws_access_key_id="bench",
        aws_secret_access_key="bench",
        region_name="us-east-1",
    )
    client.create_bucket(Bucket=args.bucket)
    backend = s3_backends[DEFAULT_ACCOUNT_ID]["aws"]
    pool = image_pool()
    for key, k in object_names(args.objects, args.prefix):
        data, ext = pool[k]
        backend.put_object(args.bucket, f"{key}.{ext}", data)
    print(f"READY {port}", flush=True)
    sys.stdin.read()  # until the bench closes it
    server.shutdown()


def serve_fs(args: argparse.Namespace) -> None:
    import socket
    import subprocess
    from pathlib import Path

    root = Path(args.root)
    done = root / f".written-{args.bucket}-{args.objects}"
    if not done.exists():
        pool = image_pool()
        for key, k in object_names(args.objects, args.prefix):
            data, ext = pool[k]
            path = root / args.bucket / f"{key}.{ext}"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        done.touch()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    keys = ["--access-key", "bench", "--secret-key", "bench"]
    cmd = [args.bin, "--host", "127.0.0.1", "--port", str(port), *keys, str(root)]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"{args.bin} did not start (exit {server.poll()})") from None
                time.sleep(0.05)
        print(f"READY {port} {server.pid}", flush=True)
        sys.stdin.read()  # until the bench closes it
    finally:
        server.terminate()
        server.wait(10)


class _Proxy:
    def __init__(self, upstream: int, delay: float) -> None:
        self.upstream = upstream
        self.delay = delay
        self.responses: list[tuple[str, int]] = []
        self._reset()

    def _reset(self) -> None:
        self.responses = []
        # Requests sent and not answered yet: the most at once, and the time-weighted mean.
        self.in_flight = self.max_in_flight = 0
        self.since = self.last = time.monotonic()
        self.area = 0.0

    def _in_flight(self, delta: int) -> None:
        now = time.monotonic()
        self.area += self.in_flight * (now - self.last)
        self.last = now
        self.in_flight += delta
        self.max_in_flight = max(self.max_in_flight, self.in_flight)

    async def handle(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        try:
            sr, sw = await asyncio.open_connection("127.0.0.1", self.upstream)
        except OSError:
            cw.close()
            return
        state: dict[str, Any] = {"new": True, "line": "", "bytes": 0, "waiting": False}

        def finish() -> None:
            if state["bytes"]:
                self.responses.append((state["line"], state["bytes"]))
                state["bytes"] = 0

        async def up() -> None:
            while data := await cr.read(1 << 16):
                if state["new"]:  # the first bytes of a request
                    finish()
                    state["new"] = False
                    state["waiting"] = True
                    self._in_flight(+1)
                    state["line"] = data.split(b"\r\n", 1)[0].decode("latin-1")
                    await asyncio.sleep(self.delay)
                sw.write(data)
                await sw.drain()
            sw.close()

        async def down() -> None:
            while data := await sr.read(1 << 16):
                if state["waiting"]:  # the first bytes of its answer
                    state["waiting"] = False
                    self._in_flight(-1)
                state["bytes"] += len(data)
                state["new"] = True
                cw.write(data)
                await cw.drain()
            cw.close()

        try:
            await asyncio.gather(up(), down())
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            finish()
            if state["waiting"]:
                self._in_flight(-1)
            sw.close()
            cw.close()

    async def control(self) -> None:
        loop = asyncio.get_running_loop()
        while line := await loop.run_in_executor(None, sys.stdin.readline):
            if line.strip() == "reset":
                self._reset()
            elif line.strip() == "dump":
                self._in_flight(0)
                mean = self.area / max(self.last - self.since, 1e-9)
                out = {"responses": self.responses, "max_in_flight": self.max_in_flight}
                print(json.dumps({**out, "mean_in_flight": mean}), flush=True)
            print("OK", flush=True)

    async def main(self) -> None:
        server = await asyncio.start_server(self.handle, "127.0.0.1", 0, backlog=1024)
        print(f"READY {server.sockets[0].getsockname()[1]}", flush=True)
        async with server:
            await self.control()


def main() -> None:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--objects", type=int, default=1000)
    s.add_argument("--bucket", default="bench")
    s.add_argument("--prefix", default="photos/")
    f = sub.add_parser("serve-fs")
    f.add_argument("--objects", type=int, default=1000)
    f.add_argument("--bucket", default="bench")
    f.add_argument("--prefix", default="photos/")
    f.add_argument("--root", required=True)
    f.add_argument("--bin", default="s3s-fs")
    x = sub.add_parser("proxy")
    x.add_argument("--upstream", type=int, required=True)
    x.add_argument("--delay-ms", type=float, default=20.0)
    args = p.parse_args()
    if args.cmd == "serve":
        serve(args)
    elif args.cmd == "serve-fs":
        serve_fs(args)
    else:
        asyncio.run(_Proxy(args.upstream, args.delay_ms / 1000).main())


if __name__ == "__main__":
    main()
