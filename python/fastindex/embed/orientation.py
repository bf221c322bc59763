"""EXIF orientation: read from an image's bytes, applied to arrays, tensors and PIL images."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from .. import _core

if TYPE_CHECKING:
    import torch


def _orientation_of(data: bytes) -> int:
    try:
        return int(_core.probe_bytes(data).get("orientation") or 1)
    except Exception:
        return 1


def _orient(a: np.ndarray, orientation: int) -> np.ndarray:
    """Apply an EXIF orientation to an `(h, w, c)` array (PIL's `exif_transpose`)."""
    if orientation == 2:
        return a[:, ::-1]
    if orientation == 3:
        return a[::-1, ::-1]
    if orientation == 4:
        return a[::-1]
    if orientation == 5:
        return a.transpose(1, 0, 2)
    if orientation == 6:
        return a.transpose(1, 0, 2)[:, ::-1]
    if orientation == 7:
        return a.transpose(1, 0, 2)[::-1, ::-1]
    if orientation == 8:
        return a.transpose(1, 0, 2)[::-1]
    return a


def _swaps(orientation: int) -> bool:
    return orientation in (5, 6, 7, 8)


_PIL_ORIENT: dict[int, Any] = {}


def _init_pil_orient() -> None:
    from PIL import Image

    t = Image.Transpose
    _PIL_ORIENT.update(
        {
            2: t.FLIP_LEFT_RIGHT,
            3: t.ROTATE_180,
            4: t.FLIP_TOP_BOTTOM,
            5: t.TRANSPOSE,
            6: t.ROTATE_270,
            7: t.TRANSVERSE,
            8: t.ROTATE_90,
        }
    )


_init_pil_orient()


def _orient_chw(t: torch.Tensor, orientation: int) -> torch.Tensor:
    """`_orient` for a `(c, h, w)` tensor."""
    if orientation == 2:
        return t.flip(2)
    if orientation == 3:
        return t.flip(1, 2)
    if orientation == 4:
        return t.flip(1)
    if orientation == 5:
        return t.transpose(1, 2)
    if orientation == 6:
        return t.transpose(1, 2).flip(2)
    if orientation == 7:
        return t.transpose(1, 2).flip(1, 2)
    if orientation == 8:
        return t.transpose(1, 2).flip(1)
    return t
