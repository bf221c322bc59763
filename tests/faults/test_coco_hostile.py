"""A COCO file is untrusted input (it often comes from a download): names that leave the images
folder, duplicates, hostile values and special files are refused with a reason; a store that
fails, a stop, or another dataset writing beside an ingest never hangs or blocks anything."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import fastindex
import pytest
from fastindex import _core
from testkit import finish, resize_tmpfs, small_png, sql, table_counts, tmpfs, write

NewDataset = Callable[..., fastindex.Dataset]


def box(ann_id: int, image_id: int, x: float = 0) -> dict[str, Any]:
    return {"id": ann_id, "image_id": image_id, "category_id": 1, "bbox": [x, 0, 2, 2]}


def coco_file(path: Path, names: list[str], boxes_per_image: int = 1) -> Path:
    """A COCO file listing `names` (image ids 1..), each with `boxes_per_image` boxes."""
    images = [{"id": i + 1, "file_name": n} for i, n in enumerate(names)]
    anns = [
        box(i * boxes_per_image + j + 1, i + 1, x=j)
        for i in range(len(names))
        for j in range(boxes_per_image)
    ]
    doc = {"images": images, "categories": [{"id": 1, "name": "thing"}], "annotations": anns}
    path.write_text(json.dumps(doc))
    return path


def run_child(code: str, *args: str, timeout: float = 120) -> Any:
    """Run `code` in a fresh interpreter (a hang ends in a timeout, not a stuck suite); it
    prints one JSON line last, which is returned."""
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def store_view(db: Path, dataset_id: int) -> tuple[list[Any], list[Any]]:
    """Every sample and every box of a dataset, with nothing that depends on ids or jobs."""
    samples, boxes = sql(
        db,
        (
            "SELECT path, status, width, height, format, coco_width, coco_height, size_mismatch,"
            " error FROM samples WHERE dataset_id = ? ORDER BY path",
            [dataset_id],
        ),
        (
            "SELECT s.path, c.name, a.coco_id, a.x, a.y, a.w, a.h, a.area, a.iscrowd,"
            " a.segmentation FROM annotations a JOIN samples s ON s.id = a.sample_id"
            " JOIN categories c ON c.id = a.category_id WHERE s.dataset_id = ?"
            " ORDER BY s.path, a.coco_id",
            [dataset_id],
        ),
    )
    return samples, boxes


def counters_match_rows(db: Path, dataset_id: int) -> None:
    counted, rows = sql(
        db,
        ("SELECT status, SUM(n) FROM counts WHERE dataset_id = ? GROUP BY status", [dataset_id]),
        ("SELECT status, COUNT(*) FROM samples WHERE dataset_id = ? GROUP BY status", [dataset_id]),
    )
    assert {s: n for s, n in counted if n} == dict(rows)


# -- names that leave the images folder --------------------------------------------------------
def test_names_that_escape_are_refused_with_their_boxes(
    tmp_path: Path, new_dataset: NewDataset
) -> None:
    images = tmp_path / "images"
    write(images / "a.png", small_png(1))
    write(images / "sub" / "b.png", small_png(2))
    secret = write(tmp_path / "secret" / "x.png", small_png(3))
    os.symlink(secret, images / "link.png")  # a file link out of the folder
    os.symlink(secret.parent, images / "linkdir")  # a folder link out of the folder
    os.symlink(images / "sub" / "b.png", images / "inside.png")  # a link that stays inside
    names = [
        "../secret/x.png",
        str(secret),
        "link.png",
        "linkdir/x.png",
        "sub/../../secret/x.png",
        "./a.png",
        "a.png",
        "sub//b.png",
        "sub/../sub/./b.png",
        "inside.png",
    ]
    ann = coco_file(tmp_path / "c.json", names, boxes_per_image=2)
    ds = new_dataset()
    job = ds.add_samples_from_coco(annotations_json=ann, images_path=images, embed=False)
    finish(ds, job)
    s = job.summary
    refused = dict(s["rejected"])
    assert sorted(refused) == sorted(names[:5])
    assert "`..`" in refused["../secret/x.png"] and "absolute" in refused[str(secret)]
    assert "symlink" in refused["link.png"] and "symlink" in refused["linkdir/x.png"]
    assert s["annotations_skipped"] == 2 * 5 and s["annotations"] == 2 * 5
    assert (s["added"], s["existing"], s["missing"]) == (3, 0, [])
    samples = {x.path: x for x in ds.samples()}
    assert sorted(samples) == ["a.png", "inside.png", "sub/b.png"]
    for x in samples.values():
        real = os.path.realpath(x.abs_path)
        assert real.startswith(str(images.resolve()) + os.sep), real
        assert x.status == "indexed"
    # `./a.png` and `a.png` are one row with the boxes of both entries
    assert len(ds.annotations(samples["a.png"].id)) == 4
    assert len(ds.annotations(samples["sub/b.png"].id)) == 4
    warnings = ds.jobs_summary(job.id)["warnings"]
    assert sum("refused" in w for w in warnings) == 5
    assert not any(str(tmp_path / "secret") in w for w in warnings if "absolute" not in w)


def test_duplicates_through_dot_are_one_row_and_a_rerun_doubles_nothing(
    tmp_path: Path, new_dataset: NewDataset
) -> None:
    images = tmp_path / "images"
    write(images / "d" / "a.png", small_png())
    ann = coco_file(tmp_path / "c.json", ["d/a.png", "./d/a.png", "d/./a.png", "x/../d/a.png"])
    ds = new_dataset()
    first = ds.add_samples_from_coco(annotations_json=ann, images_path=images, embed=False)
    finish(ds, first)
    view = store_view(ds.db, ds.id)
    assert [r[0] for r in view[0]] == ["d/a.png"] and len(view[1]) == 4
    again = ds.add_samples_from_coco(annotations_json=ann, images_path=images, embed=False)
    finish(ds, again)
    assert (again.summary["added"], again.summary["existing"]) == (0, 1)
    assert store_view(ds.db, ds.id) == view


# -- hostile values: a clear error naming where, nothing written --------------------------------
def _hostile() -> list[tuple[str, dict[str, Any], str]]:
    def doc(images: Any = None, anns: Any = None, cats: Any = None) -> dict[str, Any]:
        return {
            "images": images if images is not None else [{"id": 1, "file_name": "a.png"}],
            "categories": cats if cats is not None else [{"id": 1, "name": "thing"}],
            "annotations": anns if anns is not None else [box(1, 1)],
        }

    im = {"id": 1, "file_name": "a.png"}
    return [
        ("image id 2^63", doc([im, {"id": 2**63, "file_name": "b.png"}]), "images[1]"),
        ("image id -2^63-1", doc([{"id": -(2**63) - 1, "file_name": "a.png"}]), "images[0]"),
        ("annotation id 2^64", doc(anns=[box(1, 1), {**box(2, 1), "id": 2**64}]), "annotations[1]"),
        ("category id 2^63", doc(cats=[{"id": 2**63, "name": "x"}]), "categories[0]"),
        ("image_id as text", doc(anns=[{**box(1, 1), "image_id": "1"}]), "annotations[0]"),
        ("file_name as number", doc([{"id": 1, "file_name": 5}]), "images[0]"),
        ("width as float", doc([{**im, "width": 1.5, "height": 2}]), "images[0]"),
        ("width without height", doc([{**im, "width": 4}]), "images[0]: width and height"),
        ("bbox with null", doc(anns=[{**box(1, 1), "bbox": [0, None, 1, 1]}]), "annotations[0]"),
        ("bbox negative", doc(anns=[{**box(1, 1), "bbox": [0, 0, -1, 1]}]), "annotations[0]: bbox"),
        ("bbox huge", doc(anns=[{**box(1, 1), "bbox": [0, 0, 1e308 * 10, 1]}]), "annotations[0]"),
        ("area negative", doc(anns=[{**box(1, 1), "area": -4}]), "annotations[0]: area"),
        ("images twice", doc(), "duplicate field `images`"),
    ]  # fmt: skip


@pytest.mark.parametrize(("name", "doc", "where"), _hostile(), ids=[h[0] for h in _hostile()])
def test_hostile_values_raise_before_writing(
    tmp_path: Path, new_dataset: NewDataset, name: str, doc: dict[str, Any], where: str
) -> None:
    write(tmp_path / "images" / "a.png", small_png())
    text = json.dumps(doc)
    if name == "bbox huge":
        text = text.replace("Infinity", "1e999")
    if name == "images twice":
        text = '{"images": [], ' + text[1:]
    ann = tmp_path / "c.json"
    ann.write_text(text)
    ds = new_dataset()
    before = table_counts(ds.db)
    with pytest.raises(fastindex.CocoError) as e:
        ds.add_samples_from_coco(annotations_json=ann, images_path=tmp_path / "images", embed=False)
    message = str(e.value)
    assert where in message and str(ann) in message and "\n" not in message
    assert table_counts(ds.db) == before


# -- special files and the size limit ------------------------------------------------------------
def test_special_files_are_refused_at_once(tmp_path: Path) -> None:
    write(tmp_path / "images" / "a.png", small_png())
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    candidates = [str(fifo), "/dev/zero", "/proc/self/pagemap", str(tmp_path / "images")]
    specials = [p for p in candidates if os.path.exists(p)]
    out = run_child(
        """
        import json, sys, time
        import fastindex
        ds = fastindex.Dataset.create("d", db=sys.argv[1])
        images, out = sys.argv[2], []
        for path in sys.argv[3:]:
            t = time.monotonic()
            try:
                ds.add_samples_from_coco(annotations_json=path, images_path=images, embed=False)
                out.append([path, "no error", "", 0.0])
            except fastindex.FastIndexError as e:
                out.append([path, type(e).__name__, str(e), time.monotonic() - t])
        print(json.dumps(out))
        """,
        str(tmp_path / "s.db"),
        str(tmp_path / "images"),
        *specials,
        timeout=60,
    )
    for path, kind, message, seconds in out:
        print(f"{path}: {kind} after {seconds:.3f} s: {message}")
        assert kind == "CocoError", (path, kind, message)
        assert path in message
        assert seconds < 5.0  # a hang guard: it is refused before anything is read
    assert table_counts(tmp_path / "s.db").get("samples") == 0


def test_a_file_over_the_size_limit_is_refused(
    tmp_path: Path, new_dataset: NewDataset, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(tmp_path / "images" / "a.png", small_png())
    ann = coco_file(tmp_path / "c.json", ["a.png"])
    ds = new_dataset()
    before = table_counts(ds.db)
    monkeypatch.setenv("FASTINDEX_MAX_COCO_BYTES", str(ann.stat().st_size - 1))
    with pytest.raises(fastindex.CocoError, match="above the limit"):
        ds.add_samples_from_coco(annotations_json=ann, images_path=tmp_path / "images", embed=False)
    assert table_counts(ds.db) == before
    monkeypatch.setenv("FASTINDEX_MAX_COCO_BYTES", str(ann.stat().st_size))
    job = ds.add_samples_from_coco(
        annotations_json=ann, images_path=tmp_path / "images", embed=False
    )
    finish(ds, job)
    assert job.summary["added"] == 1


# -- many images: failures, stops and other writers ---------------------------------------------
N_IMAGES = 40_000
BOXES_PER_IMAGE = 5


@pytest.fixture(scope="module")
def many(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """`(annotations_json, images_path)`: 40k listed files (hard links to a few PNGs) with
    200k boxes, more than the old reader's channel held."""
    root = tmp_path_factory.mktemp("many")
    images = root / "images"
    pngs = [write(root / "pool" / f"{k}.png", small_png(k, (8 + k, 6))) for k in range(4)]
    names = []
    for i in range(N_IMAGES):
        name = f"d{i // 1000:03d}/img_{i:06d}.png"
        target = images / name
        target.parent.mkdir(parents=True, exist_ok=True)
        os.link(pngs[i % 4], target)
        names.append(name)
    names.append("not-there.png")
    return coco_file(root / "many.json", names, BOXES_PER_IMAGE), images


@pytest.fixture(scope="module")
def clean_view(
    many: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> tuple[list[Any], list[Any]]:
    """The store of a clean, uninterrupted ingest of `many`."""
    ann, images = many
    db = tmp_path_factory.mktemp("clean") / "s.db"
    store = _core.Store(str(db))
    ds = store.create_dataset("d")
    summary = store.ingest_coco(ds, str(ann), str(images))
    assert summary["added"] == N_IMAGES and summary["missing"] == ["not-there.png"]
    return store_view(db, ds)


def test_a_stop_ends_the_ingest_promptly_and_a_rerun_finishes_it(
    tmp_path: Path, many: tuple[Path, Path], clean_view: tuple[list[Any], list[Any]]
) -> None:
    ann, images = many
    db = tmp_path / "s.db"
    store = _core.Store(str(db))
    ds = store.create_dataset("d")
    watcher = _core.Store(str(db))
    flag = _core.StopFlag()
    outcome: list[BaseException | dict[str, Any]] = []

    def ingest() -> None:
        try:
            outcome.append(store.ingest_coco(ds, str(ann), str(images), stop=flag))
        except BaseException as e:  # handed to the test thread
            outcome.append(e)

    worker = threading.Thread(target=ingest)
    worker.start()
    deadline = time.monotonic() + 60
    while watcher.progress(ds)["total"] == 0 and worker.is_alive():
        assert time.monotonic() < deadline
        time.sleep(0.005)
    t = time.monotonic()
    flag.set()
    worker.join(timeout=30)
    stopped_in = time.monotonic() - t
    print(f"stopped {stopped_in:.3f} s after the flag was set")
    assert not worker.is_alive()
    assert stopped_in < 2.0  # a hang guard: the writer looks at the flag every ~60 ms
    (result,) = outcome
    assert isinstance(result, fastindex.CancelledError), result
    # what was committed is consistent, and progress no longer says an add is running
    counters_match_rows(db, ds)
    assert watcher.progress(ds)["status"] == "complete"  # the job no longer says "adding"
    rerun = store.ingest_coco(ds, str(ann), str(images))
    assert rerun["added"] + rerun["existing"] == N_IMAGES
    assert store_view(db, ds) == clean_view
    counters_match_rows(db, ds)


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs (needs root; skipped elsewhere); unmounted afterwards."""
    with tmpfs(tmp_path / "mnt", "1m") as mnt:
        yield mnt


def test_a_full_disk_with_many_images_ends_with_an_error_and_a_rerun_finishes(
    small_tmpfs: Path, many: tuple[Path, Path], clean_view: tuple[list[Any], list[Any]]
) -> None:
    ann, images = many
    db = small_tmpfs / "s.db"
    code = """
        import json, sys, time
        from fastindex import _core
        store = _core.Store(sys.argv[1])
        found = store.find_dataset("d")
        ds = found[0] if found else store.create_dataset("d")
        t = time.monotonic()
        try:
            s = store.ingest_coco(ds, sys.argv[2], sys.argv[3])
            print(json.dumps(["ok", s["added"], time.monotonic() - t, ds]))
        except Exception as e:
            print(json.dumps([type(e).__name__, str(e), time.monotonic() - t, ds]))
        """
    kind, message, seconds, ds = run_child(code, str(db), str(ann), str(images), timeout=120)
    print(f"{kind} after {seconds:.3f} s: {message}")
    assert kind == "StoreError" and str(db) in message and "full" in message
    assert seconds < 30  # a hang guard: the old reader blocked forever on a full channel
    resize_tmpfs(small_tmpfs, "256m")
    kind, added, seconds, ds = run_child(code, str(db), str(ann), str(images), timeout=120)
    assert kind == "ok", added
    assert store_view(db, ds) == clean_view
    counters_match_rows(db, ds)


def test_other_writers_are_not_blocked_by_an_ingest(
    tmp_path: Path, many: tuple[Path, Path]
) -> None:
    """A second process commits small transactions on another dataset of the same store while
    an ingest runs: each waits for milliseconds (a transaction of the ingest), not for it all."""
    ann, images = many
    db = tmp_path / "s.db"
    store = _core.Store(str(db))
    ingest_ds, other_ds = store.create_dataset("coco"), store.create_dataset("other")
    del store
    stop_file = tmp_path / "stop"
    writer = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                """
                import json, os, sys, time
                from fastindex import _core
                store = _core.Store(sys.argv[1])
                ds, stop = int(sys.argv[2]), sys.argv[3]
                waits = []
                print("ready", flush=True)
                while not os.path.exists(stop):
                    t = time.monotonic()
                    store.set_phase_error(ds, "probe", f"write {len(waits)}")
                    waits.append((t, time.monotonic() - t))
                    time.sleep(0.002)
                store.set_phase_error(ds, "probe", None)
                print(json.dumps(waits))
                """
            ),
            str(db),
            str(other_ds),
            str(stop_file),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert writer.stdout is not None
        assert writer.stdout.readline().strip() == "ready"
        started = time.monotonic()
        summary = run_child(
            """
            import json, sys
            from fastindex import _core
            s = _core.Store(sys.argv[1]).ingest_coco(int(sys.argv[2]), sys.argv[3], sys.argv[4])
            print(json.dumps(s))
            """,
            str(db),
            str(ingest_ds),
            str(ann),
            str(images),
        )
        ended = time.monotonic()
        stop_file.touch()
        out, _ = writer.communicate(timeout=60)
    finally:
        stop_file.touch()
        if writer.poll() is None:
            writer.kill()
    assert summary["added"] == N_IMAGES
    waits = json.loads(out.strip().splitlines()[-1])
    during = [w for t, w in waits if started <= t <= ended]
    worst = max(during)
    print(f"ingest {ended - started:.2f} s; {len(during)} writes beside it, longest {worst:.3f} s")
    assert len(during) > 10
    assert worst < 0.5  # generous (a loaded CI box); typically under 0.1 s


# -- kill -9 at random moments: a rerun finishes the clean result --------------------------------
KILL_TRIALS = 20


@pytest.mark.slow
def test_kill_9_during_an_ingest_then_a_rerun_gives_the_clean_store(
    tmp_path: Path, many: tuple[Path, Path]
) -> None:
    ann, images = many
    # a smaller file over the same images: a trial takes a fraction of a second
    doc = json.loads(ann.read_text())
    keep = {im["id"] for im in doc["images"][:8000]} | {doc["images"][-1]["id"]}
    doc["images"] = [im for im in doc["images"] if im["id"] in keep]
    doc["annotations"] = [a for a in doc["annotations"] if a["image_id"] in keep]
    small = tmp_path / "small.json"
    small.write_text(json.dumps(doc))
    clean_db = tmp_path / "clean.db"
    store = _core.Store(str(clean_db))
    ds = store.create_dataset("d")
    t = time.monotonic()
    store.ingest_coco(ds, str(small), str(images))
    duration = time.monotonic() - t
    clean = store_view(clean_db, ds)
    child = textwrap.dedent(
        """
        import sys
        from fastindex import _core
        store = _core.Store(sys.argv[1])
        ds = store.create_dataset("d")
        print("ready", flush=True)
        store.ingest_coco(ds, sys.argv[2], sys.argv[3])
        print("done", flush=True)
        """
    )
    rng = random.Random(7)
    partial = 0
    for trial in range(KILL_TRIALS):
        db = tmp_path / f"kill{trial}.db"
        proc = subprocess.Popen(
            [sys.executable, "-c", child, str(db), str(small), str(images)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.1, 1.2) * duration)
        proc.kill()
        proc.wait(timeout=30)
        proc.stdout.close()
        store = _core.Store(str(db))
        found = store.find_dataset("d")
        assert found is not None
        before = store_view(db, found[0])
        partial += before != clean and before != ([], [])
        store.ingest_coco(found[0], str(small), str(images))
        assert store_view(db, found[0]) == clean, f"trial {trial}"
        counters_match_rows(db, found[0])
        assert store.progress(found[0])["status"] == "complete"
    print(f"{partial} of {KILL_TRIALS} kills left some rows or boxes but not all")
    assert partial >= 2
