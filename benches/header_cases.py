"""Image files for the Rust header benchmarks, with Pillow's answer for each.

`python3 benches/header_cases.py OUT` writes, under OUT:
- `typical/`: one ordinary 640x480 file per format (what `cargo bench --bench header` times);
- `small/`: the same at 64x48 (linked many times into the tree the walk benchmark walks);
- `edge/`: files Pillow opens whose headers are unusual but legal (padding, chunk order,
  top-down or OS/2 bitmaps, frames larger than the screen, scale bits, ...);
- `cases.json`: for every file, Pillow's format and `Image.open(path).size` (or its error).

The Rust side (benches/header.rs) probes each file with fastindex and with the `imagesize`
crate and lists where they disagree, saying which one matches Pillow.
"""

from __future__ import annotations

import io
import json
import struct
import sys
import zlib
from collections.abc import Callable
from pathlib import Path

from PIL import Image


def _noise(w: int, h: int, mode: str = "RGB") -> Image.Image:
    return Image.effect_noise((w, h), 40).convert(mode)


def _save(im: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _exif(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


def everyday(w: int, h: int) -> dict[str, bytes]:
    """One ordinary file per format."""
    im = _noise(w, h)
    return {
        "jpeg.jpg": _save(im, "JPEG", quality=85, exif=_exif(1)),
        "png.png": _save(im, "PNG"),
        "gif.gif": _save(im.convert("P"), "GIF"),
        "bmp.bmp": _save(im, "BMP"),
        "webp.webp": _save(im, "WEBP", quality=80),
        "tiff.tif": _save(im, "TIFF", compression="tiff_lzw"),
    }


def _png_chunk(name: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + name + data + struct.pack(">I", zlib.crc32(name + data))


def _jpeg_after_app0(data: bytes, insert: bytes) -> bytes:
    """`insert` placed right behind the first segment (APP0) of a baseline JPEG."""
    assert data[2:4] == b"\xff\xe0"
    end = 4 + struct.unpack(">H", data[4:6])[0]
    return data[:end] + insert + data[end:]


def _bmp_top_down() -> bytes:
    data = bytearray(_save(_noise(33, 21), "BMP"))
    (h,) = struct.unpack_from("<i", data, 22)
    struct.pack_into("<i", data, 22, -h)
    return bytes(data)


def _bmp_os2() -> bytes:
    """A BITMAPCOREHEADER (OS/2 1.x) bitmap: 16-bit width and height at offsets 18 and 20."""
    w, h = 37, 19
    row = (w * 3 + 3) & ~3
    pixels = bytes(row * h)
    header = struct.pack("<IHHHH", 12, w, h, 1, 24)
    offset = 14 + len(header)
    return b"BM" + struct.pack("<IHHI", offset + len(pixels), 0, 0, offset) + header + pixels


def _gif_frame_beyond_screen() -> bytes:
    data = bytearray(_save(_noise(50, 40).convert("P"), "GIF"))
    struct.pack_into("<HH", data, 6, 20, 10)  # logical screen smaller than the frame
    return bytes(data)


def _png_chunk_before_ihdr() -> bytes:
    data = _save(_noise(45, 27), "PNG")
    return data[:8] + _png_chunk(b"prVt", b"\x00\x00\x10\x00\x00\x00\x20\x00") + data[8:]


def _webp_vp8_scale_bits() -> bytes:
    data = bytearray(_save(_noise(70, 30), "WEBP", quality=80))
    assert data[12:16] == b"VP8 "
    for at in (26, 28):  # width and height: 14 bits of size, 2 bits of upscaling
        (v,) = struct.unpack_from("<H", data, at)
        struct.pack_into("<H", data, at, v | 0x4000)
    return bytes(data)


def _tiff_with_entry_first(entry: bytes) -> bytes:
    """A little-endian TIFF whose IFD is rewritten at the end with `entry` put first."""
    data = bytearray(_save(_noise(24, 16), "TIFF"))
    assert data[:2] == b"II"
    (ifd,) = struct.unpack_from("<I", data, 4)
    (n,) = struct.unpack_from("<H", data, ifd)
    entries = data[ifd + 2 : ifd + 2 + 12 * n]
    next_ifd = data[ifd + 2 + 12 * n : ifd + 6 + 12 * n]
    at = len(data) + (len(data) & 1)
    out = data + b"\0" * (at - len(data))
    out += struct.pack("<H", n + 1) + entry + entries + next_ifd
    struct.pack_into("<I", out, 4, at)
    return bytes(out)


def _tiff_width_given_twice() -> bytes:
    """ImageWidth twice: 999 first, then the real 24 (Pillow keeps the first)."""
    return _tiff_with_entry_first(struct.pack("<HHII", 256, 4, 1, 999))


def _tiff_unknown_type_entry() -> bytes:
    """An entry of a type TIFF 6 does not define, before the others (Pillow skips it)."""
    return _tiff_with_entry_first(struct.pack("<HHII", 0x8001, 99, 1, 0))


def edge() -> dict[str, Callable[[], bytes]]:
    base_jpeg = _save(_noise(64, 48), "JPEG", quality=85)
    return {
        # Pillow skips 0xFF fill bytes before a marker (JPEG B.1.1.2).
        "jpeg_fill_bytes.jpg": lambda: _jpeg_after_app0(base_jpeg, b"\xff" * 5),
        # ... and stray non-marker bytes between segments.
        "jpeg_junk_between_segments.jpg": lambda: _jpeg_after_app0(base_jpeg, b"\x00\x13\x37"),
        "jpeg_exif_orientation_6.jpg": lambda: _save(_noise(64, 48), "JPEG", exif=_exif(6)),
        "jpeg_progressive.jpg": lambda: _save(_noise(64, 48), "JPEG", progressive=True),
        "jpeg_large_icc.jpg": lambda: _save(
            _noise(64, 48), "JPEG", icc_profile=bytes(range(256)) * 800
        ),
        "png_chunk_before_ihdr.png": _png_chunk_before_ihdr,
        "gif_frame_beyond_screen.gif": _gif_frame_beyond_screen,
        "bmp_top_down.bmp": _bmp_top_down,
        "bmp_os2_core_header.bmp": _bmp_os2,
        "webp_lossless.webp": lambda: _save(_noise(70, 30), "WEBP", lossless=True),
        "webp_extended_alpha.webp": lambda: _save(_noise(70, 30, "RGBA"), "WEBP"),
        "webp_vp8_scale_bits.webp": _webp_vp8_scale_bits,
        # Pillow writes big-endian ("MM") TIFF for 16-bit big-endian pixels.
        "tiff_big_endian.tif": lambda: _save(Image.new("I;16B", (24, 16)), "TIFF"),
        "tiff_bigtiff.tif": lambda: _save(_noise(24, 16), "TIFF", big_tiff=True),
        "tiff_width_given_twice.tif": _tiff_width_given_twice,
        "tiff_unknown_type_entry.tif": _tiff_unknown_type_entry,
    }


def pillow_answer(path: Path) -> dict[str, object]:
    try:
        with Image.open(path) as im:
            return {"format": im.format, "size": list(im.size)}
    except Exception as e:  # any refusal is Pillow's answer
        return {"format": None, "size": None, "error": f"{type(e).__name__}: {e}"}


def main(out: Path) -> None:
    cases = []
    files = [("typical", name, data) for name, data in everyday(640, 480).items()]
    files += [("small", name, data) for name, data in everyday(64, 48).items()]
    files += [("edge", name, make()) for name, make in edge().items()]
    for kind, name, data in files:
        path = out / kind / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        cases.append({"file": f"{kind}/{name}", "kind": kind, **pillow_answer(path)})
    (out / "cases.json").write_text(json.dumps(cases, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "bench-data/header_cases"))
