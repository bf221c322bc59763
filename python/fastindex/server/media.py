"""Thumbnails (small JPEGs made on demand, kept in a bounded in-memory cache) and the content
types of originals. Files are reached only through indexed samples (see `ServerState`)."""

from __future__ import annotations

import io
import threading
import warnings
from collections import OrderedDict
from typing import cast

from PIL import Image, ImageOps

from ..errors import ImageError
from ..sample import Sample

#: The longest side of a thumbnail, in pixels.
THUMB_SIZE = 320
#: JPEG quality of thumbnails.
THUMB_QUALITY = 80

#: `Sample.format` (as the header probe names it) to the content type of the original file.
CONTENT_TYPES: dict[str, str] = {
    "JPEG": "image/jpeg",
    "PNG": "image/png",
    "GIF": "image/gif",
    "BMP": "image/bmp",
    "WEBP": "image/webp",
    "TIFF": "image/tiff",
}


def content_type(sample: Sample) -> str:
    return CONTENT_TYPES.get((sample.format or "").upper(), "application/octet-stream")


def cache_key(sample: Sample) -> tuple[int, int | None, int | None]:
    """Changes when the file the sample was indexed from changes (as far as the store knows)."""
    return (sample.id, sample.size_bytes, sample.mtime_ns)


def etag(sample: Sample) -> str:
    return f'"{sample.id}-{sample.size_bytes or 0}-{sample.mtime_ns or 0}"'


def make_thumbnail(path: str, *, size: int = THUMB_SIZE, quality: int = THUMB_QUALITY) -> bytes:
    """A JPEG at most `size` pixels on its longest side, turned upright per EXIF orientation.

    Large JPEGs are decoded at a reduced scale (draft mode), so this stays fast for photos.

    Raises:
        ImageError: the file cannot be decoded.
    """
    try:
        with warnings.catch_warnings():
            # A big image is a thumbnail's normal input, not a decompression bomb here:
            # draft mode decodes JPEGs at 1/8 scale and the result is small.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as src:
                src.draft("RGB", (size, size))
                img = ImageOps.exif_transpose(src)
                img.thumbnail((size, size), Image.Resampling.BILINEAR, reducing_gap=2.0)
                img = _to_rgb(img)
                buf = io.BytesIO()
                img.save(buf, "JPEG", quality=quality)
                return buf.getvalue()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise ImageError(f"{path}: cannot make a thumbnail: {e}") from e


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
