"""Rows as the user sees them: samples and their annotations."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Sample:
    """One image file of a dataset.

    `path` is relative to `root` (the folder it was added from). Both are `str` as
    `os.fsdecode` gives them: a name that is not UTF-8 holds surrogates, `os.fsencode(path)`
    is its exact bytes, and `open(sample.abs_path)` reaches the file. `width`, `height`, `format`
    and `orientation` are known once the sample is `indexed`. `coco_width`/`coco_height` are
    what a COCO file declared; `size_mismatch` is set when they differ from the header. A
    `failed` sample without `size_bytes` is something the walk could not take (a broken link,
    a link loop, an unreadable folder), with the reason in `error`. A `missing` sample's file
    is gone from its folder (a sync found it so); it keeps what was known of it.
    """

    id: int
    dataset_id: int
    job_id: int
    root: str
    path: str
    size_bytes: int | None
    mtime_ns: int | None
    status: str
    width: int | None
    height: int | None
    format: str | None
    orientation: int | None
    error: str | None
    coco_width: int | None
    coco_height: int | None
    size_mismatch: bool

    @property
    def file_name(self) -> str:
        return os.path.basename(self.path)

    @property
    def abs_path(self) -> str:
        return os.path.join(self.root, self.path)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["file_name"] = self.file_name
        return d


@dataclass(frozen=True, slots=True)
class Annotation:
    """A COCO box: `bbox` is `(x, y, width, height)` in the frame the COCO file declared."""

    id: int
    sample_id: int
    category: str
    supercategory: str | None
    bbox: tuple[float, float, float, float]
    area: float | None
    iscrowd: bool
    segmentation: Any

    @classmethod
    def from_row(cls, row: tuple[Any, ...]) -> Annotation:
        ann_id, sample_id, category, supercategory, bbox, area, iscrowd, seg = row
        return cls(
            ann_id,
            sample_id,
            category,
            supercategory,
            tuple(bbox),
            area,
            bool(iscrowd),
            json.loads(seg) if seg is not None else None,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
