"""A real S3 API server for the tests: moto in server mode on a free 127.0.0.1 port, in this
process, with helpers to make buckets and put generated images into them with boto3.

Fixtures (import them into a test module, or from conftest):
- `moto_server` (session): the running `MotoServer`; it sets the standard environment that every
  S3 client reads (boto3, s3fs, object_store in the Rust core) while the session runs.
- `bucket` (function): a fresh, empty bucket name on that server.

`MotoServer.stop()` cuts every open connection as well as the listening socket (a stopped
server must look dead to a client holding keep-alive connections), and `start()` serves again on
the same port with the same buckets and objects: moto's state lives in this process.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import socket
import threading
import urllib.request
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from PIL import Image

# Formats Pillow writes and fastindex probes; the images are made of random pixels, so their
# sizes are those of real photos of the same dimensions, not of flat test patterns.
FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF")
EXTENSIONS = {
    "JPEG": "jpg",
    "PNG": "png",
    "GIF": "gif",
    "WEBP": "webp",
    "BMP": "bmp",
    "TIFF": "tif",
}

ACCESS_KEY = "testing"
SECRET_KEY = "testing"
REGION = "us-east-1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class MotoServer:
    """moto's WSGI app on a werkzeug threaded server bound to 127.0.0.1:`port`."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        #: Requests served since start (all starts), by HTTP method.
        self.requests: dict[str, int] = {}

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        """The environment a client needs to reach this server with the test credentials."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_REGION": REGION,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_ALLOW_HTTP": "true",  # object_store refuses plain http without it
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def start(self) -> None:
        from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
        from werkzeug.serving import WSGIRequestHandler, make_server

        owner = self

        class Handler(WSGIRequestHandler):
            # Set here so werkzeug does not set it on its own class for everyone.
            protocol_version = "HTTP/1.1"

            def log_request(self, *args: Any, **kwargs: Any) -> None:
                with owner._lock:
                    owner.requests[self.command] = owner.requests.get(self.command, 0) + 1

            def setup(self) -> None:
                super().setup()
                with owner._lock:
                    owner._conns.add(self.connection)

            def finish(self) -> None:
                with owner._lock:
                    owner._conns.discard(self.connection)
                with contextlib.suppress(OSError):
                    super().finish()

        app = DomainDispatcherApplication(create_backend_app)
        self._server = make_server(
            "127.0.0.1", self.port, app, threaded=True, request_handler=Handler
        )
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop listening and cut every open connection (clients see resets, then refusals)."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        with self._lock:
            conns, self._conns = list(self._conns), set()
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join()
        self._server = None
        self._thread = None

    @property
    def running(self) -> bool:
        return self._server is not None

    def restart(self) -> None:
        self.stop()
        self.start()

    # -- moto's own API -------------------------------------------------------------------------
    def _moto_api(self, path: str, body: bytes = b"") -> Any:
        req = urllib.request.Request(
            self.endpoint + path, data=body, method="POST", headers={"Content-Type": "text/plain"}
        )
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read() or b"{}")

    @contextlib.contextmanager
    def auth_enforced(self) -> Iterator[None]:
        """While the block runs, moto checks signatures and IAM policies: the default test key
        is then unknown (403 InvalidAccessKeyId) and IAM users' policies are applied."""
        self._moto_api("/moto-api/reset-auth", b"0")
        try:
            yield
        finally:
            self._moto_api("/moto-api/reset-auth", b"inf")

    # -- clients --------------------------------------------------------------------------------
    def client(self, **overrides: Any) -> Any:
        """A boto3 S3 client on this server (thread-safe; share it across threads)."""
        import boto3
        from botocore.config import Config

        options: dict[str, Any] = {
            "endpoint_url": self.endpoint,
            "aws_access_key_id": ACCESS_KEY,
            "aws_secret_access_key": SECRET_KEY,
            "region_name": REGION,
            "config": Config(max_pool_connections=32, retries={"max_attempts": 2}),
        }
        options.update(overrides)
        return boto3.client("s3", **options)

    def make_bucket(self, name: str | None = None) -> str:
        name = name or f"b-{uuid.uuid4().hex[:16]}"
        self.client().create_bucket(Bucket=name)
        return name

    def put(
        self,
        bucket: str,
        objects: dict[str, bytes],
        *,
        threads: int = 8,
        access_key: str = ACCESS_KEY,
        secret_key: str = SECRET_KEY,
    ) -> None:
        """Put every `key: bytes` of `objects` into `bucket` (with other keys where moto
        checks them, see `auth_enforced`)."""
        client = self.client(aws_access_key_id=access_key, aws_secret_access_key=secret_key)

        def one(item: tuple[str, bytes]) -> None:
            client.put_object(Bucket=bucket, Key=item[0], Body=item[1])

        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(one, objects.items()))

    def put_direct(self, bucket: str, objects: dict[str, bytes]) -> None:
        """Put objects straight into moto's in-process backend (no HTTP: ~50x faster than
        `put`, for tests that need thousands of keys)."""
        from moto.core import DEFAULT_ACCOUNT_ID
        from moto.s3.models import s3_backends

        backend = s3_backends[DEFAULT_ACCOUNT_ID]["aws"]
        for key, data in objects.items():
            backend.put_object(bucket, key, data)

    def get(self, bucket: str, key: str) -> bytes:
        body: bytes = self.client().get_object(Bucket=bucket, Key=key)["Body"].read()
        return body

    def delete(self, bucket: str, key: str) -> None:
        self.client().delete_object(Bucket=bucket, Key=key)


# -- images -------------------------------------------------------------------------------------
def random_image(size: tuple[int, int], fmt: str, seed: int) -> bytes:
    """`size` random RGB pixels (full entropy) encoded as `fmt`."""
    w, h = size
    rng = random.Random(seed)
    im = Image.frombytes("RGB", (w, h), rng.randbytes(w * h * 3))
    if fmt == "GIF":
        im = im.convert("P")
    buf = io.BytesIO()
    im.save(buf, fmt)
    return buf.getvalue()


def generated_images(
    n: int,
    *,
    prefix: str = "",
    seed: int = 0,
    formats: tuple[str, ...] = FORMATS,
    max_side: int = 96,
    subfolders: int = 0,
) -> dict[str, bytes]:
    """`n` images `{key: bytes}` of random sizes (4..max_side) cycling through `formats`, keys
    under `prefix`, spread over `subfolders` common prefixes (`d0/`, `d1/`, ...) when > 0."""
    rng = random.Random(seed)
    out: dict[str, bytes] = {}
    for i in range(n):
        fmt = formats[i % len(formats)]
        size = (rng.randint(4, max_side), rng.randint(4, max_side))
        folder = f"d{i % subfolders}/" if subfolders else ""
        out[f"{prefix}{folder}img{i:06d}.{EXTENSIONS[fmt]}"] = random_image(
            size, fmt, seed * 1_000_003 + i
        )
    return out


# -- fixtures -----------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def moto_server() -> Iterator[MotoServer]:
    """One moto server for the session, with the S3 environment set for every client."""
    server = MotoServer()
    server.start()
    saved = {k: os.environ.get(k) for k in [*server.env, "AWS_PROFILE"]}
    os.environ.update(server.env)
    os.environ.pop("AWS_PROFILE", None)
    try:
        yield server
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def bucket(moto_server: MotoServer) -> str:
    """A fresh, empty bucket on the session's moto server (started again if a test left it
    stopped)."""
    if not moto_server.running:
        moto_server.start()
    return moto_server.make_bucket()
