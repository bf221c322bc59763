"""Phase 3 on a Ray cluster (`fastindex.RayEngine`): a real local cluster, the tiny model, real
worker processes killed for real. Every row must end `ready` (or `failed` with its reason)
exactly once whatever dies.

The workers' misbehaviour comes from the documented test hook of `fastindex.ray_actor`
(`FASTINDEX_RAY_FAULT`, set here before the cluster starts, so every worker inherits it): a
file whose name contains `__poison__` ends its worker process, `__hang__` hangs it, `__slow__`
makes its batch take half a second. No image decodes into a crash reliably, so the hook stands in
for one.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ray = pytest.importorskip("ray")

import fastindex  # noqa: E402
import httpx  # noqa: E402
import numpy as np  # noqa: E402
from embed_helpers import make_folder, vectors_by_path, wait_until  # noqa: E402
from fastindex import _core, leases  # noqa: E402
from fastindex.testing import image_bytes, tiny_model, write_image  # noqa: E402

pytestmark = pytest.mark.timeout(600)

#: How long a test waits for the cluster before it calls a run hung: a guard, not a timing.
#: Generous because a slow or busy machine takes tens of seconds to start an actor (each
#: imports torch and builds the model) and several tests restart actors.
HANG = 240.0

FAULTS = "crash:__poison__,hang:__hang__,slow:__slow__"


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    """A local cluster of 2 CPUs for the whole module; yields its address."""
    old = os.environ.get("FASTINDEX_RAY_FAULT")
    os.environ["FASTINDEX_RAY_FAULT"] = FAULTS
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()
        if old is None:
            os.environ.pop("FASTINDEX_RAY_FAULT", None)
        else:
            os.environ["FASTINDEX_RAY_FAULT"] = old


@pytest.fixture(scope="module")
def engine(cluster: str) -> Iterator[fastindex.RayEngine]:
    """Two CPU workers, kept between the tests (a worker takes seconds to import torch)."""
    e = fastindex.RayEngine(cluster, lease_rows=8, cpu_actors=2)
    yield e
    e.close()


def model() -> Any:
    return tiny_model(batch_size=4)


def dataset(tmp_path: Path, name: str, n: int, *, prefix: str = "") -> fastindex.Dataset:
    """`n` images through phases 1 and 2 (no model yet)."""
    folder = tmp_path / name
    make_folder(folder, n)
    if prefix:
        for p in sorted(folder.rglob("img_*")):
            p.rename(p.with_name(prefix + p.name))
    ds = fastindex.Dataset.create(name, db=tmp_path / "s.db")
    assert ds.add_images_from_path(folder, embed=False).wait(HANG)
    return ds


def assert_each_row_once(ds: fastindex.Dataset, *, failed: int = 0) -> None:
    p = ds.get_loading_progress()
    assert p["status"] == "complete", p
    assert (p["ready"], p["failed"], p["embedding"], p["indexed"]) == (
        p["total"] - failed,
        failed,
        0,
        0,
    ), p
    ids, _ = ds.embeddings()
    ready = {s.id for s in ds.samples(status="ready", limit=10_000)}
    assert sorted(int(i) for i in ids) == sorted(ready)


def run_on(ds: fastindex.Dataset, engine: fastindex.RayEngine, timeout: float = HANG) -> None:
    ds.embed(model(), engine=engine)
    assert ds.wait(timeout), ds.get_loading_progress()


def test_results_equal_the_single_machine_engine_bit_for_bit(
    tmp_path: Path, engine: fastindex.RayEngine
) -> None:
    ds = dataset(tmp_path, "ray", 30)
    local = fastindex.Dataset.create("local", db=tmp_path / "s.db")
    assert local.add_images_from_path(tmp_path / "ray", embed=model()).wait(HANG)
    run_on(ds, engine)
    assert_each_row_once(ds)
    a, b = vectors_by_path(ds), vectors_by_path(local)
    assert sorted(a) == sorted(b) and len(a) == 30
    for k in a:
        assert np.array_equal(a[k], b[k]), k
    # search reads what the workers made
    assert ds.search("a photo", k=3)
    workers = ds.get_loading_progress()["cluster"]["workers"]
    assert len(workers) == 2 and sum(w["rows"] for w in workers) == 30
    assert any(w["node"] for w in workers) and all(w["restarts"] == 0 for w in workers)


def test_workers_killed_mid_lease_give_back_their_rows(
    tmp_path: Path, engine: fastindex.RayEngine
) -> None:
    ds = dataset(tmp_path, "killed", 32, prefix="__slow__")
    released = engine.released
    ds.embed(model(), engine=engine)
    assert wait_until(lambda: all(w["state"] == "running" for w in engine.workers()), HANG), (
        engine.workers()
    )
    w0, w1 = engine._workers
    ray.kill(w0.actor, no_restart=True)  # gone for good: the engine starts another
    os.kill(w1.pid, signal.SIGKILL)  # the process dies: Ray restarts the actor
    assert ds.wait(HANG), ds.get_loading_progress()
    assert_each_row_once(ds)
    assert engine.released - released >= 2 * 8  # the two leases that were running
    rows = ds.get_loading_progress()["cluster"]["workers"]
    assert sum(w["restarts"] for w in rows) >= 2


def test_a_hanging_worker_is_killed_by_the_lease_timeout(
    tmp_path: Path, engine: fastindex.RayEngine
) -> None:
    ds = dataset(tmp_path, "hang", 12)
    write_image(tmp_path / "hang" / "__hang__.jpg", image_bytes(seed=99))
    assert ds.add_images_from_path(tmp_path / "hang", embed=False).wait(HANG)
    engine.lease_timeout, engine.max_attempts = 3.0, 2
    try:
        run_on(ds, engine, 2 * HANG)  # an actor killed and started again
    finally:
        engine.lease_timeout, engine.max_attempts = None, fastindex.ray_engine.MAX_ATTEMPTS
    assert_each_row_once(ds, failed=1)
    (bad,) = ds.samples(status="failed")
    assert Path(bad.path).name == "__hang__.jpg" and bad.error == "worker died"


def test_a_poison_image_ends_failed_after_its_attempts(
    tmp_path: Path, engine: fastindex.RayEngine
) -> None:
    ds = dataset(tmp_path, "poison", 14)
    write_image(tmp_path / "poison" / "d1" / "__poison__.png", image_bytes(seed=7, fmt="PNG"))
    assert ds.add_images_from_path(tmp_path / "poison", embed=False).wait(HANG)
    released = engine.released
    run_on(ds, engine, 2 * HANG)  # three actor deaths, each started again
    assert_each_row_once(ds, failed=1)
    (bad,) = ds.samples(status="failed")
    assert Path(bad.path).name == "__poison__.png" and bad.error == "worker died"
    # three deaths: with its first lease, with a small lease of suspects, alone
    assert engine.released - released >= 3
    assert engine.gave_up >= 1


def test_a_duplicated_result_changes_nothing(tmp_path: Path) -> None:
    ds = dataset(tmp_path, "dup", 6)
    m = model()
    ds.set_embedding_model(m)
    store = _core.Store(str(tmp_path / "s.db"))
    me = leases.owner()
    assert store.acquire_lease(ds.id, "embed", me, 30.0)
    model_id = store.register_model(m.key_name, m.key_pretrained, m.dim)
    batch, rows = store.claim_batch(ds.id, 4, 0, me)
    ids = [int(r[0]) for r in rows]
    first = np.ones((4, m.dim), "<f2").tobytes()
    assert store.commit_batch(ds.id, model_id, batch, ids, first, [], owner=me) == 4
    again = np.zeros((4, m.dim), "<f2").tobytes()
    assert store.commit_batch(ds.id, model_id, batch, ids, again, [], owner=me) == 0
    # a result for a lease given back is refused too, and the counters did not move twice
    batch2, rows2 = store.claim_batch(ds.id, 4, ids[-1], me)
    ids2 = [int(r[0]) for r in rows2]
    assert store.release_batch(
        ds.id, batch2, ids2, worker_died=False, max_attempts=3, owner=me
    ) == (2, 0)
    assert (
        store.commit_batch(ds.id, model_id, batch2, ids2, again[: 2 * m.dim * 2], [], owner=me) == 0
    )
    p = ds.get_loading_progress()
    assert (p["ready"], p["indexed"], p["embedding"]) == (4, 2, 0)
    got, vecs = store.load_embeddings(ds.id, model_id)[1:]
    assert sorted(got) == sorted(ids)
    assert np.frombuffer(vecs, "<f2").tolist() == [1.0] * (4 * m.dim)
    store.release_lease(ds.id, "embed", me)


def test_progress_over_http_during_a_ray_run(tmp_path: Path, engine: fastindex.RayEngine) -> None:
    from fastindex.server import start_server

    ds = dataset(tmp_path, "http", 24, prefix="__slow__")
    with start_server(tmp_path / "s.db", port=0) as server:
        ds.embed(model(), engine=engine)
        seen: list[dict[str, Any]] = []

        def running() -> bool:
            p = httpx.get(f"{server.url}/api/progress/{ds.id}", timeout=10).json()
            seen.append(p)
            c = p.get("cluster") or {}
            return p["status"] == "in_progress" and any(
                w["state"] == "running" and w["node"] for w in c.get("workers", [])
            )

        deadline = time.monotonic() + HANG
        while not running():
            assert time.monotonic() < deadline, seen[-1:]
            time.sleep(0.1)
        assert ds.wait(HANG)
        p = httpx.get(f"{server.url}/api/progress/{ds.id}", timeout=10).json()
        assert p["ready"] == 24 and p["cluster"]["engine"] == "ray"
        assert sum(w["rows"] for w in p["cluster"]["workers"]) >= 24


def test_a_default_run_never_imports_ray(tmp_path: Path) -> None:
    make_folder(tmp_path / "imgs", 4)
    code = (
        "import sys, fastindex\n"
        f"ds = fastindex.Dataset.create('d', db={str(tmp_path / 'd.db')!r})\n"
        f"ds.add_images_from_path({str(tmp_path / 'imgs')!r}, embed=False).wait(30)\n"
        "assert 'ray' not in sys.modules, 'ray imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_without_ray_the_engine_is_one_line_naming_the_extra(tmp_path: Path) -> None:
    make_folder(tmp_path / "imgs", 2)
    ds = fastindex.Dataset.create("d", db=tmp_path / "d.db")
    assert ds.add_images_from_path(tmp_path / "imgs", embed=False).wait(HANG)
    code = (
        "import sys; sys.modules['ray'] = None\n"
        "from fastindex.cli import main\n"
        f"sys.exit(main(['embed', {str(tmp_path / 'd.db')!r}, '--engine', 'ray']))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines() == [
        "fastindex: phase 3 on a Ray cluster needs the ray extra (ray not installed): "
        "pip install 'fastindex[ray]'"
    ]


def test_a_folder_the_workers_cannot_read_stops_phase_3_naming_the_node(
    tmp_path: Path, engine: fastindex.RayEngine
) -> None:
    ds = dataset(tmp_path, "gone", 4)
    (tmp_path / "gone").rename(tmp_path / "elsewhere")
    ds.embed(model(), engine=engine)
    assert not ds.wait(HANG)
    p = ds.get_loading_progress()
    assert "cannot read" in p["error"] and str(tmp_path / "gone") in p["error"], p["error"]
    node = ray.util.get_node_ip_address()
    assert f"node {node}" in p["error"]
    assert p["indexed"] == 4 and p["embedding"] == 0
    # The same workers serve the next dataset: a check of the lost folders still pending
    # there is not this run's error.
    ok = dataset(tmp_path, "next", 6)
    run_on(ok, engine)
    assert_each_row_once(ok)


def test_cancel_stops_the_cluster_run_and_gives_the_rows_back(
    tmp_path: Path, engine: fastindex.RayEngine
) -> None:
    ds = dataset(tmp_path, "cancel", 24, prefix="__slow__")
    ds.embed(model(), engine=engine)
    assert wait_until(lambda: ds.get_loading_progress()["embedding"] > 0, HANG)
    assert ds.cancel(10)
    p = ds.get_loading_progress()
    assert p["embedding"] == 0 and p["ready"] + p["indexed"] == 24, p
    assert engine.workers() == []  # the workers were ended with the run


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "fastindex.cli", *args]


def test_coordinator_killed_and_restarted_finishes_exactly_once(
    tmp_path: Path, cluster: str, engine: fastindex.RayEngine
) -> None:
    engine.close()  # the CLI's worker needs the cluster's CPUs
    ds = dataset(tmp_path, "coord", 40, prefix="__slow__")
    ds.set_embedding_model(model())
    db = str(tmp_path / "s.db")
    cmd = _cli("embed", db, "--engine", "ray", "--address", cluster, "--lease-rows", "8")
    cmd.append("--quiet")
    proc = subprocess.Popen(cmd, start_new_session=True, stderr=subprocess.DEVNULL)
    try:
        assert wait_until(lambda: ds.get_loading_progress()["ready"] > 0, HANG)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    p = ds.get_loading_progress()
    assert p["ready"] < 40, "killed too late to tell"
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=HANG)
    assert done.returncode == 0, done.stderr
    assert_each_row_once(ds)
    assert json.loads(json.dumps(ds.get_loading_progress()))["ready"] == 40
