"""Phase 1 (the walk and the pending rows) and phase 2 through the store, plus the typed errors
of bad arguments. Every check reads the real SQLite store, through the API or read-only."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import fastindex
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from testkit import (
    encode,
    finish,
    noise,
    pillow_open,
    progress_counts,
    small_png,
    sql,
    status_counts,
    table_counts,
    too_deep_to_open,
    write,
)

NewDataset = Callable[..., fastindex.Dataset]


def add(ds: fastindex.Dataset, path: Path | str, **options: object) -> fastindex.Job:
    """Add a folder and wait for phase 2 (no embeddings: they are another phase's tests)."""
    job = ds.add_images_from_path(path, embed=False, **options)  # type: ignore[arg-type]
    finish(ds, job)
    return job


def paths(ds: fastindex.Dataset) -> set[str]:
    """The files taken (the walk's `failed` rows left out: `walk_failures` has those)."""
    return {s.path for s in ds.samples() if s.size_bytes is not None}


def walk_failures(ds: fastindex.Dataset) -> dict[str, str | None]:
    """Failed rows the walk wrote (no size: nothing was read), path -> reason."""
    return {s.path: s.error for s in ds.samples(status="failed") if s.size_bytes is None}


def assert_counters_match_rows(ds: fastindex.Dataset) -> None:
    """The O(1) progress counters against COUNT(*) by status, computed independently."""
    assert progress_counts(ds.get_loading_progress()) == status_counts(ds.db, ds.id)


# -- which files the walk takes ---------------------------------------------------------------
def test_image_extensions_any_case_and_format_by_content(
    tmp_path: Path, new_dataset: NewDataset
) -> None:
    root = tmp_path / "photos"
    jpeg = encode(noise((40, 30)), "JPEG")
    images = {
        "a.jpg": jpeg,
        "b.JPG": jpeg,
        "c.Jpeg": jpeg,
        "d.PNG": small_png(),
        "e.gif": encode(noise((5, 6), "P"), "GIF"),
        "f.BmP": encode(noise((7, 8)), "BMP"),
        "g.webp": encode(noise((9, 10)), "WEBP"),
        "h.TIF": encode(noise((11, 12)), "TIFF"),
        "i.tiff": encode(noise((13, 14)), "TIFF"),
        "deep/er/j.jpeg": jpeg,
        "png_named.jpg": small_png(1, (17, 3)),  # the content decides the format
        "notes.png": b"this is not a picture\n",
        "empty.gif": b"",
    }
    others = ["notes.txt", "photo.jpg.bak", "photo.jpgx", "noext", "jpg", "x.heic", "y.JPG~"]
    for name, data in images.items():
        write(root / name, data)
    for name in others:
        write(root / name, jpeg)
    ds = new_dataset()
    job = add(ds, root)
    assert job.summary["added"] == len(images) == job.summary["found"]
    assert job.summary["errors"] == []
    samples = {s.path: s for s in ds.samples()}
    assert set(samples) == set(images)
    for name, data in images.items():
        s = samples[name]
        ref = pillow_open(data)
        if ref is None:
            assert s.status == "failed"
            assert s.error and "\n" not in s.error
            assert (s.width, s.height, s.format) == (None, None, None)
        else:
            assert s.status == "indexed", s
            assert ((s.width, s.height), s.format) == ref
            assert s.error is None
    assert samples["png_named.jpg"].format == "PNG"
    assert set(fastindex.IMAGE_EXTENSIONS) == {
        "jpg",
        "jpeg",
        "png",
        "gif",
        "bmp",
        "webp",
        "tif",
        "tiff",
    }
    assert_counters_match_rows(ds)


def test_sample_fields(tmp_path: Path, new_dataset: NewDataset) -> None:
    root = tmp_path / "r"
    f = write(root / "sub" / "x.png", small_png(size=(21, 4)))
    ds = new_dataset()
    add(ds, root)
    (s,) = ds.samples()
    st_ = f.stat()
    assert s.root == str(root)
    assert s.path == "sub/x.png" and s.file_name == "x.png"
    assert s.abs_path == str(f)
    assert (s.size_bytes, s.mtime_ns) == (st_.st_size, st_.st_mtime_ns)
    assert (s.status, s.width, s.height, s.format, s.orientation) == ("indexed", 21, 4, "PNG", None)
    assert ds.sample(s.id) == s
    assert s.to_dict()["file_name"] == "x.png"


def test_hidden_names_skipped_unless_asked(tmp_path: Path, new_dataset: NewDataset) -> None:
    root = tmp_path / "r"
    visible = ["a.png", "sub/b.png"]
    hidden = ["._photo.jpg", ".hidden.png", ".cache/c.png", "sub/.git/objects/d.jpg", "sub/.e.gif"]
    for name in visible + hidden:
        write(root / name, small_png())
    write(root / ".DS_Store", b"\0\0\0\1Bud1" + bytes(100))
    write(root / "._photo.jpg", b"\0\5\26\7\0\2\0\0Mac OS X        ")  # AppleDouble, not a JPEG
    ds = new_dataset("default")
    add(ds, root)
    assert paths(ds) == set(visible)
    ds_all = new_dataset("all")
    add(ds_all, root, include_hidden=True)
    assert paths(ds_all) == set(visible + hidden)
    junk = next(s for s in ds_all.samples() if s.path == "._photo.jpg")
    assert junk.status == "failed" and junk.error
    # the hidden root itself is walked when named explicitly
    ds_cache = new_dataset("cache")
    add(ds_cache, root / ".cache")
    assert paths(ds_cache) == {"c.png"}


def test_symlinked_files_followed_folders_only_when_asked(
    tmp_path: Path, new_dataset: NewDataset
) -> None:
    root = tmp_path / "r"
    outside = tmp_path / "outside"
    write(root / "a.png", small_png())
    write(outside / "o.png", small_png(2, (31, 2)))
    write(outside / "deeper" / "p.png", small_png())
    (root / "link.png").symlink_to(outside / "o.png")
    (root / "linkdir").symlink_to(outside, target_is_directory=True)
    (root / "relative.png").symlink_to("a.png")
    ds = new_dataset("plain")
    job = add(ds, root)
    assert paths(ds) == {"a.png", "link.png", "relative.png"}
    link = next(s for s in ds.samples() if s.path == "link.png")
    assert (link.status, link.width, link.height) == ("indexed", 31, 2)
    assert job.summary["errors"] == []
    followed = new_dataset("followed")
    add(followed, root, follow_links=True)
    assert paths(followed) == {
        "a.png",
        "link.png",
        "relative.png",
        "linkdir/o.png",
        "linkdir/deeper/p.png",
    }


@pytest.mark.timeout(60)
def test_symlink_loops_do_not_hang(tmp_path: Path, new_dataset: NewDataset) -> None:
    root = tmp_path / "r"
    write(root / "a.png", small_png())
    write(root / "sub" / "b.png", small_png())
    (root / "sub" / "up").symlink_to(root, target_is_directory=True)
    (root / "sub" / "self").symlink_to(root / "sub", target_is_directory=True)
    (root / "twin").symlink_to(root / "sub", target_is_directory=True)
    (root / "x").symlink_to(root / "y")
    (root / "y").symlink_to(root / "x")  # a link loop that is not a folder
    (root / "z.jpg").symlink_to(root / "z.jpg")  # a link to itself with an image name
    for follow in (False, True):
        ds = new_dataset(f"follow={follow}")
        job = add(ds, root, follow_links=follow)
        found = paths(ds)
        # every folder is entered once: no file shows up twice through a loop or a twin link
        assert found == {"a.png", "sub/b.png"}, found
        assert any("z.jpg" in e for e in job.summary["errors"])
        # the loops are failed rows: the folder links to their own folder or above only when
        # folder links are followed, and so the links that may be folders
        loops = {"z.jpg"} | ({"sub/up", "sub/self", "x", "y"} if follow else set())
        assert walk_failures(ds) == dict.fromkeys(loops, "symbolic link loop")
        assert add(ds, root, follow_links=follow).summary["added"] == 0


def test_follow_links_keeps_real_folders_under_their_own_path(
    tmp_path: Path, new_dataset: NewDataset
) -> None:
    root = tmp_path / "r"
    write(root / "z" / "deep" / "b.png", small_png())
    (root / "aaa").symlink_to(root / "z" / "deep", target_is_directory=True)
    ds = new_dataset()
    add(ds, root, follow_links=True)
    assert paths(ds) == {"z/deep/b.png"}
    again = add(ds, root)
    assert again.summary["added"] == 0


def test_dangling_link_is_reported_not_fatal(tmp_path: Path, new_dataset: NewDataset) -> None:
    root = tmp_path / "r"
    write(root / "a.png", small_png())
    (root / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    ds = new_dataset()
    job = add(ds, root)
    assert paths(ds) == {"a.png"}
    assert walk_failures(ds) == {"gone.jpg": "broken symbolic link"}
    assert len(job.summary["errors"]) == 1
    assert str(root / "gone.jpg") in job.summary["errors"][0]
    assert ds.jobs_summary(job.id)["warnings"] == job.summary["errors"]
    assert ds.get_loading_progress()["failed"] == 1


def _unreadable_by_permissions(folder: Path) -> Iterator[str]:
    folder.chmod(0)
    try:
        yield "permission denied"
    finally:
        folder.chmod(0o755)


def _unreadable_by_length(folder: Path) -> Iterator[str]:
    """A folder whose path is longer than PATH_MAX: no one, root included, can open it by name."""
    too_deep_to_open(folder)
    yield "file name too long"


@pytest.mark.parametrize("how", ["permissions", "path length"])
def test_unreadable_folder_is_reported_not_fatal(
    tmp_path: Path, new_dataset: NewDataset, how: str
) -> None:
    if how == "permissions" and os.geteuid() == 0:
        pytest.skip("root reads any folder whatever its mode; the path-length case covers root")
    root = tmp_path / "r"
    write(root / "a.png", small_png())
    write(root / "locked" / "b.png", small_png())
    make = _unreadable_by_permissions if how == "permissions" else _unreadable_by_length
    with contextlib.contextmanager(make)(root / "locked") as reason:
        ds = new_dataset()
        job = add(ds, root)
        expected = {"a.png"} if how == "permissions" else {"a.png", "locked/b.png"}
        assert paths(ds) == expected
        assert len(job.summary["errors"]) == 1, job.summary["errors"]
        assert reason in job.summary["errors"][0]
        assert str(root / "locked") in job.summary["errors"][0]
        ((where, why),) = walk_failures(ds).items()
        assert where.startswith("locked") and why == f"unreadable folder: {reason}"
        assert ds.get_loading_progress()["status"] == "complete"


def test_bad_roots_raise_before_anything_is_written(
    tmp_path: Path, new_dataset: NewDataset
) -> None:
    ds = new_dataset()
    a_file = write(tmp_path / "file.png", small_png())
    before = table_counts(ds.db)
    with pytest.raises(fastindex.PathNotFoundError, match="no-such-folder"):
        ds.add_images_from_path(tmp_path / "no-such-folder", embed=False)
    with pytest.raises(fastindex.InvalidArgumentError, match="not a folder") as e:
        ds.add_images_from_path(a_file, embed=False)
    assert not isinstance(e.value, fastindex.PathNotFoundError)
    with pytest.raises(fastindex.InvalidArgumentError):
        ds.add_images_from_path("", embed=False)
    assert table_counts(ds.db) == before
    assert ds.get_loading_progress()["total"] == 0
    # the exception classes are also the standard ones
    assert issubclass(fastindex.PathNotFoundError, FileNotFoundError)
    assert issubclass(fastindex.InvalidArgumentError, ValueError)


# -- adding again -----------------------------------------------------------------------------
def test_adding_the_same_folder_again_adds_nothing(tmp_path: Path, new_dataset: NewDataset) -> None:
    root = tmp_path / "r"
    for name in ["a.png", "b.png", "sub/c.png", "bad.jpg"]:
        write(root / name, small_png() if name != "bad.jpg" else b"nope")
    ds = new_dataset()
    first = add(ds, root)
    assert (first.summary["added"], first.summary["existing"]) == (4, 0)
    rows = ds.samples()
    for again in (root, f"{root}/", f"{root}/./sub/..", tmp_path / "r" / "sub" / ".."):
        job = add(ds, again)
        assert (job.summary["added"], job.summary["existing"]) == (0, 4), again
        assert job.progress()["total"] == 0
    assert ds.samples() == rows  # nothing reset, nothing duplicated
    assert ds.get_loading_progress()["total"] == 4
    # a new file is the only thing a later add brings
    write(root / "sub" / "new.png", small_png())
    job = add(ds, root)
    assert (job.summary["added"], job.summary["existing"]) == (1, 4)
    assert job.progress()["indexed"] == 1
    assert ds.get_loading_progress()["total"] == 5
    assert_counters_match_rows(ds)


def test_adding_a_subfolder_or_the_parent(tmp_path: Path, new_dataset: NewDataset) -> None:
    top = tmp_path / "top"
    for name in ["t.png", "mid/m.png", "mid/low/l.png", "other/o.png"]:
        write(top / name, small_png())
    ds = new_dataset()
    add(ds, top / "mid")
    assert paths(ds) == {"m.png", "low/l.png"}
    sub = add(ds, top / "mid" / "low")
    assert (sub.summary["added"], sub.summary["existing"]) == (0, 1)
    parent = add(ds, top)
    assert parent.summary["added"] == 2  # t.png and other/o.png only
    assert ds.get_loading_progress()["total"] == 4
    assert sorted(s.abs_path for s in ds.samples()) == sorted(
        str(top / p) for p in ["t.png", "mid/m.png", "mid/low/l.png", "other/o.png"]
    )
    again = add(ds, top)
    assert (again.summary["added"], again.summary["existing"]) == (0, 2)
    deeper = add(ds, top / "other")
    assert (deeper.summary["added"], deeper.summary["existing"]) == (0, 1)
    assert ds.get_loading_progress()["total"] == 4
    assert_counters_match_rows(ds)


def test_back_to_back_adds_are_probed(tmp_path: Path, new_dataset: NewDataset) -> None:
    """An add that finds nothing new, then at once an add with a new file (the second kick lands
    while the first add's probe thread is on its way out)."""
    write(tmp_path / "base" / "a.png", small_png())
    ds = new_dataset()
    add(ds, tmp_path / "base")
    for i in range(300):
        nothing_new = ds.add_images_from_path(tmp_path / "base", embed=False)
        assert nothing_new.wait(timeout=10)
        write(tmp_path / f"d{i}" / "a.png", small_png())
        job = ds.add_images_from_path(tmp_path / f"d{i}", embed=False)
        assert job.wait(timeout=10), f"add {i}: {job.progress()}"


def test_datasets_are_independent(tmp_path: Path, new_dataset: NewDataset) -> None:
    root = tmp_path / "r"
    write(root / "a.png", small_png())
    one, two = new_dataset("one"), new_dataset("two")
    add(one, root)
    job = add(two, root)
    assert job.summary["added"] == 1
    assert one.get_loading_progress()["total"] == two.get_loading_progress()["total"] == 1


def test_same_folder_through_a_symlinked_path(tmp_path: Path, new_dataset: NewDataset) -> None:
    root = tmp_path / "r"
    write(root / "a.png", small_png())
    (tmp_path / "alias").symlink_to(root, target_is_directory=True)
    ds = new_dataset()
    add(ds, root)
    job = add(ds, tmp_path / "alias")
    assert job.summary["added"] == 0
    assert ds.get_loading_progress()["total"] == 1


# -- the walk rules as a model, over random trees ---------------------------------------------
_DIRS = ["a", "B", "sub", ".hidden", "._x", ".cache", "dir.jpg"]
_STEMS = ["p", "Q", ".q", "._r", "s.t", ""]
_EXTS = ["jpg", "JPG", "jPeG", "png", "PNG", "gif", "Bmp", "webp", "tif", "TIFF",
         "txt", "jpg.bak", "jpgx", "pn", "heic", ""]  # fmt: skip


@st.composite
def trees(draw: st.DrawFn) -> list[str]:
    files = []
    for _ in range(draw(st.integers(1, 12))):
        parts = draw(st.lists(st.sampled_from(_DIRS), max_size=3))
        stem, ext = draw(st.sampled_from(_STEMS)), draw(st.sampled_from(_EXTS))
        name = f"{stem}.{ext}" if ext else stem
        if name and name not in (".", ".."):
            files.append("/".join([*parts, name]))
    return files


def _model(files: list[str], include_hidden: bool) -> set[str]:
    """The walk rules written plainly: image extensions in any case; names starting with `.`
    (files or folders) only when asked."""
    out = set()
    for f in files:
        parts = f.split("/")
        _, dot, ext = parts[-1].rpartition(".")
        if not dot or ext.lower() not in fastindex.IMAGE_EXTENSIONS:
            continue
        if not include_hidden and any(p.startswith(".") for p in parts):
            continue
        out.add(f)
    return out


@settings(max_examples=40)
@given(files=trees(), include_hidden=st.booleans())
def test_walk_matches_the_rules(files: list[str], include_hidden: bool) -> None:
    png = small_png()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "root"
        root.mkdir()
        made = []
        for f in files:
            p = root / f
            with contextlib.suppress(FileExistsError, NotADirectoryError, IsADirectoryError):
                p.parent.mkdir(parents=True, exist_ok=True)
                if not p.is_dir():
                    p.write_bytes(png)
                    made.append(f)
        ds = fastindex.Dataset.create("walk", db=Path(tmp) / "s.db")
        try:
            job = add(ds, root, include_hidden=include_hidden)
            assert paths(ds) == _model(made, include_hidden)
            assert job.summary["errors"] == []
            assert_counters_match_rows(ds)
        finally:
            ds.cancel()  # no background thread may outlive the folder


# -- typed errors for bad arguments -----------------------------------------------------------
def test_create_on_a_taken_name(db: Path) -> None:
    fastindex.Dataset.create("holiday", db=db)
    before = table_counts(db)
    with pytest.raises(fastindex.DatasetExistsError, match="holiday"):
        fastindex.Dataset.create("holiday", db=db)
    with pytest.raises(fastindex.DatasetExistsError):
        fastindex.Dataset.create("  holiday ", db=db)  # names are trimmed
    assert table_counts(db) == before
    assert fastindex.Dataset.load_or_create("holiday", db=db).name == "holiday"
    assert [d["name"] for d in fastindex.list_datasets(db=db)] == ["holiday"]


def test_load_of_a_missing_name(db: Path) -> None:
    with pytest.raises(fastindex.DatasetNotFoundError):
        fastindex.Dataset.load("nothing", db=db)
    assert not db.exists()  # looking does not create a store
    fastindex.Dataset.create("other", db=db)
    with pytest.raises(fastindex.DatasetNotFoundError, match="nothing"):
        fastindex.Dataset.load("nothing", db=db)
    assert issubclass(fastindex.DatasetNotFoundError, LookupError)


@pytest.mark.parametrize(
    "content",
    [b"x" * 4096, b"SQLite format 3\0" + b"\xff" * 200, b"\x89PNG\r\n\x1a\n" + bytes(5000)],
)
def test_a_file_that_is_not_a_store(tmp_path: Path, content: bytes) -> None:
    path = write(tmp_path / "not.db", content)
    for call in (
        lambda: fastindex.Dataset.create("a", db=path),
        lambda: fastindex.Dataset.load("a", db=path),
        lambda: fastindex.Dataset.load_or_create("a", db=path),
    ):
        with pytest.raises(fastindex.StoreError, match=r"not\.db"):
            call()
    assert path.read_bytes() == content  # left as it was


def test_a_folder_as_the_store(tmp_path: Path) -> None:
    with pytest.raises(fastindex.StoreError):
        fastindex.Dataset.create("a", db=tmp_path)


def test_another_applications_sqlite_file(tmp_path: Path) -> None:
    path = tmp_path / "app.db"
    with contextlib.closing(sqlite3.connect(path)) as c:  # closed before fastindex opens it
        c.execute("CREATE TABLE people (name TEXT)")
        c.commit()
    with pytest.raises(fastindex.StoreError):
        fastindex.Dataset.create("a", db=path)


def test_wrong_schema_version(tmp_path: Path, db: Path) -> None:
    ds = fastindex.Dataset.create("a", db=db)
    write(tmp_path / "r" / "a.png", small_png())
    add(ds, tmp_path / "r")
    sql(db, ("UPDATE meta SET value = '999' WHERE key = 'schema_version'", []), write=True)
    before = table_counts(db)
    for call in (
        lambda: fastindex.Dataset.load("a", db=db),
        lambda: fastindex.Dataset.create("b", db=db),
        lambda: fastindex.Dataset.load_or_create("b", db=db),
        lambda: fastindex.list_datasets(db=db),
    ):
        with pytest.raises(
            fastindex.SchemaVersionError, match=rf"999.*\b{fastindex.SCHEMA_VERSION}\b"
        ) as e:
            call()
        assert isinstance(e.value, fastindex.StoreError)
    assert table_counts(db) == before
    assert fastindex.SCHEMA_VERSION == 7


def test_bad_reads_and_names(db: Path) -> None:
    ds = fastindex.Dataset.create("a", db=db)
    with pytest.raises(fastindex.InvalidArgumentError, match="'done'"):
        ds.samples(status="done")
    with pytest.raises(fastindex.InvalidArgumentError):
        ds.samples(after_id=-1)
    for status in fastindex.STATUSES:
        assert ds.samples(status=status) == []
    for bad in ("", "   ", "tab\there", "x" * 201):
        with pytest.raises(fastindex.InvalidArgumentError):
            fastindex.Dataset.create(bad, db=db)
    with pytest.raises(fastindex.InvalidArgumentError):
        fastindex.Dataset.create("a", db="")
    with pytest.raises(fastindex.DatasetNotFoundError):
        ds.sample(12345)
    assert [d["name"] for d in fastindex.list_datasets(db=db)] == ["a"]
