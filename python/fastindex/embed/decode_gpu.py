"""Decoding on the GPU: batched JPEG decoding with torchvision (nvJPEG on CUDA), then a
batched resize, crop and pad on the device."""

from __future__ import annotations

import collections
import contextlib
from typing import TYPE_CHECKING

from .orientation import _orient_chw
from .read import _reason
from .transform import _Preprocess

if TYPE_CHECKING:
    import torch


class _TorchJpegDecoder:
    """Batched JPEG decoding with torchvision (nvJPEG on CUDA), then a resize batched per
    distinct source size, crop and pad, into uint8 `(h, w, 3)` slots on the device.

    Runs in its own thread (and CUDA stream), so that decoding overlaps the forward pass.
    """

    #: Most source pixels one interpolate call takes (bounds its float32 temporary).
    MAX_PIXELS = 48_000_000

    def __init__(self, device: torch.device, pre: _Preprocess) -> None:
        import torch

        self.device = device
        self.pre = pre
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None  # type: ignore[no-untyped-call]

    def decode(
        self, items: list[tuple[bytes | bytearray, int]]
    ) -> tuple[list[torch.Tensor | None], list[str | None]]:
        """Decode `(data, orientation)` items; returns per item the `(h, w, 3)` uint8 tensor
        on the device, or None with a reason (the caller then lets the CPU try)."""
        import torch

        ctx = (
            torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()
        )
        with ctx, torch.inference_mode():
            out, errs = self._decode(items)
            if self.stream is not None:
                self.stream.synchronize()
        return out, errs

    def _decode(
        self, items: list[tuple[bytes | bytearray, int]]
    ) -> tuple[list[torch.Tensor | None], list[str | None]]:
        import torch
        import torch.nn.functional as F

        n = len(items)
        out: list[torch.Tensor | None] = [None] * n
        errs: list[str | None] = [None] * n
        datas = [torch.frombuffer(_writable(d), dtype=torch.uint8) for d, _ in items]
        try:
            decoded: list[torch.Tensor | None] = list(_torch_decode_jpegs(datas, self.device))
        except RuntimeError:
            # One bad file fails the whole batched call: decode one by one to find it.
            decoded = []
            for k, d in enumerate(datas):
                try:
                    decoded.extend(_torch_decode_jpegs([d], self.device))
                except RuntimeError as e:
                    decoded.append(None)
                    errs[k] = _reason(e)
        # Orient, then group by size: one interpolate call per distinct size.
        groups: dict[tuple[int, int], list[int]] = collections.defaultdict(list)
        oriented: list[torch.Tensor | None] = [None] * n
        for i, t in enumerate(decoded):
            if t is None:
                continue
            t = _orient_chw(t, items[i][1])
            oriented[i] = t
            groups[(int(t.shape[1]), int(t.shape[2]))].append(i)
        th, tw = self.pre.size
        mode = "bilinear" if self.pre.interpolation == "bilinear" else "bicubic"
        for (h, w), idx in groups.items():
            p = self.pre.plan(h, w)
            step = max(1, self.MAX_PIXELS // (h * w))
            for s in range(0, len(idx), step):
                part = idx[s : s + step]
                x = torch.stack([oriented[i] for i in part]).float()  # type: ignore[misc]
                if (p.rh, p.rw) != (h, w):
                    x = F.interpolate(
                        x, size=(p.rh, p.rw), mode=mode, antialias=True, align_corners=False
                    )
                x = x[:, :, p.top : p.top + p.ch, p.left : p.left + p.cw]
                x = x.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
                if p.padded:
                    canvas = torch.full(
                        (len(part), th, tw, 3), self.pre.fill, dtype=torch.uint8, device=self.device
                    )
                    canvas[:, p.dy : p.dy + p.ch, p.dx : p.dx + p.cw] = x
                    x = canvas
                for j, i in enumerate(part):
                    out[i] = x[j]
        return out, errs


def _torch_decode_jpegs(datas: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """torchvision's JPEG decoder (nvJPEG, batched, on CUDA), as RGB `(3, h, w)` uint8.

    Calls the operators `torchvision.io.decode_jpeg` calls, without its deprecation warning
    (torchvision 0.29 points to TorchCodec, which has no batched nvJPEG decoder yet); where
    they are gone, the public function."""
    import torch
    import torchvision.io.image as tvi  # type: ignore[import-untyped]

    rgb = tvi.ImageReadMode.RGB.value
    ops = getattr(torch.ops, "image", None)
    if ops is not None and tvi._has_image_ops():
        if device.type == "cuda":
            return list(ops.decode_jpegs_cuda(datas, rgb, device))
        return [ops.decode_jpeg(d, rgb, False) for d in datas]
    return list(
        tvi.decode_jpeg(datas, mode=tvi.ImageReadMode.RGB, device=device)
    )  # pragma: no cover


def _writable(d: bytes | bytearray) -> bytearray:
    return d if isinstance(d, bytearray) else bytearray(d)
