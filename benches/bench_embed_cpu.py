"""Phase 3 on this CPU: the tiny test architecture and a small ViT (ViT-S-32), random weights.

    python benches/bench_embed_cpu.py [--n 1500] [--data bench-data/embed-cpu]

Prints images/s for the model alone (random tensors), the naive loop (PIL decode + open_clip
transform, one image at a time) and fastindex (phase 3 alone, and end to end).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from embed_common import make_jpegs, run
from fastindex.embed import EmbeddingModel
from fastindex.testing import tiny_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1500)
    ap.add_argument("--naive", type=int, default=200, help="images for the naive loop")
    ap.add_argument("--data", default="bench-data/embed-cpu")
    a = ap.parse_args()
    folder = make_jpegs(Path(a.data), a.n)
    models = [
        tiny_model(batch_size=256),
        EmbeddingModel("ViT-S-32", pretrained=None, device="cpu", batch_size=64),
    ]
    run(models, folder, naive_n=a.naive, title="phase 3 on the CPU")


if __name__ == "__main__":
    main()
