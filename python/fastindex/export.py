"""Export a dataset: COCO JSON, CSV or Parquet of its samples (its embeddings:
`fastindex.vectors`).

Every writer is a generator of byte chunks that reads the store one page of samples at a time
(keyset paging by id), so memory stays bounded at any dataset size, and the same code feeds a
file (`export_dataset`) and an HTTP download (`iter_export`).

COCO: `images` carry the probed size (the COCO file's declared size while a sample is not yet
probed), `file_name` relative to `info.images_root` (the common folder of the dataset's roots:
pass it as `images_path` to ingest the file again); `annotations` are every box as ingested,
its segmentation written as the exact JSON text the store kept. Category ids are the source
file's when those are unique, else the store's.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
from collections.abc import Iterator
from typing import IO, Any

from . import _core
from .errors import InvalidArgumentError

FORMATS = ("coco", "csv", "parquet")
#: Samples read per store call.
PAGE = 2000
#: The columns of CSV and Parquet exports, in order.
COLUMNS = (
    "id",
    "root",
    "path",
    "status",
    "error",
    "format",
    "width",
    "height",
    "orientation",
    "size_bytes",
    "mtime_ns",
    "coco_width",
    "coco_height",
    "size_mismatch",
    "job_id",
)

__all__ = [
    "COLUMNS",
    "FORMATS",
    "content_type",
    "export_dataset",
    "iter_export",
    "iter_samples",
]


def content_type(fmt: str) -> str:
    return {
        "coco": "application/json",
        "csv": "text/csv; charset=utf-8",
        "parquet": "application/vnd.apache.parquet",
    }[fmt]


def _check_format(fmt: object) -> str:
    if fmt not in FORMATS:
        raise InvalidArgumentError(
            f"unknown export format {fmt!r}: expected one of coco, csv, parquet"
        )
    return str(fmt)


def parquet_missing() -> str | None:
    """The one-line reason Parquet export is unavailable, or None."""
    try:
        import pyarrow
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        return "Parquet export needs pyarrow: pip install 'fastindex[export]'"
    return None


def iter_samples(
    store: _core.Store, dataset_id: int, page: int = PAGE, **filters: Any
) -> Iterator[list[dict[str, Any]]]:
    """Pages of sample rows in id order matching `filters` (as `Dataset.samples`)."""
    after = 0
    while True:
        rows = store.samples(dataset_id, limit=page, after_id=after, **filters)
        if not rows:
            return
        yield rows
        after = rows[-1]["id"]
        if len(rows) < page:
            return


def _text(s: str) -> str:
    """A name for a UTF-8 text format: one not valid UTF-8 (surrogates) is written with
    `\\xNN` escapes (its exact bytes are lost, and said so in the docs)."""
    return s.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


# -- COCO -------------------------------------------------------------------------------------
def _images_root(store: _core.Store, dataset_id: int) -> str:
    roots = store.roots(dataset_id)
    if not roots:
        return ""
    return roots[0] if len(roots) == 1 else os.path.commonpath(roots)


def _category_ids(
    store: _core.Store, dataset_id: int
) -> tuple[dict[str, int], list[dict[str, Any]]]:
    cats = store.categories(dataset_id)
    coco_ids = [c[3] for c in cats]
    use_coco = all(i is not None for i in coco_ids) and len(set(coco_ids)) == len(coco_ids)
    ids: dict[str, int] = {}
    out = []
    for cid, name, supercategory, coco_id in cats:
        i = int(coco_id) if use_coco and coco_id is not None else cid
        ids[name] = i
        entry: dict[str, Any] = {"id": i, "name": name}
        if supercategory is not None:
            entry["supercategory"] = supercategory
        out.append(entry)
    return ids, out


def _dumps(v: Any) -> str:
    return json.dumps(v, ensure_ascii=False, allow_nan=False)


def iter_coco(store: _core.Store, dataset_id: int, **filters: Any) -> Iterator[bytes]:
    root = _images_root(store, dataset_id)
    cat_ids, cats = _category_ids(store, dataset_id)
    info = {"description": "exported by fastindex", "images_root": _text(root)}
    yield f'{{"info": {_dumps(info)},\n"images": ['.encode()
    first = True
    for rows in iter_samples(store, dataset_id, **filters):
        parts = []
        for r in rows:
            rel = os.path.relpath(os.path.join(r["root"], r["path"]), root) if root else r["path"]
            image: dict[str, Any] = {"id": r["id"], "file_name": _text(rel)}
            w = r["width"] if r["width"] is not None else r["coco_width"]
            h = r["height"] if r["height"] is not None else r["coco_height"]
            if w is not None and h is not None:
                image["width"], image["height"] = w, h
            parts.append(("\n" if first else ",\n") + _dumps(image))
            first = False
        yield "".join(parts).encode()
    yield b'],\n"annotations": ['
    first = True
    for rows in iter_samples(store, dataset_id, **filters):
        ids = {r["id"] for r in rows}
        after = rows[0]["id"] - 1
        parts = []
        for a in store.annotations_between(dataset_id, after, rows[-1]["id"]):
            ann_id, sample_id, category, _sup, bbox, area, iscrowd, seg = a
            if sample_id not in ids:
                continue
            text = (
                f'{{"id": {ann_id}, "image_id": {sample_id}, "category_id": {cat_ids[category]}, '
                f'"bbox": {_dumps(list(bbox))}, "iscrowd": {int(iscrowd)}'
            )
            if area is not None:
                text += f', "area": {_dumps(area)}'
            if seg is not None:
                # The store keeps the source's JSON text: written as is, byte for byte.
                text += f', "segmentation": {seg}'
            parts.append(("\n" if first else ",\n") + text + "}")
            first = False
        yield "".join(parts).encode()
    yield f'],\n"categories": {_dumps(cats)}}}\n'.encode()


# -- CSV ---------------------------------------------------------------------------------------
def _row_values(r: dict[str, Any]) -> list[Any]:
    return [_text(r[c]) if c in ("root", "path") else r[c] for c in COLUMNS]


def iter_csv(store: _core.Store, dataset_id: int, **filters: Any) -> Iterator[bytes]:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(COLUMNS)
    for rows in iter_samples(store, dataset_id, **filters):
        for r in rows:
            vals = _row_values(r)
            w.writerow(["" if v is None else int(v) if isinstance(v, bool) else v for v in vals])
        yield buf.getvalue().encode()
        buf.seek(0)
        buf.truncate()
    yield buf.getvalue().encode()


# -- Parquet -----------------------------------------------------------------------------------
class _Chunks:
    """A write-only file for pyarrow that hands back what was written since the last call."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._pos = 0
        self.closed = False

    def write(self, data: Any) -> int:
        b = bytes(data)
        self._parts.append(b)
        self._pos += len(b)
        return len(b)

    def tell(self) -> int:
        return self._pos

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True

    def writable(self) -> bool:
        return True

    def take(self) -> bytes:
        out = b"".join(self._parts)
        self._parts.clear()
        return out


def _parquet_schema() -> Any:
    import pyarrow as pa

    i64, s = pa.int64(), pa.string()
    types = {"size_mismatch": pa.bool_()}
    for c in ("root", "path", "status", "error", "format"):
        types[c] = s
    return pa.schema([(c, types.get(c, i64)) for c in COLUMNS])


def iter_parquet(store: _core.Store, dataset_id: int, **filters: Any) -> Iterator[bytes]:
    reason = parquet_missing()
    if reason is not None:
        raise InvalidArgumentError(reason)
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = _parquet_schema()
    sink = _Chunks()
    with pq.ParquetWriter(pa.PythonFile(sink, mode="w"), schema) as writer:
        for rows in iter_samples(store, dataset_id, **filters):
            values = [_row_values(r) for r in rows]
            cols = {c: [v[i] for v in values] for i, c in enumerate(COLUMNS)}
            writer.write_table(pa.table(cols, schema=schema))
            yield sink.take()
    yield sink.take()


# -- entry points ------------------------------------------------------------------------------
def iter_export(store: _core.Store, dataset_id: int, fmt: str, **filters: Any) -> Iterator[bytes]:
    """The export as byte chunks (checked before the first chunk is asked for)."""
    fmt = _check_format(fmt)
    if fmt == "parquet" and (reason := parquet_missing()) is not None:
        raise InvalidArgumentError(reason)
    if fmt == "coco":
        return iter_coco(store, dataset_id, **filters)
    if fmt == "csv":
        return iter_csv(store, dataset_id, **filters)
    return iter_parquet(store, dataset_id, **filters)


def export_dataset(
    ds: Any, dest: str | os.PathLike[str] | IO[bytes], *, format: str = "coco", **filters: Any
) -> dict[str, Any]:
    """`Dataset.export`: write to a path (replaced only once complete) or a binary file."""
    from .dataset import check_filters

    fmt = _check_format(format)
    checked = check_filters(**filters)
    chunks = iter_export(ds._store, ds.id, fmt, **checked)
    if hasattr(dest, "write"):
        n = _drain(chunks, dest)  # type: ignore[arg-type]
    else:
        path = os.fspath(dest)
        tmp = f"{path}.part"
        try:
            with open(tmp, "wb") as f:
                n = _drain(chunks, f)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    return {"format": fmt, "bytes": n}


def _drain(chunks: Iterator[bytes], f: IO[bytes]) -> int:
    n = 0
    for c in chunks:
        if c:
            f.write(c)
            n += len(c)
    return n
