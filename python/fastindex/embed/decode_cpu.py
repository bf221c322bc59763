"""Decoding on CPU threads: JPEGs with libjpeg-turbo (simplejpeg, DCT-domain downscaling),
everything else (and CMYK JPEGs) with Pillow, resized and cropped into the model's input."""

from __future__ import annotations

import io
import math
from typing import TYPE_CHECKING, Any

import numpy as np

from .orientation import _PIL_ORIENT, _orient, _swaps
from .read import _JPEG_MAGIC, _DecodeError, _reason
from .transform import _Plan, _Preprocess

if TYPE_CHECKING:
    from PIL import Image


def _decode_into(
    data: bytes | bytearray, orientation: int, pre: _Preprocess, out: np.ndarray
) -> str:
    """Decode one image into `out` (`(h, w, 3)` uint8, the model's input size); returns the
    decoder that did it ("jpeg" or "pil"). Raises `_DecodeError` with a one-line reason."""
    if bytes(data[:3]) == _JPEG_MAGIC:
        try:
            _jpeg_into(data, orientation, pre, out)
            return "jpeg"
        except _NotForTurbo:
            pass
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.format == "JPEG":
                # Let libjpeg scale in the DCT domain here too (CMYK and other rare JPEGs).
                w, h = im.size
                _, rh, rw = _plan_stored(pre, h, w, orientation)
                im.draft("RGB", (rw, rh))
            _pil_into(im, orientation, pre, out)
    except _DecodeError:
        raise
    except Exception as e:
        raise _DecodeError(_reason(e)) from None
    return "pil"


def _plan_stored(pre: _Preprocess, h: int, w: int, orientation: int) -> tuple[_Plan, int, int]:
    """The plan for a stored `h` x `w` image shown with `orientation`, and its resized height
    and width in the stored orientation (what a DCT-scaled decode must keep)."""
    p = pre.plan(*((w, h) if _swaps(orientation) else (h, w)))
    rh, rw = (p.rw, p.rh) if _swaps(orientation) else (p.rh, p.rw)
    return p, rh, rw


class _NotForTurbo(Exception):
    """A JPEG that libjpeg-turbo's RGB output does not serve well (CMYK): use Pillow."""


def _jpeg_into(
    data: bytes | bytearray, orientation: int, pre: _Preprocess, out: np.ndarray
) -> None:
    import simplejpeg  # type: ignore[import-untyped]

    try:
        h, w, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError as e:
        raise _DecodeError(_reason(e)) from None
    if colorspace in ("CMYK", "YCCK"):
        raise _NotForTurbo
    p, need_h, need_w = _plan_stored(pre, h, w, orientation)
    # The smallest power-of-two DCT scale that keeps the resized size (1/2, 1/4 and 1/8
    # are libjpeg-turbo's fast paths; 3/8, 5/8... cost more than a full decode).
    scale = 1
    while (
        scale < 8 and math.ceil(h / (scale * 2)) >= need_h and math.ceil(w / (scale * 2)) >= need_w
    ):
        scale *= 2
    try:
        a = simplejpeg.decode_jpeg(
            data,
            colorspace="RGB",
            min_height=math.ceil(h / scale),
            min_width=math.ceil(w / scale),
        )
    except ValueError as e:
        raise _DecodeError(_reason(e)) from None
    _array_into(_orient(a, orientation), pre, p, out)


def _pil_into(im: Image.Image, orientation: int, pre: _Preprocess, out: np.ndarray) -> None:
    from PIL import Image

    im.load()
    if orientation != 1:
        im = im.transpose(_PIL_ORIENT[orientation])
    if im.mode != "RGB":
        im = im.convert("RGB")
    w, h = im.size
    p = pre.plan(h, w)
    _resize_into(im, p, pre, out, Image)


def _array_into(a: np.ndarray, pre: _Preprocess, p: _Plan, out: np.ndarray) -> None:
    from PIL import Image

    im = Image.fromarray(np.ascontiguousarray(a), "RGB")
    _resize_into(im, p, pre, out, Image)


def _resize_into(im: Image.Image, p: _Plan, pre: _Preprocess, out: np.ndarray, Image: Any) -> None:
    """Resize `im` (whatever its size: full or DCT-scaled) to the plan's resized size and copy
    the planned crop into `out`, padding with the fill colour. Only the cropped region is
    resampled (`box`), which is what resizing everything and then cropping gives."""
    w, h = im.size
    sx, sy = w / p.rw, h / p.rh
    box = (
        p.left * sx,
        p.top * sy,
        min(w, (p.left + p.cw) * sx),
        min(h, (p.top + p.ch) * sy),
    )
    resample = (
        Image.Resampling.BILINEAR if pre.interpolation == "bilinear" else Image.Resampling.BICUBIC
    )
    if (w, h) == (p.cw, p.ch) and box == (0, 0, w, h):
        r = im
    else:
        r = im.resize((p.cw, p.ch), resample, box=box, reducing_gap=None)
    if p.padded:
        out[...] = pre.fill
    out[p.dy : p.dy + p.ch, p.dx : p.dx + p.cw] = np.asarray(r)
