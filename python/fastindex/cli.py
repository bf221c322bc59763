"""`fastindex` on the command line: `index` a folder or COCO file with live progress bars,
`serve` a store over HTTP."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from typing import Any

from .errors import FastIndexError

PHASES = (
    ("scan", "1 scan"),
    ("probe", "2 probe"),
    ("embed", "3 embed"),
)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastindex", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    ix = sub.add_parser("index", help="index a folder of images (and a COCO file)")
    ix.add_argument("path", help="folder of images (with --coco: the images folder)")
    ix.add_argument("--coco", metavar="JSON", help="COCO detection annotations for the images")
    ix.add_argument("--db", default="fastindex.db", help="the store (default: %(default)s)")
    ix.add_argument("--name", help="dataset name (default: the folder's name)")
    ix.add_argument("--no-embed", action="store_true", help="skip phase 3 (CLIP embeddings)")
    ix.add_argument("--model", default=None, help="open_clip model name (default: ViT-B-32)")
    ix.add_argument("--pretrained", default=None, help="open_clip pretrained tag")
    ix.add_argument("--checkpoint", default=None, help="a local checkpoint file for the model")
    ix.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda if available)")
    ix.add_argument("--batch-size", type=int, default=None, help="images per forward pass")
    ix.add_argument("--include-hidden", action="store_true", help="take hidden files too")
    ix.add_argument("--follow-links", action="store_true", help="enter symlinked folders")
    ix.add_argument("--serve", action="store_true", help="serve the web page while indexing")
    ix.add_argument(
        "--allow-root",
        action="append",
        default=[],
        metavar="DIR",
        help="with --serve: a folder the page may index too (repeatable; PATH always is)",
    )
    ix.add_argument("--host", default="127.0.0.1")
    ix.add_argument("--port", type=int, default=8000)
    ix.add_argument("--quiet", action="store_true", help="no progress bars, only the summary")

    sv = sub.add_parser("serve", help="serve a store's datasets over HTTP with the web page")
    sv.add_argument("--db", default="fastindex.db")
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument(
        "--allow-root",
        action="append",
        default=[],
        metavar="DIR",
        help="a folder the page may index (repeatable; default: none)",
    )
    return p


def _embed_arg(args: argparse.Namespace) -> Any:
    if args.no_embed:
        return False
    if not (args.model or args.pretrained or args.checkpoint or args.device or args.batch_size):
        return None  # the default model when torch and open_clip are installed
    from .embed import EmbeddingModel

    kw: dict[str, Any] = {}
    if args.model:
        kw["name"] = args.model
    if args.pretrained:
        kw["pretrained"] = args.pretrained
    if args.checkpoint:
        kw["checkpoint"] = args.checkpoint
    if args.device:
        kw["device"] = args.device
    if args.batch_size:
        kw["batch_size"] = args.batch_size
    return EmbeddingModel(**kw)


def cmd_index(args: argparse.Namespace) -> int:
    import os

    from rich.console import Console

    from .dataset import Dataset

    console = Console(stderr=True)
    name = args.name or os.path.basename(os.path.abspath(args.path)) or "dataset"
    embed = _embed_arg(args)
    server = None
    from .dataset import list_datasets

    existed = any(d["name"] == name for d in list_datasets(db=args.db))
    ds = Dataset.load_or_create(name, db=args.db)
    if args.serve:
        from .server import start_server

        server = start_server(
            args.db,
            host=args.host,
            port=args.port,
            allowed_roots=[args.path, *args.allow_root],
        )
        console.print(f"[bold]fastindex[/] serving [link={server.url}]{server.url}[/link]")
    t0 = time.perf_counter()
    try:
        if args.coco:
            job = ds.add_samples_from_coco(
                annotations_json=args.coco, images_path=args.path, embed=embed
            )
        else:
            job = ds.add_images_from_path(
                args.path,
                embed=embed,
                include_hidden=args.include_hidden,
                follow_links=args.follow_links,
            )
    except FastIndexError:
        if not existed:
            ds.delete()  # a bad argument leaves nothing behind, not even an empty dataset
        if server is not None:
            server.stop()
        raise
    except KeyboardInterrupt:  # the walk (or the COCO ingest) stopped; its rows stay
        if server is not None:
            server.stop()
        console.print("[yellow]interrupted: the store keeps every row; run again to resume[/]")
        return 130
    scan_s = time.perf_counter() - t0
    wants_embed = ds.embedding_model() is not None
    try:
        if args.quiet:
            job.wait()
        else:
            _watch(console, job, scan_s, wants_embed)
    except KeyboardInterrupt:
        ds.cancel()
        console.print("[yellow]interrupted: the store keeps every row; run again to resume[/]")
        return 130
    elapsed = time.perf_counter() - t0
    _summary(console, ds, job, elapsed, scan_s)
    if server is not None:
        console.print(f"still serving {server.url} (Ctrl-C to stop)")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            server.stop()
    return 0 if not job.progress().get("error") else 1


def _watch(console: Any, job: Any, scan_s: float, wants_embed: bool) -> None:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TaskProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    cols = (
        TextColumn("{task.description:<8}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    summary = job.summary
    found = int(summary.get("found", summary.get("images", 0)))
    with Progress(*cols, console=console, transient=False) as bar:
        scan = bar.add_task("1 scan", total=max(found, 1), rate=f"{scan_s * 1000:.0f} ms")
        bar.update(scan, completed=max(found, 1))
        probe = bar.add_task("2 probe", total=None, rate="")
        embed = bar.add_task("3 embed", total=None, rate="", visible=wants_embed)
        start = time.perf_counter()
        while True:
            p = job.progress()
            total = p["total"]
            probed = total - p["pending"]
            embedded = p["ready"]
            t = max(time.perf_counter() - start, 1e-6)
            bar.update(probe, total=total, completed=probed, rate=f"{probed / t:,.0f}/s")
            if wants_embed:
                todo = total - p["failed"] + (p["failed"] if embedded else 0)
                bar.update(
                    embed, total=max(todo, 1), completed=embedded, rate=f"{embedded / t:,.0f}/s"
                )
            if p["status"] == "complete" or job.wait(timeout=0.1):
                p = job.progress()
                bar.update(probe, total=p["total"], completed=p["total"] - p["pending"])
                if wants_embed:
                    bar.update(embed, completed=p["ready"])
                break


def _summary(console: Any, ds: Any, job: Any, elapsed: float, scan_s: float) -> None:
    p = job.progress()
    s = job.summary
    console.print(
        f"[bold]{ds.name}[/]: {s.get('added', 0):,} added, {s.get('existing', 0):,} already there; "
        f"indexed {p['indexed'] + p['embedding'] + p['ready']:,}, ready {p['ready']:,}, "
        f"failed {p['failed']:,} in {elapsed:.2f} s (scan {scan_s * 1000:.0f} ms)"
    )
    for w in s.get("errors", [])[:10]:
        console.print(f"  [yellow]skipped[/] {w}")
    missing = s.get("missing", [])
    if missing:
        console.print(
            f"  [yellow]{len(missing):,} COCO images not found on disk[/], e.g. {missing[0]}"
        )
    if p["failed"]:
        for smp in ds.samples(status="failed", limit=5):
            console.print(f"  [red]failed[/] {smp.path}: {smp.error}")
    if p.get("error"):
        console.print(f"[red]stopped:[/] {p['error']}")


def cmd_serve(args: argparse.Namespace) -> int:
    from .server import run_server

    run_server(args.db, host=args.host, port=args.port, allowed_roots=args.allow_root)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "index":
            return cmd_index(args)
        return cmd_serve(args)
    except FastIndexError as e:
        print(f"fastindex: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
