"""Stored embeddings read in bounded memory: `Dataset.iter_embeddings` and the embeddings export
(`fastindex.vectors`). Vectors written by SQL into a real store, checked against Python's
sqlite3 reading the same rows; peak memory read from a child process's own /proc status."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import fastindex
import numpy as np
import pytest
from fastindex import vectors
from fastindex.errors import InvalidArgumentError, NoEmbeddingsError
from fastindex.testing import tiny_model
from search_helpers import clustered, insert_vectors, read_by_sql


def as_stored(x16: bytes, dim: int) -> np.ndarray:
    """What a reader must return for these float16 bytes: float32 rows of unit length."""
    v = np.frombuffer(x16, "<f2").reshape(-1, dim).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def model_dataset(db: Path, model: fastindex.EmbeddingModel) -> tuple[fastindex.Dataset, int]:
    """A dataset whose embedding model is `model` (not loaded); returns it and the model id."""
    ds = fastindex.Dataset.create("vec", db=db)
    ds.set_embedding_model(model)
    ((model_id, *_),) = ds._store.models()
    return ds, int(model_id)


def test_chunks_are_the_stored_rows_in_order_once(tmp_path: Path) -> None:
    m = tiny_model()
    ds, model_id = model_dataset(tmp_path / "a.db", m)
    insert_vectors(ds, model_id, clustered(50, m.dim).astype("<f2"))
    chunks = list(ds.iter_embeddings(chunk=7))
    assert [len(i) for i, _ in chunks] == [7] * 7 + [1]
    assert all(v.dtype == np.float32 and v.shape[1] == m.dim for _, v in chunks)
    ids = np.concatenate([i for i, _ in chunks])
    got = np.concatenate([v for _, v in chunks])
    sql_ids, blob = read_by_sql(ds, model_id)
    assert ids.tolist() == sql_ids
    assert np.allclose(got, as_stored(blob, m.dim), atol=1e-6)
    snap_ids, snap = ds.embeddings()
    assert snap_ids.tolist() == sql_ids and np.array_equal(snap, got)

    # Vectors stored while a reader is part way come after what it read, none twice.
    reader = ds.iter_embeddings(chunk=20)
    first, _ = next(reader)
    added = insert_vectors(ds, model_id, clustered(30, m.dim, start=1).astype("<f2"))
    rest = np.concatenate([i for i, _ in reader])
    assert first.tolist() + rest.tolist() == sql_ids + added


def test_bad_arguments_and_missing_models_write_nothing(tmp_path: Path) -> None:
    ds = fastindex.Dataset.create("none", db=tmp_path / "a.db")
    with pytest.raises(NoEmbeddingsError, match="no embedding model"):
        ds.iter_embeddings()  # at the call, not at the first chunk
    with pytest.raises(NoEmbeddingsError, match="no embedding model"):
        ds.export_embeddings(tmp_path / "e.npy", format="npy")
    with pytest.raises(NoEmbeddingsError, match="no embeddings by"):
        ds.export_embeddings(tmp_path / "e.parquet", model=tiny_model())
    m = tiny_model()
    ds2, model_id = model_dataset(tmp_path / "b.db", m)
    insert_vectors(ds2, model_id, clustered(3, m.dim).astype("<f2"))
    for bad in (0, -1, True, 2.5):
        with pytest.raises(InvalidArgumentError, match="chunk"):
            ds2.iter_embeddings(chunk=bad)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="embeddings format"):
        ds2.export_embeddings(tmp_path / "e.h5", format="hdf5")
    assert (
        sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(("a.db", "b.db"))) == []
    )


def test_exports_written_in_chunks_read_back_equal(tmp_path: Path) -> None:
    pq = pytest.importorskip("pyarrow.parquet")
    m = tiny_model()
    ds, model_id = model_dataset(tmp_path / "a.db", m)
    insert_vectors(ds, model_id, clustered(1000, m.dim).astype("<f2"))
    ids, want = ds.embeddings()
    info = vectors.export_embeddings(ds, tmp_path / "e.npy", format="npy", chunk=64)
    assert info == {"format": "npy", "rows": 1000, "ids": str(tmp_path / "e.ids.npy")}
    got = np.load(tmp_path / "e.npy")
    assert got.dtype == np.float32 and got.shape == (1000, m.dim)
    assert np.array_equal(got, want)
    assert np.array_equal(np.load(tmp_path / "e.ids.npy"), ids)
    # memory-mapped reading of the header written last works too
    assert np.array_equal(np.load(tmp_path / "e.npy", mmap_mode="r")[999], want[999])
    info = vectors.export_embeddings(ds, tmp_path / "e.parquet", chunk=300)
    assert info == {"format": "parquet", "rows": 1000}
    f = pq.ParquetFile(tmp_path / "e.parquet")
    assert f.metadata.num_row_groups == 4
    t = f.read().to_pydict()
    assert t["sample_id"] == ids.tolist()
    assert np.array_equal(np.array(t["embedding"], np.float32), want)
    assert not list(tmp_path.glob("*.part"))
    # an empty export is a valid empty file
    empty, _ = model_dataset(tmp_path / "c.db", m)
    assert empty.export_embeddings(tmp_path / "z.npy", format="npy")["rows"] == 0
    assert np.load(tmp_path / "z.npy").shape == (0, m.dim)


CHILD = textwrap.dedent(
    """
    import json, sys
    import fastindex
    from fastindex import vectors

    def hwm():
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024

    ds = fastindex.Dataset.load("vec", db=sys.argv[1], resume=False)
    ds.embedding_model()  # imports torch and open_clip (the model is not loaded)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak starts again from here
    before = hwm()
    if sys.argv[2] == "export":
        n = vectors.export_embeddings(ds, sys.argv[3], format="npy", chunk=1024)["rows"]
    else:
        n = len(ds.embeddings()[0])
    print(json.dumps({"n": n, "grew": hwm() - before}))
    """
)


def test_export_memory_stays_bounded_where_embeddings_holds_a_copy(tmp_path: Path) -> None:
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux's /proc/self/clear_refs to reset the peak")
    m = fastindex.EmbeddingModel()  # ViT-B-32's identity and dim (512); never loaded
    ds, model_id = model_dataset(tmp_path / "a.db", m)
    n = 100_000
    insert_vectors(ds, model_id, clustered(n, m.dim).astype("<f2"))
    f32 = n * m.dim * 4  # one float32 copy: 200 MB
    grew = {}
    for how in ("export", "embeddings"):
        out = subprocess.run(
            [sys.executable, "-c", CHILD, ds.db, how, str(tmp_path / "e.npy")],
            capture_output=True,
            text=True,
            timeout=300,
            check=True,
            env={**os.environ, "FASTINDEX_CACHE_KIB": "2048"},
        )
        got = json.loads(out.stdout.strip().splitlines()[-1])
        assert got["n"] == n
        grew[how] = got["grew"]
    assert grew["export"] < f32 / 4, grew
    assert grew["embeddings"] > f32, grew
    assert np.load(tmp_path / "e.npy", mmap_mode="r").shape == (n, m.dim)
