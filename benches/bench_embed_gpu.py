"""Phase 3 on one CUDA GPU: ViT-B-32 and ViT-L-14 (random weights, fp16, batch 256).

    python benches/bench_embed_gpu.py [--n 10000] [--data bench-data/embed-gpu]

Prints, per model, images/s for the model alone on random fp16 tensors on the GPU (the
ceiling), the naive loop (PIL decode + open_clip transform, one image per forward) and
fastindex (phase 3 alone over indexed rows, and end to end: add_images_from_path until every
sample is ready), with how many JPEGs the GPU (nvJPEG) and the CPU threads decoded.

Needs torch and torchvision with CUDA; open_clip_torch, simplejpeg and faiss-cpu are pure
wheels that may have to be carried to a machine without network (pip download them, then
`pip install --no-index --find-links wheels/ ...`), and the extension built
(`pip install -e . --no-deps`). Random weights run at the speed of real ones; no download.
Goals (issue 3): ViT-B-32 end to end >= 15,000 images/s on an H200, ViT-L-14 >= 90% of its
ceiling.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from embed_common import make_jpegs, run
from fastindex.embed import EmbeddingModel


def main() -> None:
    import torch

    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--naive", type=int, default=300, help="images for the naive loop")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--models", default="ViT-B-32,ViT-L-14")
    ap.add_argument("--data", default="bench-data/embed-gpu")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_embed_gpu.py needs a CUDA device (see bench_embed_cpu.py)")
    torch.backends.cuda.matmul.allow_tf32 = True
    folder = make_jpegs(Path(a.data), a.n)
    models = [
        EmbeddingModel(name, pretrained=None, device="cuda", batch_size=a.batch_size)
        for name in a.models.split(",")
    ]
    run(models, folder, naive_n=a.naive, title=f"phase 3 on {torch.cuda.get_device_name(0)}")


if __name__ == "__main__":
    main()
