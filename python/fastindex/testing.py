"""Helpers for tests and benchmarks: a tiny CLIP architecture that runs in milliseconds on a
CPU, and image files made on the spot. Not part of the stable API."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

#: An open_clip architecture small enough for CI: 64x64 input, 2+2 layers, 64-d embeddings.
#: The text tower keeps CLIP's tokenizer (vocabulary 49408, context 77).
TINY_MODEL = "fastindex-tiny"
TINY_MODEL_CFG: dict[str, Any] = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def register_tiny_model() -> str:
    """Register `TINY_MODEL` with open_clip in this process; returns its name."""
    from .embed import register_model_config

    register_model_config(TINY_MODEL, TINY_MODEL_CFG)
    return TINY_MODEL


def tiny_model(**kwargs: Any) -> Any:
    """`EmbeddingModel(TINY_MODEL, pretrained=None, device="cpu", **kwargs)`: random weights
    with a fixed seed, so every process gets the same model."""
    from .embed import EmbeddingModel

    register_tiny_model()
    kwargs.setdefault("device", "cpu")
    return EmbeddingModel(TINY_MODEL, pretrained=None, **kwargs)


def image_bytes(
    size: tuple[int, int] = (96, 64),
    *,
    seed: int = 0,
    fmt: str = "JPEG",
    mode: str = "RGB",
    orientation: int | None = None,
    **save: Any,
) -> bytes:
    """An encoded image of smooth random colour blobs (`size` is width, height)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    w, h = size
    small = rng.integers(0, 256, (max(2, h // 16), max(2, w // 16), 3), dtype=np.uint8)
    im = Image.fromarray(small, "RGB").resize((w, h), Image.Resampling.BICUBIC)
    if mode != "RGB":
        im = im.convert(mode)
    if orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = orientation
        save["exif"] = exif.tobytes()
    buf = io.BytesIO()
    im.save(buf, fmt, **save)
    return buf.getvalue()


def write_image(path: str | os.PathLike[str], data: bytes) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
    return p


def clustered(n: int, dim: int, *, seed: int = 0, start: int = 0, clusters: int = 200) -> Any:
    """Unit vectors clustered like CLIP's: centres in a low-rank subspace sharing a mean
    direction, isotropic noise (random pairs score ~0.3, nearest neighbours ~0.85). Chunks
    with different `start` come from the same clusters."""
    import numpy as np

    g = np.random.default_rng(seed)
    rank = min(dim, 96)
    basis = g.standard_normal((rank, dim)).astype(np.float32) / np.sqrt(rank)
    mean = g.standard_normal(dim).astype(np.float32)
    mean /= np.linalg.norm(mean)
    centres = g.standard_normal((clusters, rank)).astype(np.float32) @ basis
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    centres += 0.8 * mean
    spread = g.uniform(0.5, 1.2, clusters).astype(np.float32)
    r = np.random.default_rng([seed, start])
    label = r.integers(0, clusters, n)
    x = r.standard_normal((n, dim), dtype=np.float32)
    x *= (spread[label] * 0.68 / np.sqrt(dim))[:, None]
    x += centres[label]
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x
