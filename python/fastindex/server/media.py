"""Files of indexed samples: opened only after checking where they really are, thumbnails
made at reduced size under a memory budget and kept in a bounded cache, and the content types
of originals. Files are reached only through indexed samples (see `ServerState`)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import io
import os
import stat
import threading
import warnings
from collections import OrderedDict
from collections.abc import AsyncIterator, Mapping
from email.utils import formatdate
from typing import IO, Any, cast
from urllib.parse import quote

from PIL import Image, ImageOps
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from ..errors import FastIndexError, ImageError
from ..objects import is_object_uri, object_uri
from ..sample import Sample
from .errors import ForbiddenError, NotFoundError
from .roots import is_inside

#: The longest side of a thumbnail, in pixels.
THUMB_SIZE = 320
#: JPEG quality of thumbnails.
THUMB_QUALITY = 80
#: The most pixels one thumbnail may decode (after JPEG draft scaling, which decodes a big
#: JPEG at 1/2 to 1/8 of its size). Pillow holds up to 4 bytes a pixel, so 64 MP is ~256 MB;
#: larger PNG/TIFF/WebP/... files are refused (422) from their header, before decoding.
MAX_THUMB_PIXELS = 64_000_000
#: The most pixels all thumbnails being made at once may decode together (~320 MB).
THUMB_PIXEL_BUDGET = 80_000_000
#: How many thumbnails are made at once (each takes a core while it decodes).
THUMB_WORKERS = max(2, (os.cpu_count() or 2) // 2)

#: `Sample.format` (as the header probe names it) to the content type of the original file.
CONTENT_TYPES: dict[str, str] = {
    "JPEG": "image/jpeg",
    "PNG": "image/png",
    "GIF": "image/gif",
    "BMP": "image/bmp",
    "WEBP": "image/webp",
    "TIFF": "image/tiff",
}


#: The formats Pillow may open for a thumbnail: those the header probe indexes.
THUMB_FORMATS: tuple[str, ...] = tuple(CONTENT_TYPES)


def content_type(sample: Sample) -> str:
    return CONTENT_TYPES.get((sample.format or "").upper(), "application/octet-stream")


def cache_key(sample: Sample) -> tuple[int, int | None, int | None]:
    """Changes when the file the sample was indexed from changes (as far as the store knows)."""
    return (sample.id, sample.size_bytes, sample.mtime_ns)


def etag(sample: Sample) -> str:
    return f'"{sample.id}-{sample.size_bytes or 0}-{sample.mtime_ns or 0}"'


# -- opening a sample's file -----------------------------------------------------------------
def open_sample_file(sample: Sample) -> IO[bytes]:
    """The sample's file, open for reading, if it is still a regular file whose real path
    (after `..` and every link, as of now) lies inside the sample's root.

    The check is made on the file that was opened, not on its name, so a link swapped in
    between the check and the read cannot redirect it. Blocks (file system calls).

    Raises:
        NotFoundError: the file is gone.
        ForbiddenError: it now resolves outside the root, or is not a regular file.
    """
    where = f"sample {sample.id}: {sample.path}"
    root = os.path.realpath(sample.root)
    if root != os.path.normpath(sample.root):
        # The store keeps each root as its real path (the walk resolves it): a root that
        # resolves elsewhere now had a link swapped in for it or for a folder above it.
        raise ForbiddenError(f"{where}: its dataset's folder {sample.root} now leads to {root}")
    try:
        fd = _open_inside(sample.abs_path, root, where)
    except (FileNotFoundError, NotADirectoryError) as e:
        raise NotFoundError(f"{where} is no longer on disk") from e
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise ForbiddenError(f"{where}: too many levels of links") from e
        raise ForbiddenError(f"{where} cannot be opened: {e.strerror or e}") from e
    return os.fdopen(fd, "rb")


def _open_inside(path: str, root: str, where: str) -> int:
    o_path = getattr(os, "O_PATH", 0)
    via_proc = bool(o_path) and os.path.isdir("/proc/self/fd")
    st_real = None
    if via_proc:
        # Linux: an O_PATH handle opens nothing (no FIFO waits, no device side effects);
        # its /proc link names the file it really is. Reopen through that link, the same
        # inode, only once the check passed.
        handle = os.open(path, o_path | os.O_CLOEXEC)
        try:
            st = os.fstat(handle)
            _check_regular(st, where)
            _check_inside(os.readlink(f"/proc/self/fd/{handle}"), root, where)
            fd = os.open(f"/proc/self/fd/{handle}", os.O_RDONLY | os.O_CLOEXEC)
        finally:
            os.close(handle)
    else:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0))
        try:
            st = os.fstat(fd)
            _check_regular(st, where)
            real = os.path.realpath(path)
            _check_inside(real, root, where)
            st_real = os.stat(real)
        except BaseException:
            os.close(fd)
            raise
    try:
        opened = os.fstat(fd)
        if (opened.st_dev, opened.st_ino) != (st.st_dev, st.st_ino) or (
            st_real is not None and (st_real.st_dev, st_real.st_ino) != (st.st_dev, st.st_ino)
        ):
            raise ForbiddenError(f"{where} changed while it was being opened")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _check_regular(st: os.stat_result, where: str) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise ForbiddenError(f"{where} is no longer a regular file")


def _check_inside(real: str, root: str, where: str) -> None:
    if not is_inside(real, root):
        raise ForbiddenError(f"{where} now resolves outside its dataset's folder; refused")


class OpenFileResponse(Response):
    """Sends a file opened by `open_sample_file` (never reopened by name), then closes it."""

    chunk_size = 256 << 10

    def __init__(
        self,
        file: IO[bytes],
        *,
        media_type: str,
        filename: str,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.file = file
        self.status_code = 200
        self.media_type = media_type
        self.background = None
        st = os.fstat(file.fileno())
        self.size = st.st_size
        self.init_headers(headers)
        self.headers["content-length"] = str(st.st_size)
        self.headers["last-modified"] = formatdate(st.st_mtime, usegmt=True)
        self.headers["content-disposition"] = _disposition(filename)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        gone = asyncio.Event()

        async def watch() -> None:  # the client left (or was dropped): stop reading the file
            while (await receive())["type"] != "http.disconnect":
                pass
            gone.set()

        watcher = asyncio.get_running_loop().create_task(watch())
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            left = self.size
            while left > 0 and not gone.is_set():
                chunk = await run_in_threadpool(self.file.read, min(self.chunk_size, left))
                if not chunk:  # the file shrank since: end here (the client sees it short)
                    break
                left -= len(chunk)
                await send({"type": "http.response.body", "body": chunk, "more_body": left > 0})
            if left == self.size == 0:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            watcher.cancel()
            self.file.close()


# -- samples under an object root (s3://bucket/prefix/) ---------------------------------------
# The server streams an object's bytes through the Rust reader rather than redirecting the
# browser to a presigned URL: the page then only ever loads images from its own origin (a
# `img-src 'self'` policy holds; no bucket host to allow), credentials and signed URLs (bearer
# tokens for their lifetime, kept in browser history and logs) never reach the browser, a
# browser that cannot reach the endpoint (a private VPC endpoint, MinIO on the server's
# network, moto on loopback in the tests) still sees the images, the URL stays stable so the
# browser's cache and our ETag work (a signature changes every time), and thumbnails, which
# the server must decode anyway, share the same path. A big original is sent in ranged reads
# of `OBJECT_CHUNK` bytes, so a request holds at most one chunk at a time.

#: An original is read in ranges of this many bytes (the first range answers most images
#: whole).
OBJECT_CHUNK = 4 << 20
#: The largest object a thumbnail is made of (it is read whole before decoding); larger is a
#: 422, and the original is still served.
MAX_THUMB_OBJECT_BYTES = 256 << 20
#: Object bytes all thumbnail reads in flight may hold together, and how many run at once.
OBJECT_READ_BUDGET = 512 << 20
OBJECT_READS = 32


def is_object_sample(sample: Sample) -> bool:
    """The sample lives in an object store (its root is an `s3://...` URI)."""
    return is_object_uri(sample.root)


def _object_error(sample: Sample, e: FastIndexError) -> FastIndexError:
    """A failed read as the client should see it: 404 when the object is gone, else the
    store's own error (502: the server works, the store behind it does not)."""
    msg = str(e)
    low = msg.lower()
    if any(k in low for k in ("not found", "nosuchkey", "404", "no such key")):
        return NotFoundError(f"sample {sample.id}: {sample.path} is no longer in the bucket")
    return e


def read_sample_object(sample: Sample, start: int | None = None, end: int | None = None) -> bytes:
    """Bytes `[start, end)` of the sample's object (all of it by default). Blocks (the
    GIL is released while the request runs).

    Raises:
        NotFoundError: the object is gone.
        ObjectStoreError: the store cannot be reached, or refused the read.
    """
    from .. import _core

    try:
        return _core.read_object(object_uri(sample.root, sample.path), start, end)
    except FastIndexError as e:
        raise _object_error(sample, e) from e


def read_object_for_thumbnail(sample: Sample) -> IO[bytes]:
    """The sample's object, read whole into memory (at most `MAX_THUMB_OBJECT_BYTES`).

    Raises:
        ImageError: the object is too large to make a thumbnail of.
        NotFoundError, ObjectStoreError: as `read_sample_object`.
    """
    size = sample.size_bytes or 0
    if size > MAX_THUMB_OBJECT_BYTES:
        raise ImageError(
            f"sample {sample.id}: {sample.path}: cannot make a thumbnail of a {size:,}-byte "
            f"object (at most {MAX_THUMB_OBJECT_BYTES:,}; the original is still served)"
        )
    data = read_sample_object(sample, 0, MAX_THUMB_OBJECT_BYTES + 1)
    if len(data) > MAX_THUMB_OBJECT_BYTES:
        raise ImageError(
            f"sample {sample.id}: {sample.path}: cannot make a thumbnail of an object over "
            f"{MAX_THUMB_OBJECT_BYTES:,} bytes (the original is still served)"
        )
    return io.BytesIO(data)


class ObjectResponse(Response):
    """Sends a sample's object: `first` (read before answering, so that a missing object or
    an unreachable store is a JSON error, not a cut response), then the rest in ranged reads
    of `OBJECT_CHUNK` bytes. A read that fails part way ends the response short, as a file
    that shrank does."""

    def __init__(
        self,
        sample: Sample,
        first: bytes,
        *,
        media_type: str,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.sample = sample
        self.first = first
        self.status_code = 200
        self.media_type = media_type
        self.background = None
        self.init_headers(headers)
        # Short of a chunk: that is the whole object, its length known.
        self.whole = len(first) < OBJECT_CHUNK
        if self.whole:
            self.headers["content-length"] = str(len(first))
        if sample.mtime_ns:
            self.headers["last-modified"] = formatdate(sample.mtime_ns / 1e9, usegmt=True)
        self.headers["content-disposition"] = _disposition(sample.file_name)

    @classmethod
    def start(cls, sample: Sample, **kw: Any) -> ObjectResponse:
        """Read the first chunk and make the response. Blocks.

        Raises:
            NotFoundError, ObjectStoreError: as `read_sample_object`.
        """
        return cls(sample, read_sample_object(sample, 0, OBJECT_CHUNK), **kw)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        gone = asyncio.Event()

        async def watch() -> None:  # the client left: stop reading the object
            while (await receive())["type"] != "http.disconnect":
                pass
            gone.set()

        watcher = asyncio.get_running_loop().create_task(watch())
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            chunk, at = self.first, 0
            while True:
                at += len(chunk)
                last = len(chunk) < OBJECT_CHUNK or gone.is_set()
                await send({"type": "http.response.body", "body": chunk, "more_body": not last})
                if last:
                    break
                try:
                    chunk = await run_in_threadpool(
                        read_sample_object, self.sample, at, at + OBJECT_CHUNK
                    )
                except FastIndexError:  # gone or unreachable part way: end it short
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
                    break
        finally:
            watcher.cancel()


def _disposition(filename: str) -> str:
    # The name as bytes: a name that is not UTF-8 is sent byte for byte, %-escaped.
    quoted = quote(os.fsencode(filename))
    if quoted == filename:
        return f'inline; filename="{filename}"'
    return f"inline; filename*=utf-8''{quoted}"


# -- thumbnails ------------------------------------------------------------------------------
def open_image(
    source: str | IO[bytes],
    *,
    name: str | None = None,
    size: int = THUMB_SIZE,
    max_pixels: int = MAX_THUMB_PIXELS,
) -> Image.Image:
    """The image, its header read and (JPEG) its decode scale set, nothing decoded yet.

    Args:
        source: a path, or a file open for reading (left open).
        name: what error messages call it (default: the path).

    Raises:
        ImageError: not an image, or more than `max_pixels` to decode.
    """
    if name is None:
        name = source if isinstance(source, str) else "image"
    try:
        with warnings.catch_warnings():
            # A big image is a thumbnail's normal input; the pixel budget below decides.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            # Only the formats the indexer reads: a file swapped for, say, an EPS (which
            # Pillow renders with Ghostscript) is refused, not decoded.
            img = Image.open(source, formats=THUMB_FORMATS)
        img.draft("RGB", (size, size))  # JPEG: decode at 1/2..1/8 scale; others: no-op
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise ImageError(f"{name}: cannot make a thumbnail: {e}") from e
    w, h = img.size
    if w * h > max_pixels:
        img.close()
        raise ImageError(
            f"{name}: cannot make a thumbnail: {w}x{h} is {w * h:,} pixels, more than the "
            f"{max_pixels:,} a thumbnail may decode (the original is still served)"
        )
    return img


def decode_cost(img: Image.Image) -> int:
    """Pixels `render_thumbnail` decodes for `img` (after draft scaling)."""
    return int(img.size[0] * img.size[1])


def render_thumbnail(
    img: Image.Image, *, name: str = "image", size: int = THUMB_SIZE, quality: int = THUMB_QUALITY
) -> bytes:
    """A JPEG at most `size` pixels on its longest side, turned upright per EXIF orientation.

    Decodes `img` once (at its draft scale), reduces it in place, and only then turns it, so
    no full-size copy is ever made.

    Raises:
        ImageError: the file cannot be decoded.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img.thumbnail((size, size), Image.Resampling.BILINEAR, reducing_gap=2.0)
            small = _to_rgb(ImageOps.exif_transpose(img))
            buf = io.BytesIO()
            small.save(buf, "JPEG", quality=quality)
            return buf.getvalue()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise ImageError(f"{name}: cannot make a thumbnail: {e}") from e


def make_thumbnail(
    source: str | IO[bytes],
    *,
    size: int = THUMB_SIZE,
    quality: int = THUMB_QUALITY,
    max_pixels: int = MAX_THUMB_PIXELS,
) -> bytes:
    """A thumbnail of an image file (a path or a file open for reading). Blocks.

    Large JPEGs are decoded at a reduced scale (draft mode), other formats are decoded once
    and reduced; images over `max_pixels` are refused from their header.

    Raises:
        ImageError: the file cannot be decoded, or is too large.
    """
    with open_image(source, size=size, max_pixels=max_pixels) as img:
        name = source if isinstance(source, str) else "image"
        return render_thumbnail(img, name=name, size=size, quality=quality)


class DecodeBudget:
    """At most `jobs` thumbnails decoding at once, together at most `pixels` pixels. Lives on
    the event loop: a request waits here before it takes a worker thread, so waiting requests
    hold no thread."""

    def __init__(self, *, pixels: int = THUMB_PIXEL_BUDGET, jobs: int = THUMB_WORKERS) -> None:
        self.pixels = pixels
        self.jobs = jobs
        self._free_pixels = pixels
        self._free_jobs = jobs
        self._waiters: list[asyncio.Future[None]] = []
        #: Decodes started (for tests and the benchmark).
        self.decodes = 0

    @property
    def busy(self) -> int:
        """Thumbnails being decoded now."""
        return self.jobs - self._free_jobs

    @contextlib.asynccontextmanager
    async def hold(self, pixels: int) -> AsyncIterator[None]:
        pixels = min(pixels, self.pixels)  # one image may use the whole budget, not more
        while not (self._free_jobs > 0 and self._free_pixels >= pixels):
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            finally:
                self._waiters.remove(waiter)
        # No await between the check above and this: the event loop runs one task at a time.
        self._free_jobs -= 1
        self._free_pixels -= pixels
        self.decodes += 1
        try:
            yield
        finally:
            self._free_jobs += 1
            self._free_pixels += pixels
            for w in self._waiters:  # each wakes and checks again
                if not w.done():
                    w.set_result(None)


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("RGB", "L"):
        return img
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        # 16-bit and float greyscale: scale into 8 bits from the image's own range.
        lo, hi = cast("tuple[float, float]", img.getextrema())
        span = float(hi - lo) or 1.0
        return img.convert("F").point(lambda v: (v - lo) * 255.0 / span).convert("L")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        bg = Image.new("RGB", rgba.size, (255, 255, 255))
        bg.paste(rgba, mask=rgba.getchannel("A"))
        return bg
    return img.convert("RGB")


class ThumbnailCache:
    """Least recently used thumbnails, at most `max_bytes` of them. Thread-safe."""

    def __init__(self, max_bytes: int = 64 << 20) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[tuple[int, int | None, int | None], bytes] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: tuple[int, int | None, int | None]) -> bytes | None:
        with self._lock:
            data = self._items.get(key)
            if data is not None:
                self._items.move_to_end(key)
            return data

    def put(self, key: tuple[int, int | None, int | None], data: bytes) -> None:
        if len(data) > self.max_bytes:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= len(old)
            self._items[key] = data
            self._bytes += len(data)
            while self._bytes > self.max_bytes:
                _, dropped = self._items.popitem(last=False)
                self._bytes -= len(dropped)

    def __len__(self) -> int:
        return len(self._items)

    @property
    def nbytes(self) -> int:
        return self._bytes
