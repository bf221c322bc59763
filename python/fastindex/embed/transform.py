"""The geometry and colour constants of a model's image transform, and where an image lands
in the model's input: open_clip's resize, center crop (or pad) and normalise semantics."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import EmbeddingError


@dataclass(frozen=True)
class _Preprocess:
    """The geometry and colour constants of a model's image transform."""

    size: tuple[int, int]  # (height, width)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str  # "bicubic" | "bilinear"
    resize_mode: str  # "shortest" | "longest" | "squash"
    fill: int

    @classmethod
    def from_cfg(cls, cfg: dict[str, Any]) -> _Preprocess:
        size = cfg.get("size", 224)
        hw = (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[-1]))
        interp = "bilinear" if cfg.get("interpolation") == "bilinear" else "bicubic"
        mode = cfg.get("resize_mode") or "shortest"
        if mode not in ("shortest", "longest", "squash"):
            raise EmbeddingError(f"unsupported resize_mode {mode!r} in the model's preprocessing")
        mean = cfg.get("mean") or (0.48145466, 0.4578275, 0.40821073)
        std = cfg.get("std") or (0.26862954, 0.26130258, 0.27577711)
        mean3 = tuple(float(m) for m in (mean if len(mean) == 3 else (mean[0],) * 3))
        std3 = tuple(float(s) for s in (std if len(std) == 3 else (std[0],) * 3))
        fill = cfg.get("fill_color", 0)
        return cls(hw, mean3, std3, interp, mode, int(fill) if isinstance(fill, int) else 0)  # type: ignore[arg-type]

    def plan(self, h: int, w: int) -> _Plan:
        """Where an `h` x `w` (oriented) image lands: resized size, then crop or pad.

        Must match open_clip's `image_transform` (torchvision `Resize` + `CenterCrop` for a
        square `shortest`, `ResizeKeepRatio` + `CenterCrop(OrPad)` otherwise).
        """
        th, tw = self.size
        if self.resize_mode == "squash":
            rh, rw = th, tw
        elif self.resize_mode == "shortest" and th == tw:
            # torchvision's Resize(int): the short side becomes `th`, the long one truncates.
            if w <= h:
                rw, rh = th, int(th * h / w)
            else:
                rh, rw = th, int(th * w / h)
        else:
            rh_, rw_ = h / th, w / tw
            ratio = max(rh_, rw_) if self.resize_mode == "longest" else min(rh_, rw_)
            rh, rw = max(1, round(h / ratio)), max(1, round(w / ratio))
        # center_crop_or_pad: pad a short side (fill), crop a long one (rounded half to even,
        # as torchvision does).
        if rh >= th:
            top, dy, ch = round((rh - th) / 2.0), 0, th
        else:
            top, dy, ch = 0, (th - rh) // 2, rh
        if rw >= tw:
            left, dx, cw = round((rw - tw) / 2.0), 0, tw
        else:
            left, dx, cw = 0, (tw - rw) // 2, rw
        return _Plan(rh, rw, top, left, ch, cw, dy, dx, ch < th or cw < tw)


@dataclass(frozen=True, slots=True)
class _Plan:
    rh: int  # resized height and width
    rw: int
    top: int  # crop origin in the resized image
    left: int
    ch: int  # size of the region copied out of the resized image
    cw: int
    dy: int  # where it lands in the output (non-zero only when padding)
    dx: int
    padded: bool
