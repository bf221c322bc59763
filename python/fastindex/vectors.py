"""Stored embeddings read in bounded memory: `Dataset.iter_embeddings` and the embeddings
export read the store a chunk at a time (`_core.Store.read_embeddings` straight into one
reused float16 buffer), so memory is O(chunk) whatever the dataset's size; search
(`fastindex.search`) keeps its own float16 copy and shares the conversions here."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import InvalidArgumentError, NoEmbeddingsError

if TYPE_CHECKING:
    from .dataset import Dataset
    from .embed import EmbeddingModel

#: Rows per read: 16 MiB of float16 and 32 MiB of float32 at 512 values a row.
CHUNK = 16_384


def to_f32(x16: np.ndarray) -> np.ndarray:
    """float16 -> float32; torch's conversion is 10x numpy's where F16C has no AVX2."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch comes with the [embed] extra
        return x16.astype(np.float32)
    if not x16.flags.writeable or not x16.flags.c_contiguous:
        x16 = x16.copy()  # torch warns about read-only memory (the store's bytes)
    out: np.ndarray = torch.from_numpy(x16).float().numpy()
    return out


def normalise(v: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length in place (stored as float16, a norm is 1 only to float16
    precision); zero rows stay zero."""
    norms = np.sqrt(np.einsum("ij,ij->i", v, v))[:, None]  # no squared copy of `v`
    np.divide(v, norms, out=v, where=norms > 0)
    return v


def dataset_model(dataset: Dataset, model: EmbeddingModel | None = None) -> EmbeddingModel:
    """`model`, or the dataset's embedding model when it is None.

    Raises:
        NoEmbeddingsError: no model given and the dataset has none.
    """
    if model is not None:
        return model
    found = dataset.embedding_model()
    if found is None:
        raise NoEmbeddingsError(
            f"dataset {dataset.name!r} has no embedding model: add images with embed=... "
            "or call dataset.embed()"
        )
    return found


def stored_model(dataset: Dataset, model: EmbeddingModel) -> tuple[int, int]:
    """`(model id, dim)` of `model`'s embeddings in `dataset`'s store.

    Raises:
        NoEmbeddingsError: no embedding by that model was ever stored in this store.
    """
    for mid, name, pretrained, dim in dataset._store.models():
        if (name, pretrained) == (model.key_name, model.key_pretrained):
            return int(mid), int(dim)
    raise NoEmbeddingsError(
        f"dataset {dataset.name!r} has no embeddings by {model!r}: embed with it first "
        "(dataset.embed(model))"
    )


def check_chunk(chunk: int) -> int:
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise InvalidArgumentError(f"chunk must be a positive integer, got {chunk!r}")
    return chunk


def iter_embeddings(
    dataset: Dataset, model: EmbeddingModel | None = None, *, chunk: int = CHUNK
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """`Dataset.iter_embeddings`: `(ids, vectors)` chunks in the order the vectors were
    stored, each read after the last one's key (an embedding stored meanwhile comes in a
    later chunk; none is read twice). The arguments and the model are checked here, before
    the first chunk is asked for."""
    check_chunk(chunk)
    return _chunks(dataset, *stored_model(dataset, dataset_model(dataset, model)), chunk)


def _chunks(
    dataset: Dataset, model_id: int, dim: int, chunk: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    store, ds = dataset._store, dataset.id
    ids = np.empty(chunk, np.int64)
    x16 = np.empty((chunk, dim), np.float16)
    after = 0
    while True:
        after, m = store.read_embeddings(ds, model_id, after, ids, x16.view(np.uint8))
        if m == 0:
            return
        yield ids[:m].copy(), normalise(to_f32(x16[:m]))


# -- export ---------------------------------------------------------------------------------
EMBEDDING_FORMATS = ("parquet", "npy")
#: Bytes reserved at the start of an exported .npy file for its header (numpy's format 1.0:
#: magic, version, length, then a dict padded with spaces): room for any 2-d shape, written
#: once the row count is known.
NPY_HEADER = 128


def npy_header(descr: str, shape: tuple[int, ...]) -> bytes:
    d = repr({"descr": descr, "fortran_order": False, "shape": shape}).encode("latin1")
    pad = NPY_HEADER - 10 - len(d) - 1
    return b"\x93NUMPY\x01\x00" + (NPY_HEADER - 10).to_bytes(2, "little") + d + b" " * pad + b"\n"


def export_embeddings(
    dataset: Dataset,
    dest: str | os.PathLike[str],
    *,
    format: str = "parquet",
    model: EmbeddingModel | None = None,
    chunk: int = CHUNK,
) -> dict[str, Any]:
    """`Dataset.export_embeddings`. "npy" writes `dest` (float32, one row per sample) and
    the sample ids (int64) beside it as `<dest without .npy>.ids.npy`."""
    if format not in EMBEDDING_FORMATS:
        raise InvalidArgumentError(f"unknown embeddings format {format!r}: expected parquet or npy")
    if format == "parquet":
        from .export import parquet_missing

        reason = parquet_missing()
        if reason is not None:
            raise InvalidArgumentError(reason)
    check_chunk(chunk)
    model_id, dim = stored_model(dataset, dataset_model(dataset, model))
    chunks = _chunks(dataset, model_id, dim, chunk)
    path = os.fspath(dest)
    if format == "npy":
        base = path[:-4] if path.endswith(".npy") else path
        targets = [base + ".npy", base + ".ids.npy"]
    else:
        targets = [path]
    parts = [t + ".part" for t in targets]
    try:
        if format == "npy":
            n = _write_npy(chunks, dim, *parts)
        else:
            n = _write_parquet(chunks, dim, parts[0])
        for part, target in zip(parts, targets, strict=True):
            os.replace(part, target)
    except BaseException:
        for part in parts:
            with contextlib.suppress(OSError):
                os.unlink(part)
        raise
    if format == "npy":
        return {"format": "npy", "rows": n, "ids": targets[1]}
    return {"format": "parquet", "rows": n}


def _write_npy(
    chunks: Iterator[tuple[np.ndarray, np.ndarray]], dim: int, vectors: str, ids: str
) -> int:
    n = 0
    with open(vectors, "wb") as fv, open(ids, "wb") as fi:
        fv.write(bytes(NPY_HEADER))
        fi.write(bytes(NPY_HEADER))
        for got, v in chunks:
            fv.write(np.ascontiguousarray(v, "<f4").data)  # the array's memory, no bytes copy
            fi.write(np.ascontiguousarray(got, "<i8").data)
            n += len(got)
        fv.seek(0)
        fv.write(npy_header("<f4", (n, dim)))
        fi.seek(0)
        fi.write(npy_header("<i8", (n,)))
    return n


def _write_parquet(chunks: Iterator[tuple[np.ndarray, np.ndarray]], dim: int, path: str) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("sample_id", pa.int64()), ("embedding", pa.list_(pa.float32(), dim))])
    n = 0
    with pq.ParquetWriter(path, schema) as w:
        for got, v in chunks:
            flat = pa.array(np.ascontiguousarray(v, np.float32).reshape(-1))
            embedding = pa.FixedSizeListArray.from_arrays(flat, dim)
            w.write_table(pa.table([pa.array(got), embedding], schema=schema))
            n += len(got)
    return n
