"""`fastindex` on the command line: `index` a folder or COCO file with live progress bars,
`embed` what a store still owes phase 3 (here or on a Ray cluster), `serve` a store over HTTP."""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Sequence
from typing import Any

from . import cli_curate
from .errors import FastIndexError
from .objects import is_object_uri

PHASES = (
    ("scan", "1 scan"),
    ("probe", "2 probe"),
    ("embed", "3 embed"),
)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastindex", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    ix = sub.add_parser("index", help="index a folder of images (and a COCO file)")
    ix.add_argument(
        "path",
        help="folder of images, or a bucket prefix (s3://bucket/photos/); with --coco: the "
        "images folder",
    )
    ix.add_argument(
        "--coco", metavar="JSON", help="COCO detection annotations for the images (or s3://...)"
    )
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
    ix.add_argument(
        "--retry-failed",
        action="store_true",
        help="also put the dataset's failed rows back to pending (a folder indexed again "
        "re-reads only the files that changed)",
    )
    ix.add_argument("--serve", action="store_true", help="serve the web page while indexing")
    ix.add_argument(
        "--watch",
        action="store_true",
        help="then keep following the folder (new, changed, deleted files) until Ctrl-C",
    )
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
    _engine_args(ix)

    em = sub.add_parser(
        "embed", help="phase 3 only: embed what a store's datasets still owe (resume a run)"
    )
    em.add_argument("db", help="the store")
    em.add_argument("--name", help="only this dataset (default: every dataset of the store)")
    for flag, what in (
        ("--model", "open_clip model name (default: the dataset's, else ViT-B-32)"),
        ("--pretrained", "open_clip pretrained tag"),
        ("--checkpoint", "a local checkpoint file for the model"),
        ("--device", "cuda, cpu, ... (default: cuda if available)"),
    ):
        em.add_argument(flag, default=None, help=what)
    em.add_argument("--batch-size", type=int, default=None, help="images per forward pass")
    em.add_argument("--quiet", action="store_true", help="no progress line, only the summary")
    _engine_args(em)

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
    cli_curate.add_parsers(sub)
    return p


def _engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--engine",
        choices=("local", "ray"),
        default="local",
        help="where phase 3 runs: this process, or a Ray cluster (pip install 'fastindex[ray]')",
    )
    p.add_argument(
        "--address",
        default="auto",
        help="with --engine ray: the cluster (default: %(default)s, the one `ray start` runs)",
    )
    p.add_argument(
        "--lease-rows",
        type=int,
        default=8192,
        help="with --engine ray: rows a worker takes at once (default: %(default)s)",
    )


def _use_engine(args: argparse.Namespace) -> Any:
    """With `--engine ray`, make phase 3 of every dataset this process opens run on the
    cluster (before any is opened: a resumed phase 3 starts there too)."""
    if args.engine != "ray":
        return None
    from .jobs import use_engine
    from .ray_engine import RayEngine

    engine = RayEngine(address=args.address, lease_rows=args.lease_rows)
    use_engine(engine)
    return engine


def _embed_arg(args: argparse.Namespace) -> Any:
    if getattr(args, "no_embed", False):
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


def safe_text(s: object) -> str:
    """`s` as printable text: file names that are not valid UTF-8 reach Python as lone
    surrogates (os.fsdecode), which no terminal encoding takes; they print as `\\xNN`."""
    text = str(s)
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _m(s: object) -> str:
    """User text (a path, a reason) for a rich markup string: safe and escaped."""
    from rich.markup import escape

    return escape(safe_text(s))


def _not_utf8(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _unfinished(p: dict[str, Any], embeds: bool) -> int:
    """Rows still owed a phase: pending, claimed for phase 3, or waiting for it."""
    return int(p["pending"] + p["embedding"] + (p["indexed"] if embeds else 0))


def cmd_index(args: argparse.Namespace) -> int:
    import os

    # The server's imports (fastapi: most of a second) run beside everything below.
    starting = _ServerStart(args) if args.serve else None
    from rich.console import Console

    from .dataset import Dataset
    from .errors import DatasetExistsError, DatasetNotFoundError, InvalidArgumentError

    console = Console(stderr=True, highlight=False, soft_wrap=True)
    if args.name is not None and _not_utf8(args.name):
        raise InvalidArgumentError(f"--name {safe_text(args.name)} is not valid UTF-8")
    if args.watch and args.coco:
        raise InvalidArgumentError("--watch follows a folder of images: not with --coco")
    if args.watch and is_object_uri(args.path):
        raise InvalidArgumentError(
            "--watch follows a local folder (a bucket sends no change events): "
            "index the prefix again to sync it"
        )
    if is_object_uri(args.path):  # s3://bucket/photos/ -> "photos", s3://bucket -> "bucket"
        last = args.path.partition("://")[2].rstrip("/").rsplit("/", 1)[-1]
        name = args.name or last or "dataset"
    else:
        name = args.name or os.path.basename(os.path.abspath(args.path)) or "dataset"
    # A folder whose name is not valid UTF-8 names its dataset as well as it can.
    name = safe_text(name)
    embed = _embed_arg(args)
    _use_engine(args)
    server = None
    watcher = None
    try:
        ds = Dataset.load(name, db=args.db, resume=False)
        existed = True
    except DatasetNotFoundError:
        try:
            ds, existed = Dataset.create(name, db=args.db), False
        except DatasetExistsError:  # another process created it just now
            ds, existed = Dataset.load(name, db=args.db, resume=False), True
    # What an earlier run left unfinished (a crash, Ctrl-C): this run finishes it too.
    resumed = _unfinished(ds.get_loading_progress(), ds.has_embedding_model()) if existed else 0
    # The server starts listening beside phase 1, which runs in Rust with the GIL released,
    # so the first samples are served sooner. Phase 3 is started once it listens: building
    # the model imports torch (seconds of work holding the GIL), which would slow the
    # server's start down.
    if starting is not None:
        starting.go(console)
    else:
        ds.resume()
    t0 = time.perf_counter()
    try:
        now_embed = False if starting is not None else embed
        if args.coco:
            job = ds.add_samples_from_coco(
                annotations_json=args.coco, images_path=args.path, embed=now_embed
            )
        else:
            job = ds.add_images_from_path(
                args.path,
                embed=now_embed,
                include_hidden=args.include_hidden,
                follow_links=args.follow_links,
            )
        scan_s = time.perf_counter() - t0
        if args.retry_failed:
            ds.retry_failed()
        if starting is not None:
            server = starting.result()
            ds.resume()
            _start_embedding(ds, embed)
        if args.watch:
            # Placed now, so what changes while phases 2 and 3 run is followed too.
            watcher = ds.watch(
                args.path,
                embed=False,
                include_hidden=args.include_hidden,
                follow_links=args.follow_links,
            )
    except (FastIndexError, UnicodeEncodeError):
        if starting is not None:
            with contextlib.suppress(FastIndexError):
                server = starting.result()
        if server is not None:
            server.stop()
        if not existed:
            ds.delete()  # a bad argument leaves nothing behind, not even an empty dataset
        raise
    p = _settle(console, ds, job, scan_s, quiet=args.quiet)
    elapsed = time.perf_counter() - t0
    _summary(console, ds, job, p, elapsed, scan_s, resumed)
    ok = p["status"] == "complete" and not p.get("error")
    if watcher is not None:
        _follow(console, ds, watcher, server, quiet=args.quiet)
        return 0 if not p.get("error") else 1
    if server is not None:
        console.print(f"still serving {_m(server.url)} (Ctrl-C to stop)")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            server.stop()
    return 0 if ok else 1


def _follow(console: Any, ds: Any, watcher: Any, server: Any, *, quiet: bool) -> None:
    """`index --watch`: follow the folder until Ctrl-C, with the bars following the dataset
    (their totals grow as files arrive). Ctrl-C here is the normal way to stop: exit code 0,
    the rows still owed a phase are finished by the next run."""
    where = f" (page {_m(server.url)})" if server is not None else ""
    console.print(f"watching {_m(', '.join(watcher.roots))}{where}; Ctrl-C to stop")
    pipeline = ds._pipeline

    def loop(tick: Any) -> dict[str, Any]:
        p: dict[str, Any] = ds.get_loading_progress()
        try:
            while True:
                tick(p)
                pipeline.wait_change(0.25)
                p = ds.get_loading_progress()
        except KeyboardInterrupt:
            return p

    try:
        if quiet:
            loop(lambda p: None)
        else:
            _watch(console, ds, None, 0.0, loop)
    finally:
        watcher.stop()
        if server is not None:
            server.stop()
    s = watcher.stats()
    console.print(
        f"stopped watching: {s['batches']:,} batches, {s['full_syncs']:,} full syncs, "
        f"{s['changed']:,} rows changed"
    )


def _start_embedding(ds: Any, embed: Any) -> None:
    """What `add_*(embed=embed)` would have started for phase 3."""
    from .dataset import embed_installed

    if embed is None:
        if embed_installed():
            ds.embed(True)
    elif embed is not False:
        ds.embed(embed)


class _ServerStart:
    """`start_server` in a thread of its own: it imports the server at once, and starts it on
    `go()` (once the store and the dataset exist); `result()` waits for it (or raises its
    error)."""

    def __init__(self, args: argparse.Namespace) -> None:
        import threading

        from .extras import require

        require("server")  # before anything is written: one line naming the missing extra
        self._args = args
        self._console: Any = None
        self._go = threading.Event()
        self._server: Any = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="fastindex-serve", daemon=True)
        self._thread.start()

    def go(self, console: Any) -> None:
        self._console = console
        self._go.set()

    def _run(self) -> None:
        try:
            from .server import start_server

            self._go.wait()
            a = self._args
            self._server = server = start_server(
                a.db, host=a.host, port=a.port, allowed_roots=[a.path, *a.allow_root]
            )
            # Said as soon as it listens: the page shows phase 1 while the walk runs.
            url = server.url
            # No [link=...] markup: an IPv6 URL's brackets would break it.
            self._console.print(f"[bold]fastindex[/] serving {_m(url)}")
        except BaseException as e:  # handed to the caller of result()
            self._error = e

    def result(self) -> Any:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._server


def _settle(console: Any, ds: Any, job: Any, scan_s: float, *, quiet: bool) -> dict[str, Any]:
    """Wait until the whole dataset is complete (rows an earlier run left included), or a
    phase stopped on an error; then return its progress. Sleeps between readings (woken by
    each committed batch), so a stopped phase ends the wait within a fraction of a second."""
    pipeline = ds._pipeline

    def stopped(p: dict[str, Any]) -> bool:
        # An error of a phase that no longer runs here: nothing more will happen in this
        # run. (An error left by an earlier run is cleared when its phase starts again.)
        return any(not pipeline.is_running(phase) for phase in p["errors"])

    def loop(tick: Any) -> dict[str, Any]:
        kicked = time.monotonic()
        while True:
            p: dict[str, Any] = ds.get_loading_progress()
            tick(p)
            if p["status"] == "complete" or stopped(p):
                break
            if not pipeline.running and time.monotonic() - kicked > 1.0:
                # Rows wait on another process (an add in flight there, or a lease it took
                # over): look again now and then, and take the work over if it stops.
                pipeline.kick()
                kicked = time.monotonic()
            pipeline.wait_change(0.1)
        if p["status"] == "complete":
            # The runs end once nothing is left; their last step clears a stale error.
            pipeline.wait_idle(2.0)
        else:
            pipeline.cancel(0.5)
        p = ds.get_loading_progress()
        tick(p)
        return p

    if quiet:
        return loop(lambda p: None)
    return _watch(console, ds, job, scan_s, loop)


def _watch(console: Any, ds: Any, job: Any, scan_s: float, loop: Any) -> dict[str, Any]:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TaskProgressColumn,
        TextColumn,
        TimeElapsedColumn,
    )

    cols = (
        TextColumn("{task.description:<8}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TextColumn("{task.fields[eta]}"),
    )
    wants_embed = ds.has_embedding_model()
    with Progress(*cols, console=console, transient=False) as bar:
        if job is not None:  # None: watching, where the bars follow the dataset only
            summary = job.summary
            found = max(int(summary.get("found", summary.get("images", 0))), 1)
            scan = bar.add_task("1 scan", total=found, rate=f"{scan_s * 1000:.0f} ms", eta="")
            bar.update(scan, completed=found)
        probe = bar.add_task("2 probe", total=None, rate="", eta="")
        embed = bar.add_task("3 embed", total=None, rate="", eta="", visible=wants_embed)

        def speed(phase: dict[str, Any] | None) -> dict[str, Any]:
            """The store's rate and time left for the phase (a finished phase keeps the
            last rate it showed); a rate is never rounded down to 0 while rows move."""
            if not phase or phase["rate"] is None:
                left = phase is not None and phase["total"] != phase["done"]
                return {"eta": "left -" if left else ""}
            r, eta = phase["rate"], phase["eta_s"]
            s = round(eta) if eta is not None else None
            return {
                "rate": f"{r:,.0f}/s" if r >= 10 else f"{r:.2g}/s",
                "eta": "left -"
                if s is None
                else f"left {s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}",
            }

        def tick(p: dict[str, Any]) -> None:
            total = p["total"]
            probed = total - p["pending"]
            embedded = p["ready"]
            phases = p.get("phases", {})
            bar.update(probe, total=total, completed=probed, **speed(phases.get("probe")))
            if wants_embed:
                todo = total - p["failed"] - p["missing"] + (p["failed"] if embedded else 0)
                bar.update(
                    embed, total=max(todo, 1), completed=embedded, **speed(phases.get("embed"))
                )

        result: dict[str, Any] = loop(tick)
        return result


def _summary(
    console: Any,
    ds: Any,
    job: Any,
    p: dict[str, Any],
    elapsed: float,
    scan_s: float,
    resumed: int,
) -> None:
    """What this run did, with the dataset's counts (rows an earlier run left included)."""
    s = job.summary
    done = p["status"] == "complete"
    earlier = ""
    if resumed:
        verb = "finished" if done else "resumed"
        earlier = f"; {verb} {resumed:,} rows left by an earlier run"
    console.print(
        f"[bold]{_m(ds.name)}[/]: {s.get('added', 0):,} added, "
        f"{s.get('existing', 0):,} already there{_synced(s)}{earlier}; "
        f"indexed {p['indexed'] + p['embedding'] + p['ready']:,}, ready {p['ready']:,}, "
        f"failed {p['failed']:,} in {elapsed:.2f} s (scan {scan_s * 1000:.0f} ms)"
    )
    left = 0 if done else _unfinished(p, ds.has_embedding_model())
    if left:
        console.print(f"  [yellow]{left:,} rows not finished[/]: run again to resume")
    for w in s.get("errors", [])[:10]:
        console.print(f"  [yellow]skipped[/] {_m(w)}")
    missing = s.get("missing", [])
    if missing:
        console.print(
            f"  [yellow]{len(missing):,} COCO images not found on disk[/], e.g. {_m(missing[0])}"
        )
    if p["failed"]:
        for smp in ds.samples(status="failed", limit=5):
            console.print(f"  [red]failed[/] {_m(smp.path)}: {_m(smp.error)}")
    if p.get("error"):
        console.print(f"[red]stopped:[/] {_m(p['error'])}")


def cmd_embed(args: argparse.Namespace) -> int:
    """Phase 3 (and any phase 2 left) of a store's datasets, on this process or a cluster;
    exits 0 once every row is `ready` or `failed`."""
    import os

    from rich.console import Console

    from .dataset import Dataset, list_datasets
    from .errors import DatasetNotFoundError

    console = Console(stderr=True, highlight=False, soft_wrap=True)
    if not os.path.isfile(args.db):
        raise DatasetNotFoundError(f"{args.db} is not a store")
    names = [args.name] if args.name else [d["name"] for d in list_datasets(db=args.db)]
    model = _embed_arg(args)
    engine = _use_engine(args)
    ok = True
    for name in names:
        ds = Dataset.load(name, db=args.db, resume=False)
        if model is not None or not ds.has_embedding_model():
            ds.resume()  # phase 2 of rows left pending
            ds.embed(True if model is None else model)
        else:
            ds.resume()
        t0 = time.perf_counter()
        last = 0.0
        while not ds.wait(0.5):
            p = ds.get_loading_progress()
            if p["status"] == "complete" or (p.get("error") and not ds._pipeline.running):
                break
            if not args.quiet and time.perf_counter() - last > 2.0:
                last = time.perf_counter()
                console.print(
                    f"{_m(name)}: ready {p['ready']:,} of {p['total']:,}, "
                    f"embedding {p['embedding']:,}, failed {p['failed']:,}"
                )
        p = ds.get_loading_progress()
        done = p["status"] == "complete" and not p.get("error")
        ok = ok and done
        line = (
            f"{_m(name)}: ready {p['ready']:,}, failed {p['failed']:,} "
            f"in {time.perf_counter() - t0:.1f}s"
        )
        if engine is not None:
            c = engine.progress()
            line += f" on {len(c['workers'])} Ray workers, {c['released']:,} rows released"
        console.print(line)
        if p.get("error"):
            console.print(f"[red]stopped:[/] {_m(p['error'])}")
    return 0 if ok else 1


def _synced(s: dict[str, Any]) -> str:
    """What a folder indexed again found changed (only what there is)."""
    parts = [
        f"{s[k]:,} {what}"
        for k, what in (("changed", "changed"), ("removed", "gone (missing)"))
        if s.get(k)
    ]
    return f" ({', '.join(parts)})" if parts else ""


def cmd_serve(args: argparse.Namespace) -> int:
    from .server import run_server

    run_server(args.db, host=args.host, port=args.port, allowed_roots=args.allow_root)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command in cli_curate.COMMANDS:
        return cli_curate.run(args)
    try:
        if args.command in ("index", "embed"):
            code = cmd_index(args) if args.command == "index" else cmd_embed(args)
            _leave(code)
            return code
        return cmd_serve(args)
    except KeyboardInterrupt:
        _interrupted()
    except FastIndexError as e:
        print(f"fastindex: {safe_text(e)}", file=sys.stderr)
        return 2
    except UnicodeEncodeError as e:
        # A path that is not valid UTF-8 where the store cannot take one.
        what = safe_text(e.object[e.start : e.end] if isinstance(e.object, str) else e.object)
        print(f"fastindex: a path or name is not valid UTF-8 (near {what})", file=sys.stderr)
        return 2
    return 0  # pragma: no cover - _interrupted does not return


def _leave(code: int) -> None:
    """End the run now, even with a worker stuck in a long step (a stopped run whose embed
    thread still imports torch or runs a forward pass): see `_interrupted` for why
    `os._exit` is safe. Returns when every worker has already stopped."""
    import os

    from .jobs import stop_all

    if stop_all(0.5):
        return
    for f in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            f.flush()
    os._exit(code)


def _interrupted() -> None:
    """Ctrl-C: stop the background work, and leave within half a second.

    The workers get a short time to stop; one stuck in a long step (a forward pass on the
    CPU, a store call) would otherwise hold the exit. The process then ends with `os._exit`,
    after flushing: Python's finalisation must not run while a worker is still inside the
    store (it would tear down objects that thread uses), and nothing needs it. The store is
    safe: SQLite commits atomically (a transaction in flight is rolled back when the store is
    next opened), a lease of this dead process is taken over at once on this host, and rows
    it had claimed for phase 3 go back to `indexed` when the next run takes the embed lease.
    """
    import os

    from .jobs import stop_all

    stop_all(0.3)
    print("fastindex: interrupted: the store keeps every row; run again to resume", file=sys.stderr)
    for f in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            f.flush()
    os._exit(130)


if __name__ == "__main__":
    sys.exit(main())
