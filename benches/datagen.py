"""Generate the datasets the benchmarks measure, so anyone can rerun them.

Real encoded images (JPEG baseline and progressive, some with EXIF and a large ICC profile,
PNG in several modes) of mixed sizes are made once into a pool, then written out as many
files in nested folders. Files keep real headers and realistic byte sizes.
"""

from __future__ import annotations

import io
import json
import os
import random
from pathlib import Path

from PIL import Image


def _pool(seed: int = 0, n: int = 96) -> list[tuple[bytes, str]]:
    rng = random.Random(seed)
    out: list[tuple[bytes, str]] = []
    icc = bytes(rng.getrandbits(8) for _ in range(200_000))
    for i in range(n):
        w, h = rng.choice(
            [(64, 48), (320, 240), (640, 480), (1024, 768), (1920, 1080), (3000, 2000)]
        )
        w, h = (w, h) if rng.random() < 0.7 else (h, w)
        base = Image.effect_noise((w // 8 or 1, h // 8 or 1), 40).convert("RGB").resize((w, h))
        buf = io.BytesIO()
        if i % 3 == 2:
            base.convert(rng.choice(["RGB", "RGBA", "L", "P"])).save(buf, "PNG")
            out.append((buf.getvalue(), "png"))
            continue
        kw: dict[str, object] = {"quality": rng.choice([70, 85, 95])}
        if i % 4 == 1:
            kw["progressive"] = True
        if i % 5 == 0:
            exif = Image.Exif()
            exif[0x0112] = rng.choice([1, 3, 6, 8])
            kw["exif"] = exif.tobytes()
        if i % 16 == 3:
            kw["icc_profile"] = icc
        base.save(buf, "JPEG", **kw)
        out.append((buf.getvalue(), "jpg"))
    return out


def make_mixed(root: Path, n: int, per_dir: int = 1000, seed: int = 0) -> list[dict[str, object]]:
    """`n` files of mixed formats and sizes under `root/dNNN/eNN/` ; returns COCO image rows."""
    marker = root / f".complete-{n}"
    pool = _pool(seed)
    sizes = [Image.open(io.BytesIO(b)).size for b, _ in pool]
    rng = random.Random(seed)
    images: list[dict[str, object]] = []
    picks = [rng.randrange(len(pool)) for _ in range(n)]
    for i, k in enumerate(picks):
        d = i // per_dir
        rel = f"d{d:04d}/e{(i // 100) % 10:02d}/img_{i:07d}.{pool[k][1]}"
        w, h = sizes[k]
        images.append({"id": i + 1, "file_name": rel, "width": w, "height": h})
    if marker.exists():
        return images
    for img, k in zip(images, picks, strict=True):
        p = root / str(img["file_name"])
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(pool[k][0])
    marker.write_text("ok")
    return images


def make_tiny(root: Path, n: int, per_dir: int = 1000) -> None:
    """`n` small PNG files (a valid header and nothing else heavy) for the 1M-file walk."""
    marker = root / f".complete-{n}"
    if marker.exists():
        return
    buf = io.BytesIO()
    Image.new("RGB", (4, 3)).save(buf, "PNG")
    data = buf.getvalue()
    for d in range((n + per_dir - 1) // per_dir):
        sub = root / f"d{d:04d}"
        sub.mkdir(parents=True, exist_ok=True)
        for i in range(min(per_dir, n - d * per_dir)):
            with open(sub / f"{i:04d}.png", "wb") as f:
                f.write(data)
    marker.write_text("ok")


def make_coco(path: Path, images: list[dict[str, object]], boxes: int, seed: int = 0) -> None:
    """A COCO detection file over `images` with `boxes` annotations (polygons on some)."""
    if path.exists():
        return
    rng = random.Random(seed)
    cats = [{"id": i + 1, "name": f"class{i}", "supercategory": f"super{i % 8}"} for i in range(80)]
    anns = []
    for a in range(boxes):
        im = images[rng.randrange(len(images))]
        w, h = float(im["width"]), float(im["height"])  # type: ignore[arg-type]
        x, y = rng.uniform(0, w * 0.8), rng.uniform(0, h * 0.8)
        bw, bh = rng.uniform(1, w - x), rng.uniform(1, h - y)
        ann = {
            "id": a + 1,
            "image_id": im["id"],
            "category_id": rng.randrange(80) + 1,
            "bbox": [round(x, 2), round(y, 2), round(bw, 2), round(bh, 2)],
            "area": round(bw * bh, 2),
            "iscrowd": 0,
        }
        if a % 4 == 0:
            ann["segmentation"] = [[x, y, x + bw, y, x + bw, y + bh, x, y + bh]]
        anns.append(ann)
    doc = {"images": images, "categories": cats, "annotations": anns}
    path.write_text(json.dumps(doc))


def data_root() -> Path:
    return Path(
        os.environ.get(
            "FASTINDEX_BENCH_DATA", Path(__file__).resolve().parent.parent / "bench-data"
        )
    )
