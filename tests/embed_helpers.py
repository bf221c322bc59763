"""Helpers for the phase-3 tests: folders of images, a GPU marker, reading the store."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import fastindex
import numpy as np
import pytest
from fastindex.testing import image_bytes, write_image


def _cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def gpu_test(f: Callable[..., Any]) -> Callable[..., Any]:
    """Mark a test `gpu` and skip it where torch sees no CUDA device."""
    return pytest.mark.gpu(pytest.mark.skipif(not _cuda(), reason="needs a CUDA device")(f))


def make_folder(root: Path, n: int = 12, *, seed: int = 0) -> list[Path]:
    """`n` images of mixed sizes, formats and EXIF orientations under `root`."""
    shapes = [(320, 240), (240, 320), (640, 480), (97, 61), (1200, 800), (64, 64)]
    out = []
    for i in range(n):
        w, h = shapes[i % len(shapes)]
        if i % 5 == 4:
            data = image_bytes((w, h), seed=seed + i, fmt="PNG", mode="RGBA" if i % 2 else "RGB")
            name = f"img_{i:03d}.png"
        else:
            data = image_bytes((w, h), seed=seed + i, orientation=(None, 6, 3, 8)[i % 4])
            name = f"img_{i:03d}.jpg"
        out.append(write_image(root / f"d{i % 3}" / name, data))
    return out


def wait_until(pred: Callable[[], bool], timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.01)
    return bool(pred())


def vectors_by_path(ds: fastindex.Dataset, model: Any = None) -> dict[str, np.ndarray]:
    ids, v = ds.embeddings(model)
    by_id = {s.id: s.path for s in ds.samples_by_id([int(i) for i in ids])}
    return {by_id[int(i)]: v[k] for k, i in enumerate(ids)}


def slow_model(forward_s: float, **kw: Any) -> Any:
    """The tiny test model (random weights, CPU) whose every forward pass first sleeps
    `forward_s` seconds: a real model that commits a batch every few seconds, as a large
    model on a CPU does."""
    from fastindex.embed import EmbeddingModel

    class SlowModel(EmbeddingModel):
        def _forward(self, batch: Any) -> Any:
            time.sleep(forward_s)
            return super()._forward(batch)

    return SlowModel(fastindex.testing.register_tiny_model(), None, device="cpu", **kw)
