"""Shared by `bench_embed_cpu.py` and `bench_embed_gpu.py`: the image set, and the three
measurements (the model alone, the naive loop, fastindex) for one model."""

from __future__ import annotations

import io
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import fastindex
import numpy as np
from fastindex import _core
from fastindex.embed import EmbeddingModel, embed_pending

#: Photo-like sizes, weighted towards what cameras and the web make.
SIZES = [
    (640, 480),
    (800, 600),
    (1024, 768),
    (1280, 720),
    (1920, 1080),
    (2048, 1536),
    (3000, 2000),
    (500, 375),
]


def make_jpegs(root: Path, n: int, *, pool: int = 48, seed: int = 0) -> Path:
    """`n` JPEG files of mixed sizes (some portrait, some with EXIF orientation) under `root`,
    made once (a marker file says they are there)."""
    from PIL import Image

    marker = root / f".complete-{n}"
    if marker.exists():
        return root
    rng = random.Random(seed)
    blobs = []
    for i in range(pool):
        w, h = SIZES[i % len(SIZES)]
        if i % 4 == 3:
            w, h = h, w
        small = np.random.default_rng(i).integers(0, 256, (h // 32, w // 32, 3), dtype=np.uint8)
        im = Image.fromarray(small, "RGB").resize((w, h), Image.Resampling.BICUBIC)
        kw: dict[str, Any] = {"quality": rng.choice([75, 85, 92])}
        if i % 5 == 0:
            exif = Image.Exif()
            exif[0x0112] = rng.choice([3, 6, 8])
            kw["exif"] = exif.tobytes()
        if i % 7 == 1:
            kw["progressive"] = True
        buf = io.BytesIO()
        im.save(buf, "JPEG", **kw)
        blobs.append(buf.getvalue())
    for i in range(n):
        p = root / f"d{i // 1000:03d}" / f"img_{i:06d}.jpg"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(blobs[rng.randrange(pool)])
    marker.write_text("ok")
    return root


def files_of(root: Path) -> list[Path]:
    return sorted(root.rglob("*.jpg"))


def model_alone(model: EmbeddingModel, *, batches: int = 10) -> float:
    """Images/s of the forward pass on random input already on the device (the ceiling)."""
    import torch

    model.load()
    th, tw = model.preprocess.size
    dtype = model._dtype
    x = torch.randn(model.batch_size, 3, th, tw, device=model.device).to(dtype)
    with torch.inference_mode():
        model._model.encode_image(x)
        _sync(model)
        t = time.perf_counter()
        for _ in range(batches):
            model._model.encode_image(x)
        _sync(model)
    return batches * model.batch_size / (time.perf_counter() - t)


def naive_loop(model: EmbeddingModel, files: list[Path]) -> float:
    """Images/s of the obvious loop: PIL open, open_clip's transform, one image per forward."""
    import torch
    from PIL import Image

    transform = model.reference_transform()
    net = model._model
    with torch.inference_mode():
        net.encode_image(
            transform(Image.open(files[0])).unsqueeze(0).to(model.device, model._dtype)
        )
        t = time.perf_counter()
        for f in files:
            with Image.open(f) as im:
                x = transform(im).unsqueeze(0).to(model.device, model._dtype)
            net.encode_image(x).float().cpu()
    return len(files) / (time.perf_counter() - t)


def phase3_only(model: EmbeddingModel, folder: Path, work: Path) -> tuple[float, dict[str, int]]:
    """Images/s of `embed_pending` over rows already indexed (phase 3 on its own)."""
    db = str(work / "phase3.db")
    store = _core.Store(db)
    did = store.create_dataset("bench")
    store.scan(did, str(folder))
    store.probe_pending(did)
    stats: dict[str, int] = {}
    t = time.perf_counter()
    n = embed_pending(
        store,
        did,
        model,
        stop=_core.StopFlag(),
        producer_alive=lambda: False,
        on_batch=lambda: None,
        stats=stats,
    )
    return n / (time.perf_counter() - t), stats


def end_to_end(model: EmbeddingModel, folder: Path, work: Path) -> tuple[float, int]:
    """Images/s of `add_images_from_path(embed=model)` until every sample is `ready` (the
    walk, the header probe and phase 3, running together)."""
    ds = fastindex.Dataset.create("bench", db=work / "e2e.db")
    t = time.perf_counter()
    job = ds.add_images_from_path(folder, embed=model)
    job.wait()
    dt = time.perf_counter() - t
    p = job.progress()
    assert p["ready"] == p["total"] and not p["error"], p
    return p["ready"] / dt, p["ready"]


def _sync(model: EmbeddingModel) -> None:
    if model.device.type == "cuda":
        import torch

        torch.cuda.synchronize(model.device)


def run(models: list[EmbeddingModel], folder: Path, *, naive_n: int, title: str) -> None:
    files = files_of(folder)
    rows = []
    for m in models:
        m.load()
        ceiling = model_alone(m)
        naive = naive_loop(m, files[:naive_n])
        with tempfile.TemporaryDirectory() as tmp:
            p3, stats = phase3_only(m, folder, Path(tmp))
            e2e, n = end_to_end(m, folder, Path(tmp))
        rows.append((m, ceiling, naive, p3, e2e, n, stats))
        print(f"  {m.name}: done", file=sys.stderr)
    cpus = len(os.sched_getaffinity(0))
    print(f"\n{title} ({cpus} CPUs, {len(files):,} JPEGs of mixed sizes, page cache warm)")
    head = (
        f"{'model':<16} {'device':<6} {'batch':>5} {'model alone':>12} {'naive loop':>11} "
        f"{'phase 3 only':>13} {'end to end':>11} {'of ceiling':>10}  decoded by"
    )
    print(head)
    print("-" * len(head))
    for m, ceiling, naive, p3, e2e, _, st in rows:
        split = f"cpu {st['decoded_cpu']:,} / gpu {st['decoded_gpu']:,} / pil {st['decoded_pil']:,}"
        print(
            f"{m.name:<16} {m.device.type:<6} {m.batch_size:>5} {ceiling:>12,.0f} {naive:>11,.1f} "
            f"{p3:>13,.0f} {e2e:>11,.0f} {e2e / ceiling:>10.0%}  {split}"
        )
    print(
        f"images/s; naive = PIL + open_clip transform, one image per forward ({naive_n} "
        "images); end to end = add_images_from_path(embed=...) until all are ready"
    )
