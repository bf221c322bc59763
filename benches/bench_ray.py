"""Phase 3 on a Ray cluster beside the single-machine engine, and the coordinator's ceiling.

1. The same images embedded by the tiny model (CPU, random weights) on this process (the
   single-machine engine) and on a local 2-actor Ray cluster (`RayEngine`, one CPU each): the
   time to embed them all and to the first committed result, cold (the actors start: they
   import torch and build the model) and warm (actors already up), and the Ray overhead per
   row (warm Ray time minus single-machine time, per row).
2. The coordinator's commit ceiling: a store of `--rows` `indexed` rows, claimed and committed
   in leases of `--lease` rows with random float16 vectors of 512 (ViT-B-32) and 768
   (ViT-L-14) dimensions, no model: the rows/s one coordinator can write. Divided by an
   H200's embedding rate, that is how many GPUs one coordinator feeds.

    OMP_NUM_THREADS=1 python3 benches/bench_ray.py [--images 512] [--rows 200000] [--lease 8192]

`OMP_NUM_THREADS=1` gives this process one torch thread, as Ray gives each 1-CPU actor: on a
loaded VM torch's spinning OpenMP threads otherwise make the single-machine baseline up to 15x
slower, which is not what the comparison is about.

Generated data goes under /work/benchdata/ray (or `--dir`).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sqlite3
import time
from pathlib import Path

import fastindex
import numpy as np
from fastindex import _core, leases
from fastindex.testing import image_bytes, tiny_model, write_image

# Published figures the GPU estimate rests on (no GPU here). Image-tower GMACs per image from
# open_clip's docs/model_profile.csv: ViT-B-32 8.82, ViT-L-14 162.03 (x2 for FLOPs). The
# ViT-B-32 rate per H200 is this project's goal (issue 10: a million images in about a minute);
# it is ~30% of the H200's 989 dense FP16 TFLOPS at 17.6 GFLOP per image. ViT-L-14 is scaled
# by the FLOP ratio.
H200_RATE = {"ViT-B-32": 16_700.0}
H200_RATE["ViT-L-14"] = H200_RATE["ViT-B-32"] * 8.82 / 162.03
H200_RATE["shard mode (proxy)"] = H200_RATE["ViT-B-32"]
DIMS = {"ViT-B-32": 512, "ViT-L-14": 768, "shard mode (proxy)": 8}


def make_images(folder: Path, n: int) -> None:
    if folder.exists() and len(list(folder.rglob("*.jpg"))) == n:
        return
    shutil.rmtree(folder, ignore_errors=True)
    for i in range(n):
        write_image(folder / f"d{i % 8}" / f"{i:06d}.jpg", image_bytes((320, 240), seed=i))


def indexed(db: Path, name: str, folder: Path) -> fastindex.Dataset:
    ds = fastindex.Dataset.create(name, db=db)
    ds.add_images_from_path(folder, embed=False).wait(120)
    return ds


def timed_embed(
    ds: fastindex.Dataset, model: object, engine: fastindex.RayEngine | None
) -> tuple[float, float]:
    """(seconds to embed everything, seconds to the first ready row)."""
    t0 = time.perf_counter()
    first = None
    ds.embed(model, engine=engine)  # type: ignore[arg-type]
    while True:
        p = ds.get_loading_progress()
        if first is None and p["ready"] > 0:
            first = time.perf_counter() - t0
        if p["status"] == "complete":
            break
        time.sleep(0.01)
    total = time.perf_counter() - t0
    assert p["ready"] == p["total"], p
    return total, first if first is not None else total


def engines(args: argparse.Namespace, work: Path) -> list[tuple[str, str, str, str]]:
    import ray

    folder = work / "imgs"
    make_images(folder, args.images)
    db = work / "engines.db"
    for f in work.glob("engines.db*"):
        f.unlink()
    n = args.images
    # Warm: torch imported and the model loaded once in this process (the same model object
    # then), as the warm actors have theirs.
    model = tiny_model(batch_size=32)
    timed_embed(indexed(db, "warm-up", folder), model, None)
    local_s, local_first = timed_embed(indexed(db, "local", folder), model, None)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        eng = fastindex.RayEngine(None, lease_rows=args.ray_lease, cpu_actors=2)
        cold_s, cold_first = timed_embed(indexed(db, "ray-cold", folder), model, eng)
        warm_s, warm_first = timed_embed(indexed(db, "ray-warm", folder), model, eng)
        eng.close()
    finally:
        ray.shutdown()
    per_row_ms = (warm_s - local_s) / n * 1e3
    return [
        ("single machine: embed all", f"{local_s:.2f} s", "", f"{n / local_s:,.0f} img/s"),
        ("single machine: first result", f"{local_first:.2f} s", "", "model loaded already"),
        ("Ray cold: embed all", f"{cold_s:.2f} s", "", "2 actors start (torch import)"),
        ("Ray cold: first result", f"{cold_first:.2f} s", "", ""),
        ("Ray warm: embed all", f"{warm_s:.2f} s", "", f"{n / warm_s:,.0f} img/s"),
        ("Ray warm: first result", f"{warm_first:.2f} s", "", f"lease {args.ray_lease} rows"),
        ("Ray overhead per row (warm)", f"{per_row_ms:+.2f} ms", "", "vs single machine"),
    ]


def ceiling(args: argparse.Namespace, work: Path) -> list[tuple[str, str, str, str]]:
    files = work / "empty"
    if not files.exists() or len(os.listdir(files)) != args.rows:
        shutil.rmtree(files, ignore_errors=True)
        files.mkdir(parents=True)
        for i in range(args.rows):
            (files / f"{i:08d}.jpg").touch()
    rows = []
    rng = np.random.default_rng(0)
    for model, dim in DIMS.items():
        db = work / f"ceiling{dim}.db"
        for f in work.glob(f"ceiling{dim}.db*"):
            f.unlink()
        store = _core.Store(str(db))
        d = store.create_dataset("c")
        store.scan(d, str(files))
        con = sqlite3.connect(db)
        con.executescript(
            "UPDATE samples SET status = 'indexed'; UPDATE counts SET status = 'indexed';"
        )
        con.close()
        me = leases.owner()
        assert store.acquire_lease(d, "embed", me, 600.0)
        model_id = store.register_model("bench", f"d{dim}", dim)
        vec = rng.standard_normal((args.lease, dim)).astype("<f2").tobytes()
        claim_s = commit_s = cpu_s = 0.0
        done, after = 0, 0
        while True:
            t, c = time.perf_counter(), time.process_time()
            batch, got = store.claim_batch(d, args.lease, after, me)
            claim_s += time.perf_counter() - t
            cpu_s += time.process_time() - c
            if not got:
                break
            after = int(got[-1][0])
            ids = [int(r[0]) for r in got]
            t, c = time.perf_counter(), time.process_time()
            done += store.commit_batch(
                d, model_id, batch, ids, vec[: len(ids) * dim * 2], [], owner=me
            )
            commit_s += time.perf_counter() - t
            cpu_s += time.process_time() - c
        assert done == args.rows, done
        rate = done / (claim_s + commit_s)
        # CPU seconds of the calls: what the coordinator costs on an unloaded core (the wall
        # time here depends on the other processes sharing this VM's 2 cores).
        cpu_rate = done / cpu_s
        mb = done * dim * 2 / 1e6 / commit_s
        leases_n = done / args.lease
        per = f"{claim_s / leases_n * 1e3:.1f} / {commit_s / leases_n * 1e3:.1f} ms"
        if dim == 8:
            what = "statuses + a 16-byte pointer per row, as shard mode would commit"
            rows += [
                (f"coordinator {dim}-d (shard mode proxy)", f"{rate:,.0f} rows/s", "", what),
                ("  same, per CPU second", f"{cpu_rate:,.0f} rows/s", "", ""),
                (f"  claim / commit per {args.lease}-row lease", per, "", ""),
            ]
            continue
        gpus = rate / H200_RATE[model]
        cpu_gpus = cpu_rate / H200_RATE[model]
        at = f"at {H200_RATE[model]:,.0f} img/s per H200 (estimate)"
        rows += [
            (f"coordinator {dim}-d: claim+commit", f"{rate:,.0f} rows/s", "", f"{mb:,.0f} MB/s"),
            ("  same, per CPU second", f"{cpu_rate:,.0f} rows/s", "", ""),
            (f"  claim / commit per {args.lease}-row lease", per, "", "wall"),
            (
                f"H200s one coordinator feeds at {model}",
                f"{gpus:,.1f} / {cpu_gpus:,.1f}",
                "",
                f"wall / CPU; {at}",
            ),
        ]
        for f in work.glob(f"ceiling{dim}.db*"):
            f.unlink()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--ray-lease", type=int, default=64, help="lease rows on the CPU cluster")
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--lease", type=int, default=8192)
    ap.add_argument("--dir", type=Path, default=Path("/work/benchdata/ray"))
    ap.add_argument("--skip-engines", action="store_true")
    args = ap.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    print(f"load: {os.getloadavg()[0]:.1f} {os.getloadavg()[1]:.1f} {os.getloadavg()[2]:.1f}")
    rows = [] if args.skip_engines else engines(args, args.dir)
    rows += ceiling(args, args.dir)
    w = [max(len(r[i]) for r in rows) for i in range(4)]
    head = ("measure", "value", "goal", "note")
    w = [max(a, len(b)) for a, b in zip(w, head, strict=True)]
    print("  ".join(h.ljust(x) for h, x in zip(head, w, strict=True)))
    for r in rows:
        print("  ".join(c.ljust(x) for c, x in zip(r, w, strict=True)))
    print(f"load after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
