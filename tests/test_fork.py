"""A forked child (multiprocessing's default on Linux, DataLoader workers...) can use fastindex
after its parent did: the thread pools are rebuilt per process instead of hanging."""

from __future__ import annotations

import multiprocessing
import warnings
from pathlib import Path

import fastindex
from PIL import Image


def _index_in_child(folder: str, db: str, out: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    ds = fastindex.Dataset.create("child", db=db)
    job = ds.add_images_from_path(folder, embed=False)
    job.wait(30)
    out.put(job.progress()["indexed"])


def test_pools_work_after_fork(tmp_path: Path) -> None:
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(40):
        Image.new("RGB", (8 + i, 9)).save(folder / f"{i}.png")
    # the parent uses both pools first
    parent = fastindex.Dataset.create("parent", db=tmp_path / "parent.db")
    assert parent.add_images_from_path(folder, embed=False).wait(30)

    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    with warnings.catch_warnings():
        # Python 3.12+ warns about fork() in a process with threads: that is the point here.
        warnings.simplefilter("ignore", DeprecationWarning)
        child = ctx.Process(
            target=_index_in_child, args=(str(folder), str(tmp_path / "child.db"), out)
        )
        child.start()
    child.join(60)
    assert child.exitcode == 0, "the forked child hung or failed"
    assert out.get(timeout=5) == 40
