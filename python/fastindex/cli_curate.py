"""Curation from a shell: `fastindex list`, `info`, `samples`, `search`, `export`, `rm`.

Every command takes `--db` (the store) and `--json`: then stdout holds exactly one JSON
document, and an error goes to stderr as `{"error": kind, "message": text}`. Without `--json`
the output is for people, and an error is one line on stderr.

Exit codes: 0 ok; 1 not found (no such store, dataset or sample) or the command failed (a
store error, no embeddings to search); 2 a bad argument (argparse's own errors too).

None of these commands starts background work: the dataset is opened with `resume=False`.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from .errors import FastIndexError, InvalidArgumentError

COMMANDS = ("list", "info", "samples", "search", "export", "rm")
OK, FAILED, BAD_ARGUMENT = 0, 1, 2

EXIT_CODES = "exit codes: 0 ok, 1 not found or failed, 2 bad argument"


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--db", default="fastindex.db", help="the store (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="one JSON document on stdout")


def _filters(p: argparse.ArgumentParser, format_flag: str = "--format") -> None:
    g = p.add_argument_group("filters (all must match)")
    g.add_argument(
        "--status", choices=("pending", "indexed", "embedding", "ready", "failed", "missing")
    )
    g.add_argument(format_flag, dest="image_format", metavar="FMT", help="JPEG, PNG, ... as probed")
    g.add_argument("--min-width", type=int, metavar="PX")
    g.add_argument("--max-width", type=int, metavar="PX")
    g.add_argument("--min-height", type=int, metavar="PX")
    g.add_argument("--max-height", type=int, metavar="PX")
    g.add_argument("--path-glob", metavar="GLOB", help="SQLite GLOB on the relative path")
    g.add_argument("--category", metavar="NAME", help="samples with a box of this category")
    g.add_argument(
        "--has-annotations", choices=("yes", "no"), help="samples with (or without) boxes"
    )


def add_parsers(sub: Any) -> None:
    """Register the curation subcommands on `fastindex`'s subparsers."""
    kw: dict[str, Any] = {"epilog": EXIT_CODES}
    p = sub.add_parser("list", help="list the datasets of a store", **kw)
    _common(p)

    p = sub.add_parser("info", help="a dataset's counts, formats, categories and folders", **kw)
    p.add_argument("name")
    _common(p)

    p = sub.add_parser("samples", help="list a dataset's samples, filtered", **kw)
    p.add_argument("name")
    _common(p)
    _filters(p)
    p.add_argument("--limit", type=int, default=50, help="at most this many (default: 50)")
    p.add_argument("--after-id", type=int, default=0, help="only ids above this (paging)")

    p = sub.add_parser("search", help="samples whose embeddings best match a text", **kw)
    p.add_argument("name")
    p.add_argument("text")
    p.add_argument("-k", type=int, default=20, help="how many (default: 20)")
    _common(p)

    p = sub.add_parser(
        "export", help="write a dataset as COCO JSON, CSV or Parquet (or its embeddings)", **kw
    )
    p.add_argument("name")
    p.add_argument("out", help="the file to write (replaced once complete)")
    p.add_argument(
        "--format",
        required=True,
        choices=("coco", "csv", "parquet", "npy"),
        help="coco, csv, parquet; with --embeddings: parquet or npy",
    )
    p.add_argument(
        "--embeddings",
        action="store_true",
        help="export the embeddings (with their sample ids) instead of the samples",
    )
    _common(p)
    _filters(p, "--image-format")  # --format is the file's

    p = sub.add_parser("rm", help="delete a dataset from the store (image files are kept)", **kw)
    p.add_argument("name")
    _common(p)


def run(args: argparse.Namespace) -> int:
    """Run one curation command; returns the exit code."""
    try:
        out = _HANDLERS[args.command](args)
    except (InvalidArgumentError, UnicodeEncodeError) as e:
        return _fail(args, e, BAD_ARGUMENT)
    except (FastIndexError, OSError) as e:  # not found (DatasetNotFoundError), store, disk
        return _fail(args, e, FAILED)
    if args.json:
        json.dump(out, sys.stdout, ensure_ascii=True, default=str)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(_human(args.command, out))
    return OK


def _fail(args: argparse.Namespace, e: BaseException, code: int) -> int:
    from .cli import safe_text

    msg = safe_text(e)
    if getattr(args, "json", False):
        sys.stderr.write(json.dumps({"error": type(e).__name__, "message": msg}) + "\n")
    else:
        sys.stderr.write(f"fastindex: {msg}\n")
    return code


def _open(args: argparse.Namespace) -> Any:
    from .dataset import Dataset

    return Dataset.load(args.name, db=args.db, resume=False)


def _filter_args(args: argparse.Namespace) -> dict[str, Any]:
    f = {
        "status": args.status,
        "format": args.image_format,
        "min_width": args.min_width,
        "max_width": args.max_width,
        "min_height": args.min_height,
        "max_height": args.max_height,
        "path_glob": args.path_glob,
        "category": args.category,
        "has_annotations": None if args.has_annotations is None else args.has_annotations == "yes",
    }
    return {k: v for k, v in f.items() if v is not None}


def _counts(p: dict[str, Any]) -> dict[str, Any]:
    keys = ("total", "pending", "indexed", "embedding", "ready", "failed", "missing", "status")
    return {k: p[k] for k in keys}


def cmd_list(args: argparse.Namespace) -> Any:
    from . import _core
    from .dataset import list_datasets

    rows = list_datasets(db=args.db)
    store = _core.Store(args.db) if rows else None
    out = []
    for d in rows:
        assert store is not None
        p = store.progress(d["id"])
        out.append({**d, "total": p["total"], "failed": p["failed"]})
    return {"db": args.db, "datasets": out}


def cmd_info(args: argparse.Namespace) -> Any:
    ds = _open(args)
    f = ds.facets()
    row = ds._store.dataset(ds.id)
    return {
        "id": ds.id,
        "name": ds.name,
        "db": ds.db,
        "created_at": row[2] if row else None,
        "embed_model": json.loads(row[3]) if row and row[3] else None,
        "progress": _counts(ds.get_loading_progress()),
        "formats": f["format"],
        "categories": f["category"],
        "roots": ds._store.roots(ds.id),
    }


def cmd_samples(args: argparse.Namespace) -> Any:
    if args.limit < 0 or args.after_id < 0:
        raise InvalidArgumentError("--limit and --after-id must not be negative")
    ds = _open(args)
    rows = ds.samples(limit=args.limit, after_id=args.after_id, **_filter_args(args))
    return {
        "dataset": ds.name,
        "filters": _filter_args(args),
        "items": [s.to_dict() for s in rows],
        "next_after_id": rows[-1].id if rows and len(rows) == args.limit else None,
    }


def cmd_search(args: argparse.Namespace) -> Any:
    if args.k < 1:
        raise InvalidArgumentError("-k must be at least 1")
    ds = _open(args)
    if not ds.has_embedding_model():
        raise _Failed(f"dataset {ds.name!r} has no embeddings: index it with an embedding model")
    hits = ds.search(args.text, k=args.k)
    return {
        "dataset": ds.name,
        "text": args.text,
        "items": [{**s.to_dict(), "score": float(score)} for s, score in hits],
    }


class _Failed(FastIndexError):
    """The command could not do what was asked (exit code 1)."""


def cmd_export(args: argparse.Namespace) -> Any:
    ds = _open(args)
    if args.embeddings:
        if args.format not in ("parquet", "npy"):
            raise InvalidArgumentError("--embeddings writes parquet or npy")
        info = ds.export_embeddings(args.out, format=args.format)
    else:
        if args.format == "npy":
            raise InvalidArgumentError(
                "npy is for --embeddings; samples export as coco, csv or parquet"
            )
        info = ds.export(args.out, format=args.format, **_filter_args(args))
    return {"dataset": ds.name, "out": args.out, **info}


def cmd_rm(args: argparse.Namespace) -> Any:
    ds = _open(args)
    ds.delete()
    return {"deleted": ds.name, "id": ds.id}


_HANDLERS = {
    "list": cmd_list,
    "info": cmd_info,
    "samples": cmd_samples,
    "search": cmd_search,
    "export": cmd_export,
    "rm": cmd_rm,
}


def _human(command: str, out: dict[str, Any]) -> str:
    from .cli import safe_text

    lines: list[str] = []
    if command == "list":
        for d in out["datasets"]:
            lines.append(
                f"{d['id']:>4}  {safe_text(d['name'])}  {d['total']} samples, {d['failed']} failed"
            )
        if not out["datasets"]:
            lines.append(f"no datasets in {out['db']}")
    elif command == "info":
        p = out["progress"]
        lines.append(f"{safe_text(out['name'])} (id {out['id']}) in {safe_text(out['db'])}")
        lines.append("  " + ", ".join(f"{k} {p[k]}" for k in p))
        for key in ("formats", "categories"):
            if out[key]:
                lines.append(f"  {key}: " + ", ".join(f"{k} {v}" for k, v in out[key].items()))
        lines.extend(f"  folder: {safe_text(r)}" for r in out["roots"])
    elif command in ("samples", "search"):
        for s in out["items"]:
            size = f"{s['width']}x{s['height']}" if s["width"] is not None else "-"
            extra = f"  {s['score']:.3f}" if "score" in s else ""
            err = f"  {safe_text(s['error'])}" if s["error"] else ""
            head = f"{s['id']:>8}  {s['status']:<9} {s['format'] or '-':<5} {size:<11}"
            lines.append(f"{head} {safe_text(s['path'])}{extra}{err}")
        if out.get("next_after_id"):
            lines.append(f"(more: --after-id {out['next_after_id']})")
    elif command == "export":
        lines.append(f"wrote {safe_text(out['out'])} ({out['format']})")
    elif command == "rm":
        lines.append(f"deleted {safe_text(out['deleted'])}")
    return "".join(line + "\n" for line in lines)
