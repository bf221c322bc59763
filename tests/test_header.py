"""The header probe: sizes, formats and EXIF orientation agree with Pillow, and no input crashes
or hangs the parser.

Pillow's `Image.open(p).size` and `.format` are the spec for every file Pillow opens.
"""

from __future__ import annotations

import io
import random
import struct
from pathlib import Path
from typing import Any

import fastindex
import PIL
import pytest
from fastindex import _core
from hypothesis import example, given, settings
from hypothesis import strategies as st
from PIL import Image
from testkit import (
    answer,
    bmp_top_down,
    check_against_pillow,
    encode,
    exif_block,
    exif_with_thumbnail,
    gif_first_frame_beyond_screen,
    icc_blob,
    insert_app1,
    noise,
    pillow_open,
    pillow_orientation,
    probe,
    probe_path,
    tiff_by_hand,
    write,
)

PILLOW_MAJOR = int(PIL.__version__.split(".")[0])


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder for files written by hypothesis examples (module scope: no per-example
    fixture)."""
    return tmp_path_factory.mktemp("headers")


def assert_agrees(data: bytes, folder: Path, name: str = "image") -> dict[str, Any]:
    """fastindex reads `data` as Pillow does, from memory and from a file."""
    ref = pillow_open(data)
    assert ref is not None, "Pillow must open the generated image"
    got = probe(data)
    assert answer(got) == ref
    path = write(folder / name, data)
    from_file = probe_path(path)
    assert answer(from_file) == ref
    assert from_file == got
    assert got is not None
    return got


# -- generated images of every format, many sizes ---------------------------------------------
def _side() -> st.SearchStrategy[int]:
    return st.one_of(
        st.integers(1, 40),
        st.integers(1, 1200),
        st.sampled_from([255, 256, 257, 1023, 1024, 1025, 4095, 4096]),
    )


@st.composite
def images(draw: st.DrawFn) -> tuple[str, bytes]:
    """`(description, encoded bytes)` of an image Pillow writes, in any supported format."""
    kind = draw(st.sampled_from(["JPEG", "PNG", "APNG", "GIF", "BMP", "WEBP", "TIFF"]))
    w = draw(_side())
    h = max(1, min(draw(_side()), 1_200_000 // w))  # keep encoding quick
    seed = draw(st.integers(0, 3))
    opts: dict[str, Any] = {}
    if kind == "JPEG":
        mode = draw(st.sampled_from(["L", "RGB", "CMYK"]))
        opts["progressive"] = draw(st.booleans())
        opts["quality"] = draw(st.sampled_from([30, 75, 95]))
        if draw(st.booleans()):
            exif = Image.Exif()
            exif[0x0112] = draw(st.integers(1, 8))
            opts["exif"] = exif.tobytes()
        data = encode(noise((w, h), mode, seed), "JPEG", **opts)
    elif kind in ("PNG", "APNG"):
        mode = draw(st.sampled_from(["1", "L", "LA", "P", "RGB", "RGBA", "I;16"]))
        im = noise((w, h), mode, seed)
        if kind == "APNG":
            second = noise((w, h), mode, seed + 1)
            data = encode(im, "PNG", save_all=True, append_images=[second])
        else:
            data = encode(im, "PNG")
    elif kind == "GIF":
        mode = draw(st.sampled_from(["P", "L", "RGB"]))
        im = noise((w, h), mode, seed)
        if draw(st.booleans()):
            data = encode(im, "GIF", save_all=True, append_images=[noise((w, h), mode, seed + 1)])
        else:
            data = encode(im, "GIF")
    elif kind == "BMP":
        mode = draw(st.sampled_from(["1", "L", "P", "RGB", "RGBA"]))
        data = encode(noise((w, h), mode, seed), "BMP")
    elif kind == "WEBP":
        mode = draw(st.sampled_from(["RGB", "RGBA"]))
        opts["lossless"] = draw(st.booleans())
        opts["method"] = 0
        im = noise((w, h), mode, seed)
        if draw(st.booleans()):
            opts.update(save_all=True, append_images=[noise((w, h), mode, seed + 1)])
        data = encode(im, "WEBP", **opts)
    else:
        mode = draw(st.sampled_from(["1", "L", "RGB", "RGBA", "CMYK", "I;16", "I;16B", "F"]))
        compression = draw(st.sampled_from(["raw", "tiff_lzw", "packbits", "tiff_adobe_deflate"]))
        opts["compression"] = None if compression == "raw" else compression
        if mode == "1" and draw(st.booleans()):
            opts["compression"] = "group4"
        if draw(st.booleans()):
            opts["tiffinfo"] = {274: draw(st.integers(1, 8))}
        im = noise((w, h), mode, seed)
        if draw(st.booleans()):
            opts.update(save_all=True, append_images=[noise((h, w), mode, seed + 1)])
        data = encode(im, "TIFF", **opts)
    return f"{kind} {mode} {w}x{h} {opts.get('compression', '')}", data


@settings(max_examples=150)
@given(images())
def test_generated_images_agree_with_pillow(scratch: Path, case: tuple[str, bytes]) -> None:
    _, data = case
    assert_agrees(data, scratch)


@settings(max_examples=40)
@given(
    size=st.tuples(st.integers(1, 300), st.integers(1, 300)),
    big_endian=st.booleans(),
    long_sizes=st.booleans(),
    orientation=st.one_of(st.none(), st.integers(0, 9)),
)
def test_tiff_either_byte_order_agrees_with_pillow(
    scratch: Path,
    size: tuple[int, int],
    big_endian: bool,
    long_sizes: bool,
    orientation: int | None,
) -> None:
    if orientation in (5, 6, 7, 8) and PILLOW_MAJOR < 11:
        pytest.skip("Pillow < 11 does not turn the size of a TIFF by its orientation")
    data = tiff_by_hand(size, big_endian=big_endian, orientation=orientation, long_sizes=long_sizes)
    got = assert_agrees(data, scratch)
    turned = orientation in (5, 6, 7, 8)
    assert (got["width"], got["height"]) == (size[::-1] if turned else size)


@pytest.mark.parametrize(
    ("fmt", "size", "mode"),
    [
        ("JPEG", (65500, 1), "L"),
        ("JPEG", (1, 65500), "L"),
        ("PNG", (100_000, 1), "1"),
        ("GIF", (65535, 1), "P"),
        ("BMP", (70_000, 1), "1"),
        ("WEBP", (16383, 1), "RGB"),
        ("TIFF", (70_000, 1), "1"),
    ],
)
def test_extreme_sides(tmp_path: Path, fmt: str, size: tuple[int, int], mode: str) -> None:
    got = assert_agrees(encode(Image.new(mode, size), fmt), tmp_path)
    assert (got["width"], got["height"]) == size


# -- the cases the issue names ----------------------------------------------------------------
def _special_cases() -> dict[str, bytes]:
    rgb = noise((640, 480))
    thumb = encode(noise((160, 120)), "JPEG")
    big_thumb = encode(noise((320, 240), seed=3), "JPEG", quality=95)
    assert len(big_thumb) > 8192  # the main SOF is then far behind the first 4 KiB read
    cmyk = noise((33, 17), "CMYK")
    return {
        "jpeg baseline": encode(rgb, "JPEG"),
        "jpeg progressive": encode(rgb, "JPEG", progressive=True),
        "jpeg grey progressive": encode(noise((31, 9), "L"), "JPEG", progressive=True),
        "jpeg cmyk": encode(cmyk, "JPEG"),
        "jpeg 200KB icc": encode(rgb, "JPEG", icc_profile=icc_blob()),
        "jpeg 200KB icc progressive": encode(rgb, "JPEG", icc_profile=icc_blob(), progressive=True),
        "jpeg exif thumbnail": insert_app1(
            encode(rgb, "JPEG"), b"Exif\0\0" + exif_with_thumbnail(6, thumb)
        ),
        "jpeg large exif thumbnail": insert_app1(
            encode(rgb, "JPEG"), b"Exif\0\0" + exif_with_thumbnail(8, big_thumb)
        ),
        "jpeg thumbnail and icc": insert_app1(
            encode(rgb, "JPEG", icc_profile=icc_blob()),
            b"Exif\0\0" + exif_with_thumbnail(3, big_thumb),
        ),
        "jpeg xmp before exif": insert_app1(
            insert_app1(encode(rgb, "JPEG"), b"Exif\0\0" + exif_block(5, big_endian=True)),
            b"http://ns.adobe.com/xap/1.0/\0<x:xmpmeta tiff:Orientation='8'/>",
        ),
        "mpo (a JPEG to fastindex)": encode(
            rgb, "MPO", save_all=True, append_images=[noise((640, 480), seed=5)]
        ),
        "png": encode(rgb, "PNG"),
        "png 16-bit": encode(Image.new("I;16", (70, 3)), "PNG"),
        "apng": encode(rgb, "PNG", save_all=True, append_images=[noise((640, 480), seed=1)]),
        "png with exif": encode(rgb, "PNG", exif=Image.Exif().tobytes()),
        "gif": encode(rgb.convert("P"), "GIF"),
        "gif animated": encode(
            rgb.convert("P"), "GIF", save_all=True, append_images=[noise((640, 480), "P", 2)]
        ),
        "gif frame beyond screen": gif_first_frame_beyond_screen((90, 70), (40, 30)),
        "gif frame beyond screen, one side": gif_first_frame_beyond_screen((90, 20), (40, 30)),
        "bmp": encode(rgb, "BMP"),
        "bmp 1-bit": encode(rgb.convert("1"), "BMP"),
        "bmp rgba": encode(rgb.convert("RGBA"), "BMP"),
        "bmp top-down": bmp_top_down((123, 45)),
        "bmp top-down palette": bmp_top_down((20, 300), "P"),
        "webp lossy": encode(rgb, "WEBP"),
        "webp lossless": encode(rgb, "WEBP", lossless=True),
        "webp alpha (VP8X)": encode(rgb.convert("RGBA"), "WEBP"),
        "webp animated (VP8X)": encode(
            rgb, "WEBP", save_all=True, append_images=[noise((640, 480), seed=4)]
        ),
        "webp icc (VP8X)": encode(rgb, "WEBP", icc_profile=icc_blob(5000)),
        "tiff little-endian": encode(rgb, "TIFF"),
        "tiff big-endian (I;16B)": encode(Image.new("I;16B", (77, 33)), "TIFF"),
        "tiff big-endian by hand": tiff_by_hand((301, 7), big_endian=True),
        "tiff multipage": encode(
            rgb, "TIFF", save_all=True, append_images=[noise((10, 1000)), noise((5, 5))]
        ),
        "tiff lzw": encode(rgb, "TIFF", compression="tiff_lzw"),
        "tiff jpeg": encode(rgb, "TIFF", compression="jpeg"),
        "tiff group4": encode(rgb.convert("1"), "TIFF", compression="group4"),
        "bigtiff": encode(rgb, "TIFF", big_tiff=True),
        "tiff orientation 6": encode(rgb, "TIFF", tiffinfo={274: 6}),
        "tiff orientation 3": encode(rgb, "TIFF", tiffinfo={274: 3}),
    }


SPECIAL = _special_cases()


@pytest.mark.parametrize("name", list(SPECIAL))
def test_named_cases_agree_with_pillow(tmp_path: Path, name: str) -> None:
    if name == "tiff orientation 6" and PILLOW_MAJOR < 11:
        pytest.skip("Pillow < 11 does not turn the size of a TIFF by its orientation")
    got = assert_agrees(SPECIAL[name], tmp_path, name.replace(" ", "_"))
    if got["format"] == "JPEG":
        assert got["orientation"] == pillow_orientation(SPECIAL[name])


def test_known_answers() -> None:
    """A few answers spelled out, so a shared mistake with Pillow could not hide."""
    sizes = {name: (probe(SPECIAL[name]) or {}).get("width") for name in SPECIAL}
    assert sizes["jpeg exif thumbnail"] == 640  # not the thumbnail's 160
    assert sizes["gif frame beyond screen"] == 90
    assert probe(SPECIAL["gif frame beyond screen, one side"]) == {
        "width": 90,
        "height": 30,
        "format": "GIF",
        "orientation": None,
    }
    assert probe(SPECIAL["bmp top-down"]) == {
        "width": 123,
        "height": 45,
        "format": "BMP",
        "orientation": None,
    }
    assert (probe(SPECIAL["jpeg thumbnail and icc"]) or {}).get("orientation") == 3
    # a PNG named .jpg is a PNG: the format comes from the content
    assert (probe(SPECIAL["png"]) or {}).get("format") == "PNG"


# -- EXIF orientation -------------------------------------------------------------------------
@settings(max_examples=60)
@given(
    orientation=st.integers(1, 8),
    how=st.sampled_from(["pillow", "le short", "be short", "le long", "be long", "thumbnail"]),
    icc=st.booleans(),
    progressive=st.booleans(),
)
def test_jpeg_orientation_equals_pillow_getexif(
    scratch: Path, orientation: int, how: str, icc: bool, progressive: bool
) -> None:
    opts: dict[str, Any] = {"progressive": progressive}
    if icc:
        opts["icc_profile"] = icc_blob(70_000)
    base = noise((48, 32))
    if how == "pillow":
        exif = Image.Exif()
        exif[0x0112] = orientation
        data = encode(base, "JPEG", exif=exif.tobytes(), **opts)
    else:
        if how == "thumbnail":
            block = exif_with_thumbnail(orientation, encode(noise((16, 12)), "JPEG"))
        else:
            block = exif_block(orientation, big_endian=how[:2] == "be", long=how.endswith("long"))
        data = insert_app1(encode(base, "JPEG", **opts), b"Exif\0\0" + block)
    got = assert_agrees(data, scratch)
    assert got["orientation"] == orientation == pillow_orientation(data)
    # the size is as stored, as Pillow reports it for JPEG
    assert (got["width"], got["height"]) == (48, 32)


def test_orientation_absent_or_invalid_is_none() -> None:
    plain = encode(noise((10, 10)), "JPEG")
    assert (probe(plain) or {}).get("orientation", "x") is None
    assert pillow_orientation(plain) is None
    no_tag = insert_app1(plain, b"Exif\0\0" + exif_block(None))
    assert (probe(no_tag) or {}).get("orientation", "x") is None
    # Pillow reports any number; fastindex keeps only the eight EXIF orientations
    for bad in (0, 9, 300):
        data = insert_app1(plain, b"Exif\0\0" + exif_block(bad))
        assert pillow_orientation(data) == bad
        assert (probe(data) or {}).get("orientation", "x") is None
    # only the first Exif block counts, as in Pillow
    two = insert_app1(insert_app1(plain, b"Exif\0\0" + exif_block(5)), b"Exif\0\0" + exif_block(2))
    assert (probe(two) or {}).get("orientation") == 2 == pillow_orientation(two)


def test_orientation_is_only_for_jpeg() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6
    for fmt in ("PNG", "WEBP"):
        data = encode(noise((20, 10)), fmt, exif=exif.tobytes())
        got = probe(data)
        assert got == {"width": 20, "height": 10, "format": fmt, "orientation": None}


# -- what is not an image ---------------------------------------------------------------------
def test_unreadable_paths_raise_image_error(tmp_path: Path) -> None:
    for path in (tmp_path / "missing.jpg", tmp_path):
        with pytest.raises(fastindex.ImageError, match=str(path)):
            fastindex.image_size(path)
        with pytest.raises(fastindex.ImageError):
            fastindex.probe_image(path)
    empty = write(tmp_path / "empty.png", b"")
    with pytest.raises(fastindex.ImageError, match=r"empty\.png"):
        fastindex.image_size(empty)
    text = write(tmp_path / "notes.jpg", b"just some text, not a JPEG\n")
    with pytest.raises(fastindex.ImageError, match="not a JPEG, PNG, GIF, BMP, WebP or TIFF"):
        fastindex.image_size(text)
    with pytest.raises(fastindex.ImageError):
        _core.probe_bytes(b"")


# -- robustness: random bytes, cuts, bit flips ------------------------------------------------
MAGICS = [
    b"\xff\xd8\xff",
    b"\xff\xd8\xff\xe1",
    b"\x89PNG\r\n\x1a\n",
    b"\x89PNG\r\n\x1a\n\x00\x00\x00\x0dIHDR",
    b"GIF89a",
    b"GIF87a",
    b"BM",
    b"RIFF\x00\x01\x00\x00WEBPVP8 ",
    b"RIFF\x00\x01\x00\x00WEBPVP8L",
    b"RIFF\x00\x01\x00\x00WEBPVP8X",
    b"II*\x00",
    b"MM\x00*",
    b"II+\x00\x08\x00\x00\x00",
    b"MM\x00+",
    b"II\x00*",
    b"MM*\x00",
]


@pytest.mark.timeout(120)
@settings(max_examples=400)
@given(
    st.one_of(st.binary(max_size=600), st.tuples(st.sampled_from(MAGICS), st.binary(max_size=400)))
)
@example(b"")
@example(b"\xff\xd8\xff")
@example(b"II*\x00\x00\x00\x00\x00")
@example(b"II*\x00\x08\x00\x00\x00\xff\xff")
@example(b"II+\x00\x08\x00\x00\x00\x10\x00\x00\x00\x00\x00\x00\x00" + b"\xff" * 8)
def test_random_bytes_never_crash(data: bytes | tuple[bytes, bytes]) -> None:
    if isinstance(data, tuple):
        data = data[0] + data[1]
    check_against_pillow(data)


def _cut_corpus() -> dict[str, bytes]:
    """Small valid files of every variant, and the large JPEGs of the named cases."""
    small = noise((37, 23))
    exif = Image.Exif()
    exif[0x0112] = 6
    corpus = {
        "jpeg": encode(small, "JPEG"),
        "jpeg progressive": encode(small, "JPEG", progressive=True),
        "jpeg exif": encode(small, "JPEG", exif=exif.tobytes()),
        "jpeg thumbnail": insert_app1(
            encode(small, "JPEG"),
            b"Exif\0\0" + exif_with_thumbnail(6, encode(noise((8, 6)), "JPEG")),
        ),
        "jpeg cmyk": encode(noise((9, 5), "CMYK"), "JPEG"),
        "png": encode(small, "PNG"),
        "png palette": encode(small.convert("P"), "PNG"),
        "apng": encode(small, "PNG", save_all=True, append_images=[noise((37, 23), seed=1)]),
        "gif": encode(small.convert("P"), "GIF"),
        "gif beyond screen": gif_first_frame_beyond_screen((30, 20), (10, 10)),
        "bmp": encode(noise((7, 5)), "BMP"),
        "bmp 1-bit": encode(noise((9, 9), "1"), "BMP"),
        "bmp top-down": bmp_top_down((6, 4)),
        "webp lossy": encode(small, "WEBP"),
        "webp lossless": encode(small, "WEBP", lossless=True),
        "webp alpha": encode(small.convert("RGBA"), "WEBP"),
        "webp animated": encode(
            small, "WEBP", save_all=True, append_images=[noise((37, 23), seed=2)]
        ),
        "tiff": encode(noise((7, 5)), "TIFF"),
        "tiff be": tiff_by_hand((9, 4), big_endian=True, orientation=1),
        "tiff orientation": tiff_by_hand((9, 4), big_endian=False, orientation=6),
        "tiff multipage": encode(
            noise((7, 5)), "TIFF", save_all=True, append_images=[noise((3, 3))]
        ),
        "bigtiff": encode(noise((7, 5)), "TIFF", big_tiff=True),
    }
    if PILLOW_MAJOR < 11:
        del corpus["tiff orientation"]
    return corpus


CUT_CORPUS = _cut_corpus()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", list(CUT_CORPUS))
def test_every_cut_point(tmp_path: Path, name: str) -> None:
    data = CUT_CORPUS[name]
    full = answer(probe(data))
    assert full == pillow_open(data)
    for cut in range(len(data)):
        check_against_pillow(data[:cut], full=full)
    # the same from files (positioned reads, not a slice), at some of the cuts
    path = tmp_path / "cut"
    for cut in range(0, len(data), 7):
        path.write_bytes(data[:cut])
        assert probe_path(path) == probe(data[:cut])


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "name", ["jpeg 200KB icc", "jpeg thumbnail and icc", "apng", "tiff multipage"]
)
def test_cuts_of_large_files(tmp_path: Path, name: str) -> None:
    """Cuts around every segment of files larger than the first read, from files and bytes."""
    data = SPECIAL[name]
    full = answer(probe(data))
    marks = jpeg_segments(data) if name.startswith("jpeg") else []
    cuts = set(range(0, len(data), 1499)) | {m + d for m in marks for d in (-1, 0, 1, 2, 3, 4)}
    path = tmp_path / "cut"
    for cut in sorted(c for c in cuts if 0 <= c < len(data)):
        check_against_pillow(data[:cut], full=full)
        path.write_bytes(data[:cut])
        assert probe_path(path) == probe(data[:cut])


def jpeg_segments(data: bytes) -> list[int]:
    """Offsets of the markers of a well-formed JPEG, up to its first SOS."""
    marks, pos = [], 2
    while pos + 4 <= len(data) and data[pos] == 0xFF:
        marks.append(pos)
        if data[pos + 1] == 0xDA:
            break
        pos += 2 + struct.unpack(">H", data[pos + 2 : pos + 4])[0]
    return marks


def _mutate(data: bytes, rng: random.Random) -> bytes:
    out = bytearray(data)
    for _ in range(rng.choice([1, 1, 2, 3])):
        # mostly in the headers, where the parser looks
        pos = rng.randrange(min(len(out), 512)) if rng.random() < 0.85 else rng.randrange(len(out))
        r = rng.random()
        if r < 0.6:
            out[pos] ^= 1 << rng.randrange(8)
        elif r < 0.8:
            out[pos] = rng.choice([0x00, 0xFF, 0x7F, 0x80, 0x01])
        else:
            out[pos] = rng.randrange(256)
    if rng.random() < 0.15:
        del out[rng.randrange(len(out)) :]
    return bytes(out)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", list(CUT_CORPUS))
def test_bit_flips_sweep(tmp_path: Path, name: str) -> None:
    """Many seeded mutations per file: cheap breadth. Some go through a file too, where the
    reads are positioned reads of the head and of a window, not slices."""
    rng = random.Random(f"flips-{name}")
    data = CUT_CORPUS[name]
    path = tmp_path / "mutant"
    for i in range(1500):
        mutant = _mutate(data, rng)
        check_against_pillow(mutant)
        if i % 10 == 0:
            path.write_bytes(mutant)
            assert probe_path(path) == probe(mutant)


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "name", ["jpeg 200KB icc", "jpeg large exif thumbnail", "jpeg thumbnail and icc"]
)
def test_flips_in_segment_headers_of_large_jpegs(tmp_path: Path, name: str) -> None:
    """Flips in the markers and lengths of segments that lie past the first 4 KiB read."""
    rng = random.Random(f"segments-{name}")
    data = SPECIAL[name]
    spots = [m + d for m in jpeg_segments(data) for d in range(4)]
    assert len(spots) >= 6 * 4
    path = tmp_path / "mutant"
    for _ in range(300):
        mutant = bytearray(data)
        for _ in range(rng.choice([1, 2])):
            mutant[rng.choice(spots)] ^= 1 << rng.randrange(8)
        check_against_pillow(bytes(mutant))
        path.write_bytes(mutant)
        assert probe_path(path) == probe(bytes(mutant))


@pytest.mark.timeout(120)
@settings(max_examples=300)
@given(
    name=st.sampled_from(sorted(CUT_CORPUS)),
    flips=st.lists(st.tuples(st.integers(0, 511), st.integers(0, 7)), min_size=1, max_size=4),
)
def test_bit_flips_hypothesis(name: str, flips: list[tuple[int, int]]) -> None:
    """Bit flips that hypothesis can shrink to the smallest failing set."""
    data = bytearray(CUT_CORPUS[name])
    for pos, bit in flips:
        data[pos % len(data)] ^= 1 << bit
    check_against_pillow(bytes(data))


def test_hostile_counts_end_quickly() -> None:
    """Entry counts and lengths that point far past the end: the walk ends with the data."""
    huge_ifd = (
        b"II+\x00\x08\x00\x00\x00\x10\x00\x00\x00\x00\x00\x00\x00" + b"\xff" * 8 + bytes(2000)
    )
    assert probe(huge_ifd) is None
    many_entries = b"II*\x00\x08\x00\x00\x00\xff\xff" + struct.pack("<HHII", 256, 3, 1, 5) * 3000
    assert probe(many_entries) is None  # no height anywhere
    jpeg_len = b"\xff\xd8\xff\xe1\xff\xff" + bytes(100)
    assert probe(jpeg_len) is None
    png_len = b"\x89PNG\r\n\x1a\n\xff\xff\xff\xfftEXt" + bytes(100)
    assert probe(png_len) is None
    gif_blocks = b"GIF89a\x01\x00\x01\x00\x00\x00\x00" + b"!\xf9" + b"\xff" * 5000
    assert probe(gif_blocks) is None
    # and one that reads: many junk bytes before a JPEG marker
    ok = encode(noise((5, 3)), "JPEG")
    assert answer(probe(ok[:2] + b"\x00" * 10_000 + ok[2:])) == pillow_open(
        ok[:2] + b"\x00" * 10_000 + ok[2:]
    )


def test_pillow_reference_sanity() -> None:
    """The reference helper itself: it reads what Pillow reads, and None where it refuses."""
    data = encode(Image.new("RGB", (3, 2)), "PNG")
    assert pillow_open(data) == ((3, 2), "PNG")
    assert pillow_open(b"nope") is None
    assert pillow_open(io.BytesIO(data).getvalue()[:10]) is None
