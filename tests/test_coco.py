"""COCO ingest: samples, boxes with category names, missing files, declared sizes, malformed
files refused before anything is written, and re-ingest without duplicates."""

from __future__ import annotations

import copy
import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

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
    status_counts,
    table_counts,
    write,
)

RLE_COUNTS = "PPY3b0m0O1O0O100O1N2N3M2O1N2"
NewDataset = Callable[..., fastindex.Dataset]


def coco_case(root: Path) -> tuple[Path, Path, dict[str, Any]]:
    """Images on disk and a COCO detection file that lists them, plus two it lists that are
    not there. Returns `(annotations_json, images_path, coco)`."""
    images = root / "images"
    files = {
        "a.jpg": encode(noise((64, 48)), "JPEG"),
        "b.png": small_png(1, (50, 20)),
        "sub/c.webp": encode(noise((30, 40)), "WEBP"),
        "d.gif": encode(noise((12, 9), "P"), "GIF"),
        "corrupt.jpg": b"\xff\xd8\xff\xe0 cut short",
        "undeclared.bmp": encode(noise((5, 7)), "BMP"),
    }
    for name, data in files.items():
        write(images / name, data)
    coco: dict[str, Any] = {
        "info": {"description": "test set", "version": "1.0"},
        "licenses": [{"id": 1, "name": "CC"}],
        "images": [
            {"id": 1, "file_name": "a.jpg", "width": 64, "height": 48},
            {"id": 2, "file_name": "b.png", "width": 60, "height": 20},  # header says 50x20
            {"id": 3, "file_name": "sub/c.webp", "width": 30, "height": 40},
            {"id": 4, "file_name": "d.gif", "width": 12, "height": 9},
            {"id": 5, "file_name": "missing.jpg", "width": 10, "height": 10},
            {"id": 6, "file_name": "sub/also-missing.png", "width": 10, "height": 10},
            {"id": 7, "file_name": "corrupt.jpg", "width": 8, "height": 8},
            {"id": 8, "file_name": "undeclared.bmp"},
        ],
        "categories": [
            {"id": 1, "name": "person", "supercategory": "human"},
            {"id": 2, "name": "dog", "supercategory": "animal"},
            {"id": 7, "name": "kite"},
        ],
        "annotations": [
            {
                "id": 100,
                "image_id": 1,
                "category_id": 1,
                "bbox": [1.5, 2.25, 30.0, 40.0],
                "area": 900.5,
                "iscrowd": 0,
                "segmentation": [[1.5, 2.5, 31.5, 2.5, 31.5, 42.0, 1.5, 42.0]],
            },
            {
                "id": 101,
                "image_id": 1,
                "category_id": 2,
                "bbox": [0, 0, 10, 10],
                "area": 100,
                "iscrowd": 1,
                "segmentation": {"size": [48, 64], "counts": RLE_COUNTS},
            },
            {
                "id": 102,
                "image_id": 2,
                "category_id": 7,
                "bbox": [59, 0, 1, 20],  # in the declared 60-wide frame
                "area": 20,
                "iscrowd": 0,
                "segmentation": {"size": [20, 60], "counts": [0, 5, 10, 5, 1180]},
            },
            {"id": 103, "image_id": 3, "category_id": 1, "bbox": [0, 0, 0, 0]},
            {"id": 104, "image_id": 5, "category_id": 1, "bbox": [1, 1, 2, 2], "area": 4},
            {"id": 105, "image_id": 7, "category_id": 2, "bbox": [1, 1, 2, 2], "area": 4},
        ],
    }
    ann = root / "instances.json"
    ann.write_text(json.dumps(coco))
    return ann, images, coco


def ingest(ds: fastindex.Dataset, ann: Path, images: Path) -> fastindex.Job:
    job = ds.add_samples_from_coco(annotations_json=ann, images_path=images, embed=False)
    finish(ds, job)
    return job


def annotation_view(ds: fastindex.Dataset, sample_id: int | None = None) -> list[dict[str, Any]]:
    return [{k: v for k, v in a.to_dict().items() if k != "id"} for a in ds.annotations(sample_id)]


def test_samples_from_coco(tmp_path: Path, new_dataset: NewDataset) -> None:
    ann, images, coco = coco_case(tmp_path)
    ds = new_dataset()
    job = ingest(ds, ann, images)
    s = job.summary
    assert s["images"] == 8
    assert s["added"] == 6 and s["existing"] == 0
    assert s["categories"] == 3
    assert sorted(s["missing"]) == ["missing.jpg", "sub/also-missing.png"]
    assert s["annotations"] == 5  # the box of missing.jpg has no sample to go to
    warnings = ds.jobs_summary(job.id)["warnings"]
    assert len(warnings) == 2 and all("not found on disk" in w for w in warnings)

    samples = {x.path: x for x in ds.samples()}
    assert set(samples) == {
        "a.jpg",
        "b.png",
        "sub/c.webp",
        "d.gif",
        "corrupt.jpg",
        "undeclared.bmp",
    }
    declared = {im["file_name"]: im for im in coco["images"]}
    for path, x in samples.items():
        assert x.root == str(images)
        assert (x.coco_width, x.coco_height) == (
            declared[path].get("width"),
            declared[path].get("height"),
        )
        ref = pillow_open((images / path).read_bytes())
        if ref is None:
            assert x.status == "failed" and x.error and x.size_mismatch is False
            continue
        assert x.status == "indexed"
        assert ((x.width, x.height), x.format) == ref  # the header is the truth
        mismatch = x.coco_width is not None and (x.coco_width, x.coco_height) != (x.width, x.height)
        assert x.size_mismatch is mismatch
    assert samples["b.png"].size_mismatch is True
    assert (samples["b.png"].width, samples["b.png"].coco_width) == (50, 60)
    assert [x.path for x in ds.samples() if x.size_mismatch] == ["b.png"]
    assert samples["undeclared.bmp"].coco_width is None

    progress = ds.get_loading_progress()
    assert progress["total"] == 6 and progress["status"] == "complete"
    assert progress_counts(progress) == status_counts(ds.db, ds.id)
    assert job.progress()["total"] == 6


def test_annotations_with_category_names(tmp_path: Path, new_dataset: NewDataset) -> None:
    ann, images, _ = coco_case(tmp_path)
    ds = new_dataset()
    ingest(ds, ann, images)
    sample_of = {x.path: x.id for x in ds.samples()}
    a_jpg = annotation_view(ds, sample_of["a.jpg"])
    assert a_jpg == [
        {
            "sample_id": sample_of["a.jpg"],
            "category": "person",
            "supercategory": "human",
            "bbox": (1.5, 2.25, 30.0, 40.0),
            "area": 900.5,
            "iscrowd": False,
            "segmentation": [[1.5, 2.5, 31.5, 2.5, 31.5, 42.0, 1.5, 42.0]],
        },
        {
            "sample_id": sample_of["a.jpg"],
            "category": "dog",
            "supercategory": "animal",
            "bbox": (0.0, 0.0, 10.0, 10.0),
            "area": 100.0,
            "iscrowd": True,
            "segmentation": {"size": [48, 64], "counts": RLE_COUNTS},
        },
    ]
    (kite,) = ds.annotations(sample_of["b.png"])
    assert (kite.category, kite.supercategory, kite.bbox) == ("kite", None, (59.0, 0.0, 1.0, 20.0))
    assert kite.segmentation == {"size": [20, 60], "counts": [0, 5, 10, 5, 1180]}
    (empty_box,) = ds.annotations(sample_of["sub/c.webp"])
    assert (empty_box.area, empty_box.segmentation) == (None, None)
    assert ds.annotations(sample_of["d.gif"]) == []
    assert [a.category for a in ds.annotations(sample_of["corrupt.jpg"])] == ["dog"]

    everything = ds.annotations()
    assert len(everything) == 5
    assert [a.sample_id for a in everything] == sorted(a.sample_id for a in everything)
    by_sample: dict[int, list[Any]] = {}
    for a in everything:
        by_sample.setdefault(a.sample_id, []).append(a)
    for sample_id, boxes in by_sample.items():
        assert boxes == ds.annotations(sample_id)
    # boxes of another dataset stay there
    other = fastindex.Dataset.create("other", db=ds.db)
    assert other.annotations() == []
    assert other.annotations(sample_of["a.jpg"]) == []


def test_reingest_adds_nothing_twice(tmp_path: Path, new_dataset: NewDataset) -> None:
    ann, images, _ = coco_case(tmp_path)
    ds = new_dataset()
    ingest(ds, ann, images)
    samples, boxes = ds.samples(), annotation_view(ds)
    for _ in range(2):
        job = ingest(ds, ann, images)
        assert (job.summary["added"], job.summary["existing"]) == (0, 6)
        assert job.progress()["total"] == 0
        assert ds.samples() == samples
        assert annotation_view(ds) == boxes
        assert ds.get_loading_progress()["total"] == 6
    # a declared size corrected in the file is taken on re-ingest
    coco = json.loads(ann.read_text())
    coco["images"][1]["width"] = 50
    ann.write_text(json.dumps(coco))
    ingest(ds, ann, images)
    b = next(x for x in ds.samples() if x.path == "b.png")
    assert (b.coco_width, b.size_mismatch) == (50, False)
    assert annotation_view(ds) == boxes
    assert progress_counts(ds.get_loading_progress()) == status_counts(ds.db, ds.id)


def test_coco_over_a_folder_already_added(tmp_path: Path, new_dataset: NewDataset) -> None:
    ann, images, _ = coco_case(tmp_path)
    write(images / "extra.png", small_png())
    ds = new_dataset()
    first = ds.add_images_from_path(tmp_path, embed=False)  # the parent of images/
    finish(ds, first)
    before = {x.abs_path: x.id for x in ds.samples()}
    job = ingest(ds, ann, images)
    assert (job.summary["added"], job.summary["existing"]) == (0, 6)
    after = {x.abs_path: x for x in ds.samples()}
    assert {p: x.id for p, x in after.items()} == before  # the same rows, now with COCO data
    b = after[str(images / "b.png")]
    assert (b.path, b.coco_width, b.size_mismatch) == ("images/b.png", 60, True)
    assert len(ds.annotations()) == 5
    assert ds.get_loading_progress()["total"] == 7


def test_a_file_listed_twice_is_one_sample(tmp_path: Path, new_dataset: NewDataset) -> None:
    write(tmp_path / "images" / "a.png", small_png())
    coco = {
        "images": [{"id": 1, "file_name": "a.png"}, {"id": 2, "file_name": "a.png"}],
        "categories": [{"id": 1, "name": "x"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1]},
            {"id": 2, "image_id": 2, "category_id": 1, "bbox": [1, 1, 1, 1]},
        ],
    }
    ann = write(tmp_path / "c.json", json.dumps(coco).encode())
    ds = new_dataset()
    first = ingest(ds, ann, tmp_path / "images")
    assert (first.summary["added"], first.summary["existing"]) == (1, 0)
    (sample,) = ds.samples()
    assert [a.bbox for a in ds.annotations(sample.id)] == [(0, 0, 1, 1), (1, 1, 1, 1)]
    again = ingest(ds, ann, tmp_path / "images")
    assert (again.summary["added"], again.summary["existing"]) == (0, 1)
    assert len(ds.annotations()) == 2


def test_two_datasets_share_nothing(tmp_path: Path, new_dataset: NewDataset) -> None:
    ann, images, _ = coco_case(tmp_path)
    one, two = new_dataset("one"), new_dataset("two")
    ingest(one, ann, images)
    job = ingest(two, ann, images)
    assert job.summary["added"] == 6
    assert len(one.annotations()) == len(two.annotations()) == 5
    assert {a.sample_id for a in one.annotations()}.isdisjoint(
        a.sample_id for a in two.annotations()
    )


# -- malformed files: a clear error, nothing written ------------------------------------------
def _mutations() -> list[tuple[str, Any, str]]:
    """`(name, change, expected message)`; `change` edits a copy of the good file, or is the
    whole text of the file when it is a string."""

    def drop(*keys: Any) -> Any:
        def f(c: dict[str, Any]) -> None:
            target: Any = c
            for k in keys[:-1]:
                target = target[k]
            del target[keys[-1]]

        return f

    def put(value: Any, *keys: Any) -> Any:
        def f(c: dict[str, Any]) -> None:
            target: Any = c
            for k in keys[:-1]:
                target = target[k]
            target[keys[-1]] = value

        return f

    return [
        ("bad json", '{"images": [', "not a COCO file"),
        ("empty file", "", "not a COCO file"),
        ("not an object", "[[], [], []]", "must be a JSON object"),
        ("no images", drop("images"), "missing field `images`"),
        ("images not a list", put({}, "images"), "not a COCO file"),
        ("image without id", drop("images", 0, "id"), "missing field `id`"),
        ("image without file_name", drop("images", 1, "file_name"), "missing field `file_name`"),
        ("empty file_name", put("", "images", 1, "file_name"), "images[1]: empty file_name"),
        ("zero width", put(0, "images", 2, "width"), "images[2]: width and height must be"),
        ("width as text", put("64", "images", 0, "width"), "not a COCO file"),
        ("category without name", drop("categories", 0, "name"), "missing field `name`"),
        ("annotation without bbox", drop("annotations", 0, "bbox"), "missing field `bbox`"),
        ("unknown image_id", put(999, "annotations", 2, "image_id"), "[2]: image_id 999"),
        ("unknown category_id", put(42, "annotations", 1, "category_id"), "[1]: category_id 42"),
        ("bbox of three", put([1, 2, 3], "annotations", 0, "bbox"), "annotations[0]: bbox"),
        ("bbox negative", put([1, 2, -3, 4], "annotations", 3, "bbox"), "annotations[3]: bbox"),
        ("bbox text", put(["1", 2, 3, 4], "annotations", 0, "bbox"), "not a COCO file"),
        ("duplicate image id", put(1, "images", 3, "id"), "images[3]: duplicate image id 1"),
        ("duplicate category id", put(1, "categories", 2, "id"), "[2]: duplicate category id 1"),
        ("duplicate annotation id", put(100, "annotations", 4, "id"), "[4]: duplicate annotation"),
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("name", "change", "message"), _mutations(), ids=[m[0] for m in _mutations()]
)
def test_malformed_file_raises_before_writing(
    tmp_path: Path, new_dataset: NewDataset, name: str, change: Any, message: str
) -> None:
    ann, images, coco = coco_case(tmp_path)
    ds = new_dataset()
    write(images / "../other/x.png", small_png())
    finish(ds, ds.add_images_from_path(tmp_path / "other", embed=False))  # not empty
    if isinstance(change, str):
        ann.write_text(change)
    else:
        bad = copy.deepcopy(coco)
        change(bad)
        ann.write_text(json.dumps(bad))
    before = table_counts(ds.db)
    with pytest.raises(fastindex.CocoError) as e:
        ds.add_samples_from_coco(annotations_json=ann, images_path=images, embed=False)
    assert message in str(e.value)
    assert str(ann) in str(e.value)
    assert "\n" not in str(e.value)
    assert table_counts(ds.db) == before
    assert isinstance(e.value, fastindex.InvalidArgumentError)


def test_missing_paths_raise_before_writing(tmp_path: Path, new_dataset: NewDataset) -> None:
    ann, images, _ = coco_case(tmp_path)
    ds = new_dataset()
    before = table_counts(ds.db)
    with pytest.raises(fastindex.PathNotFoundError, match=r"nope\.json"):
        ds.add_samples_from_coco(
            annotations_json=tmp_path / "nope.json", images_path=images, embed=False
        )
    with pytest.raises(fastindex.PathNotFoundError, match="no-images"):
        ds.add_samples_from_coco(
            annotations_json=ann, images_path=tmp_path / "no-images", embed=False
        )
    with pytest.raises(fastindex.InvalidArgumentError, match="not a folder"):
        ds.add_samples_from_coco(annotations_json=ann, images_path=ann, embed=False)
    with pytest.raises(fastindex.InvalidArgumentError):
        ds.add_samples_from_coco(annotations_json=images, images_path=images, embed=False)
    assert table_counts(ds.db) == before


# -- random COCO files ------------------------------------------------------------------------
_POOL = {
    "p1.png": small_png(1, (11, 7)),
    "p2.jpg": encode(noise((13, 5)), "JPEG"),
    "dir/p3.gif": encode(noise((4, 9), "P"), "GIF"),
}


@st.composite
def coco_files(draw: st.DrawFn) -> dict[str, Any]:
    names = draw(
        st.lists(
            st.sampled_from([*_POOL, "gone.png", "dir/gone.jpg"]),
            min_size=1,
            max_size=5,
            unique=True,
        )
    )
    images = []
    for i, name in enumerate(names):
        im: dict[str, Any] = {"id": 10 * i + 3, "file_name": name}
        if draw(st.booleans()):
            im["width"], im["height"] = draw(st.integers(1, 20)), draw(st.integers(1, 20))
        images.append(im)
    n_cat = draw(st.integers(1, 3))
    categories = [{"id": 50 + c, "name": f"cat{c}"} for c in range(n_cat)]
    annotations = []
    for k in range(draw(st.integers(0, 8))):
        box = draw(st.lists(st.floats(0, 100, allow_nan=False), min_size=4, max_size=4))
        annotations.append({
            "id": 1000 + k,
            "image_id": draw(st.sampled_from(images))["id"],
            "category_id": draw(st.sampled_from(categories))["id"],
            "bbox": box,
            "area": box[2] * box[3],
            "iscrowd": draw(st.integers(0, 1)),
        })  # fmt: skip
    return {"images": images, "categories": categories, "annotations": annotations}


@settings(max_examples=25)
@given(coco=coco_files())
def test_random_coco_files(coco: dict[str, Any]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for name, data in _POOL.items():
            write(root / "images" / name, data)
        ann = write(root / "c.json", json.dumps(coco).encode())
        ds = fastindex.Dataset.create("random", db=root / "s.db")
        try:
            check_random_coco(ds, ann, root / "images", coco)
        finally:
            ds.cancel()  # no background thread may outlive the folder


def check_random_coco(ds: fastindex.Dataset, ann: Path, images: Path, coco: dict[str, Any]) -> None:
    """Ingest twice; check samples, missing files, boxes and declared sizes each time."""
    for round_ in range(2):
        job = ingest(ds, ann, images)
        present = [im for im in coco["images"] if im["file_name"] in _POOL]
        assert sorted(job.summary["missing"]) == sorted(
            im["file_name"] for im in coco["images"] if im["file_name"] not in _POOL
        )
        assert job.summary["added"] == (len(present) if round_ == 0 else 0)
        samples = {x.path: x for x in ds.samples()}
        assert set(samples) == {im["file_name"] for im in present}
        by_image = {im["id"]: samples[im["file_name"]].id for im in present}
        expected = sorted(
            (
                by_image[a["image_id"]],
                f"cat{a['category_id'] - 50}",
                tuple(a["bbox"]),
                bool(a["iscrowd"]),
            )
            for a in coco["annotations"]
            if a["image_id"] in by_image
        )
        got = sorted((a.sample_id, a.category, a.bbox, a.iscrowd) for a in ds.annotations())
        assert got == expected
        for im in present:
            x = samples[im["file_name"]]
            assert (x.coco_width, x.coco_height) == (im.get("width"), im.get("height"))
            assert x.size_mismatch is (
                "width" in im and (im["width"], im["height"]) != (x.width, x.height)
            )
