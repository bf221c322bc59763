"""Shared helpers for the tests: images made with Pillow (and a few built by hand where Pillow
cannot write the case), Pillow as the reference reader, and read-only looks into the store.

Everything here is plain functions so that hypothesis tests can use them without fixtures.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import struct
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fastindex
import pytest
from fastindex import _core
from PIL import Image

# The columns that migrations 5 -> 6 and 6 -> 7 add (with the index on one of them). A test
# that makes a store look older than that drops them first: the migration adds them again.
UNDO_LATER_COLUMNS = (
    "DROP INDEX samples_suspect",
    "ALTER TABLE samples DROP COLUMN lease_id",
    "ALTER TABLE samples DROP COLUMN attempts",
    "ALTER TABLE samples DROP COLUMN etag",
)


@contextlib.contextmanager
def tmpfs(where: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` (`mount -o size=`) mounted at `where` (made here) while the block runs,
    unmounted after. Skips the test where it cannot be mounted: that needs root (CI runs as
    root)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    where.mkdir(exist_ok=True)
    try:
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
            capture_output=True,
            text=True,
            check=False,
        )
    except FileNotFoundError:
        pytest.skip("no mount command here")
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield where
    finally:
        if subprocess.run(["umount", str(where)], capture_output=True, check=False).returncode:
            subprocess.run(["umount", "-l", str(where)], capture_output=True, check=False)


def too_deep_to_open(folder: Path) -> None:
    """Make, below `folder`, a chain of folders whose path is longer than PATH_MAX, with a PNG
    at the bottom: no one, root included, can open it by name (a folder the walk cannot read,
    even as root). Made with relative steps (`dir_fd`), as the kernel allows."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        for _ in range(18):  # 18 * 251 bytes > 4096
            os.mkdir("d" * 250, dir_fd=fd)
            nfd = os.open("d" * 250, os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = nfd
        out = os.open("lost.png", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
        os.write(out, small_png())
        os.close(out)
    finally:
        os.close(fd)


def resize_tmpfs(where: Path, size: str) -> None:
    """Give a tmpfs from `tmpfs` another size (room freed on a full disk)."""
    subprocess.run(["mount", "-o", f"remount,size={size}", str(where)], check=True)


#: The formats fastindex reads, by Pillow's names. Pillow calls a JPEG with an MP index "MPO";
#: fastindex reports what it is underneath, "JPEG".
FORMATS = ("JPEG", "PNG", "GIF", "BMP", "WEBP", "TIFF")
PILLOW_ALIASES = {"MPO": "JPEG"}


# -- Pillow, the reference --------------------------------------------------------------------
@contextlib.contextmanager
def _quiet_pillow() -> Iterator[None]:
    """Pillow as a user runs it: its warnings are not errors (the suite turns warnings into
    errors, which would change what Pillow does) and no decompression-bomb limit (the size in
    the header is the answer, however large)."""
    limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = limit


def pillow_open(data: bytes | os.PathLike[str] | str) -> tuple[tuple[int, int], str] | None:
    """`(size, format)` as `PIL.Image.open` reports them, or None when Pillow refuses the file."""
    src: Any = io.BytesIO(data) if isinstance(data, bytes) else data
    with _quiet_pillow():
        try:
            with Image.open(src) as im:
                fmt = im.format or ""
                return (int(im.size[0]), int(im.size[1])), PILLOW_ALIASES.get(fmt, fmt)
        except Exception:  # any refusal: Pillow raises many kinds
            return None


def pillow_orientation(data: bytes) -> Any:
    """`getexif().get(0x0112)` of a JPEG as Pillow reads it."""
    with _quiet_pillow(), Image.open(io.BytesIO(data)) as im:
        return im.getexif().get(0x0112)


# -- fastindex, the answer under test -------------------------------------------------------
def probe(data: bytes) -> dict[str, Any] | None:
    """`_core.probe_bytes`, with `ImageError` as None. Any other exception propagates."""
    try:
        return dict(_core.probe_bytes(data))
    except fastindex.ImageError:
        return None


def probe_path(path: os.PathLike[str] | str) -> dict[str, Any] | None:
    """`fastindex.probe_image`, with `ImageError` as None; `image_size` must agree with it."""
    try:
        info = fastindex.probe_image(path)
    except fastindex.ImageError:
        try:
            fastindex.image_size(path)
        except fastindex.ImageError:
            return None
        raise AssertionError(f"probe_image refused {path} but image_size read it") from None
    assert fastindex.image_size(path) == (info["width"], info["height"])
    return dict(info)


def answer(info: dict[str, Any] | None) -> tuple[tuple[int, int], str] | None:
    return None if info is None else ((info["width"], info["height"]), info["format"])


def check_against_pillow(data: bytes, full: tuple[tuple[int, int], str] | None = None) -> None:
    """The parser's contract on arbitrary bytes: it answers or raises `ImageError` (never
    anything else), and where Pillow opens the bytes as one of our formats the answers agree.

    Where Pillow refuses a file, fastindex may still read its header (it reads less than
    Pillow). `full` is the answer for the whole file when `data` is a cut of it: a header read
    from a cut must then be the whole file's (turned, for a TIFF whose orientation tag was cut).
    """
    got = answer(probe(data))
    ref = pillow_open(data)
    if ref is not None and ref[1] in FORMATS:
        if ref[0][0] > 0xFFFF_FFFF or ref[0][1] > 0xFFFF_FFFF:
            assert got is None, "fastindex stores sizes in 32 bits"
        else:
            assert got == ref, f"Pillow reads {ref}, fastindex {got}"
    elif got is not None:
        (w, h), fmt = got
        assert w > 0 and h > 0 and fmt in FORMATS, got
        if full is not None:
            turned = ((full[0][1], full[0][0]), full[1])
            assert got == full or (fmt == "TIFF" and got == turned), (got, full)


# -- images -----------------------------------------------------------------------------------
def noise(size: tuple[int, int], mode: str = "RGB", seed: int = 0) -> Image.Image:
    """A small image with some texture (cheap at any size: noise is made small and scaled)."""
    w, h = size
    small = Image.effect_noise((max(1, min(w, 64)), max(1, min(h, 64))), 40 + seed % 50)
    im = small.resize((w, h)) if small.size != (w, h) else small
    if mode == "CMYK":
        return im.convert("RGB").convert("CMYK")
    return im.convert(mode)


def encode(im: Image.Image, fmt: str, **options: Any) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **options)
    return buf.getvalue()


def icc_blob(n: int = 200_000, seed: int = 7) -> bytes:
    return random.Random(seed).randbytes(n)


def exif_block(orientation: int | None, *, big_endian: bool = False, long: bool = False) -> bytes:
    """A TIFF-structured EXIF block (without the `Exif\\0\\0` prefix) with IFD0 holding the
    orientation as a SHORT (or a LONG)."""
    e = ">" if big_endian else "<"
    head = (b"MM" if big_endian else b"II") + struct.pack(e + "HI", 42, 8)
    entries = []
    if orientation is not None:
        if long:
            entries.append(struct.pack(e + "HHII", 0x0112, 4, 1, orientation))
        else:
            entries.append(struct.pack(e + "HHIHH", 0x0112, 3, 1, orientation, 0))
    return head + struct.pack(e + "H", len(entries)) + b"".join(entries) + struct.pack(e + "I", 0)


def exif_with_thumbnail(orientation: int, thumbnail: bytes) -> bytes:
    """EXIF (little-endian) whose IFD1 points at a whole JPEG thumbnail, with its own SOF."""
    ifd0 = 8
    ifd1 = ifd0 + 2 + 12 + 4
    thumb_at = ifd1 + 2 + 2 * 12 + 4
    out = b"II" + struct.pack("<HI", 42, ifd0)
    out += struct.pack("<H", 1) + struct.pack("<HHIHH", 0x0112, 3, 1, orientation, 0)
    out += struct.pack("<I", ifd1)
    out += struct.pack("<H", 2)
    out += struct.pack("<HHII", 0x0201, 4, 1, thumb_at)
    out += struct.pack("<HHII", 0x0202, 4, 1, len(thumbnail))
    out += struct.pack("<I", 0)
    return out + thumbnail


def insert_app1(jpeg: bytes, payload: bytes) -> bytes:
    """Put an APP1 segment holding `payload` right after the SOI of `jpeg`."""
    assert jpeg[:2] == b"\xff\xd8" and len(payload) + 2 <= 0xFFFF
    return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + jpeg[2:]


def gif_first_frame_beyond_screen(frame: tuple[int, int], screen: tuple[int, int]) -> bytes:
    """A GIF whose logical screen is smaller than its first frame (Pillow grows the screen)."""
    data = bytearray(encode(noise(frame, "P"), "GIF"))
    data[6:10] = struct.pack("<HH", *screen)
    return bytes(data)


def bmp_top_down(size: tuple[int, int], mode: str = "RGB") -> bytes:
    """A BMP whose height is negative: rows stored top-down."""
    data = bytearray(encode(noise(size, mode), "BMP"))
    data[22:26] = struct.pack("<i", -size[1])
    return bytes(data)


def tiff_by_hand(
    size: tuple[int, int],
    *,
    big_endian: bool,
    orientation: int | None = None,
    long_sizes: bool = False,
) -> bytes:
    """A one-strip 8-bit greyscale TIFF in either byte order, sizes as SHORT or LONG, with an
    optional Orientation tag. Pillow writes little-endian files only (but for I;16B)."""
    e = ">" if big_endian else "<"
    w, h = size
    tags: list[tuple[int, int, int]] = [
        (256, 4 if long_sizes else 3, w),
        (257, 4 if long_sizes else 3, h),
        (258, 3, 8),
        (259, 3, 1),
        (262, 3, 1),
        (273, 4, 0),  # strip offset, patched below
        (277, 3, 1),
        (278, 4, h),
        (279, 4, w * h),
    ]
    if orientation is not None:
        tags.append((274, 3, orientation))
    tags.sort()
    ifd_size = 2 + 12 * len(tags) + 4
    pixels_at = 8 + ifd_size
    out = (b"MM" if big_endian else b"II") + struct.pack(e + "HI", 42, 8)
    out += struct.pack(e + "H", len(tags))
    for tag, typ, value in tags:
        if tag == 273:
            value = pixels_at
        if typ == 3:
            out += struct.pack(e + "HHIHH", tag, typ, 1, value, 0)
        else:
            out += struct.pack(e + "HHII", tag, typ, 1, value)
    out += struct.pack(e + "I", 0)
    return out + bytes(w * h)


# -- files and the store ----------------------------------------------------------------------
def finish(ds: fastindex.Dataset, job: fastindex.Job, timeout: float = 60.0) -> None:
    """Wait until a job's rows are through phase 2."""
    assert job.wait(timeout=timeout), job.progress()


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def small_png(seed: int = 0, size: tuple[int, int] = (7, 5)) -> bytes:
    return encode(noise(size, seed=seed), "PNG")


# Python's sqlite3 and fastindex's Rust core each carry their own copy of SQLite. Two copies in
# one process do not see each other's POSIX locks, so the second to open a WAL store resets the
# shared-memory index under the first (a SIGBUS, or worse, a corrupt store: sqlite.org/howtocorrupt
# section 2.2.1). The independent looks into the store therefore run in a child process.
_SQL = """
import json, sqlite3, sys
db, mode, queries = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
con = sqlite3.connect(f"file:{db}?mode={mode}", uri=True, timeout=30)
out = []
for q in queries:
    if q == "TABLES":
        rows = con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        out.append([r[0] for r in rows])
    else:
        out.append(con.execute(q[0], q[1]).fetchall())
con.commit()
con.close()
print(json.dumps(out))
"""


def sql(db: os.PathLike[str] | str, *queries: Any, write: bool = False) -> list[Any]:
    """Run queries on the store with Python's sqlite3, in a child process, read-only unless
    `write`. Each query is `(sql, params)`, or "TABLES" for the table names; returns one list of
    rows per query."""
    mode = "rw" if write else "ro"
    done = subprocess.run(
        [sys.executable, "-I", "-c", _SQL, os.fspath(db), mode, json.dumps(queries)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return list(json.loads(done.stdout))


# Every write to a sample row from the moment these run on leaves a row `(op, id)` in `audit`
# (`op`: 'i', 'u' or 'd'): proof that a sync wrote nothing, or only the rows it had to.
AUDIT_SAMPLES = [
    ("CREATE TABLE audit (op TEXT, id INTEGER)", []),
    (
        "CREATE TRIGGER audit_i AFTER INSERT ON samples"
        " BEGIN INSERT INTO audit VALUES ('i', NEW.id); END",
        [],
    ),
    (
        "CREATE TRIGGER audit_u AFTER UPDATE ON samples"
        " BEGIN INSERT INTO audit VALUES ('u', NEW.id); END",
        [],
    ),
    (
        "CREATE TRIGGER audit_d AFTER DELETE ON samples"
        " BEGIN INSERT INTO audit VALUES ('d', OLD.id); END",
        [],
    ),
]


def table_counts(db: os.PathLike[str] | str) -> dict[str, int]:
    """Rows per table (all of them: nothing written must show up anywhere), but `leases`,
    which background workers of earlier calls take and give back on their own time."""
    if not os.path.exists(db):
        return {}
    (tables,) = sql(db, "TABLES")
    tables = [t for t in tables if t != "leases"]
    counts = sql(db, *[(f'SELECT COUNT(*) FROM "{t}"', []) for t in tables])
    return {t: rows[0][0] for t, rows in zip(tables, counts, strict=True)}


def status_counts(db: os.PathLike[str] | str, dataset_id: int) -> dict[str, int]:
    """COUNT(*) by status, read with Python's sqlite3: a check of the store's own counters."""
    (rows,) = sql(
        db,
        ("SELECT status, COUNT(*) FROM samples WHERE dataset_id = ? GROUP BY status", [dataset_id]),
    )
    counts = dict.fromkeys(fastindex.STATUSES, 0)
    counts.update({s: n for s, n in rows})
    return counts


def progress_counts(progress: dict[str, Any]) -> dict[str, int]:
    return {s: progress[s] for s in fastindex.STATUSES}
