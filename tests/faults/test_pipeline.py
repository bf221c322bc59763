"""The background pipeline and the CLI under faults: kicks racing cancels, leases kept while a
model loads or a batch runs long, a second process, kill -9 and reruns, a full disk, Ctrl-C,
and hostile names on the command line.

Real processes, real SQLite, a real server; the slow steps are slow test models (a subclass of
`EmbeddingModel` whose load or forward pass sleeps), not mocks. Time bounds are hang guards.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path
from typing import Any

import fastindex
import pytest
from fastindex import _core
from PIL import Image
from testkit import resize_tmpfs, tmpfs

CLI = [sys.executable, "-m", "fastindex.cli"]
HANG = 60.0  # a hang guard, not a timing assertion


def _png(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8 + i % 7, 5 + i % 5), (i % 256, 0, 0)).save(buf, "PNG")
    return buf.getvalue()


def make_tree(root: Path, n: int) -> Path:
    """`n` small PNGs in folders of 500 (a few distinct encodings, repeated)."""
    blobs = [_png(i) for i in range(8)]
    for i in range(n):
        d = root / f"d{i // 500:03d}"
        if i % 500 == 0:
            d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i:06d}.png").write_bytes(blobs[i % len(blobs)])
    return root


def run_cli(*args: str | bytes, env: dict[str, str] | None = None, timeout: float = HANG) -> Any:
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, timeout=timeout, env=env, errors="replace"
    )


def counts(db: Path, name: str) -> dict[str, Any]:
    """The dataset's progress, read without starting any work here."""
    return fastindex.Dataset.load(name, db=db, resume=False).get_loading_progress()


# A child that adds a folder (phase 1) and is killed -9 the moment the add returns, while
# phase 2 has barely started: the store keeps `pending` rows and a lease of a dead process.
KILLED_AFTER_PHASE_1 = """
import os, signal, sys
import fastindex
ds = fastindex.Dataset.load_or_create(sys.argv[2], db=sys.argv[1])
ds.add_images_from_path(sys.argv[3], embed=False)
os.kill(os.getpid(), signal.SIGKILL)
"""


def kill_after_phase_1(db: Path, name: str, folder: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-c", KILLED_AFTER_PHASE_1, str(db), name, str(folder)], timeout=HANG
    )
    assert r.returncode == -signal.SIGKILL


# -- the state machine (in this process) ----------------------------------------------------

SLOW_MODEL = """
import threading, time
from fastindex.embed import EmbeddingModel
from fastindex import testing

class SlowModel(EmbeddingModel):
    '''The tiny test model, with a load and a forward pass that take `load_s` and `forward_s`
    seconds; each forward pass appends its batch size to `log` (a file), if given.'''

    def __init__(self, *, load_s=0.0, forward_s=0.0, log=None, marker=None, **kw):
        super().__init__(testing.register_tiny_model(), None, device="cpu", **kw)
        self.load_s, self.forward_s, self.log, self.marker = load_s, forward_s, log, marker
        self.in_forward = threading.Event()

    def load(self):
        if not self.loaded:
            if self.marker:
                open(self.marker, "w").close()
            time.sleep(self.load_s)
        return super().load()

    def _forward(self, x):
        self.in_forward.set()
        time.sleep(self.forward_s)
        if self.log:
            with open(self.log, "a") as f:
                f.write(f"{len(x)}\\n")
        return super()._forward(x)
"""


def slow_model(**kw: Any) -> Any:
    ns: dict[str, Any] = {}
    exec(SLOW_MODEL, ns)  # the same class the child processes below define
    return ns["SlowModel"](**kw)


def test_default_model_spec_matches_the_library_default() -> None:
    """The default spec that the foreground stores without importing open_clip is exactly
    what `EmbeddingModel()` means."""
    from fastindex.dataset import DEFAULT_EMBED_DIM, DEFAULT_EMBED_SPEC
    from fastindex.embed import EmbeddingModel

    m = EmbeddingModel()
    assert m.spec() == DEFAULT_EMBED_SPEC
    assert m.dim == DEFAULT_EMBED_DIM


def test_a_kick_during_a_cancel_is_not_lost(tmp_path: Path) -> None:
    """Rows added while the embed phase is being cancelled (its run stuck in a forward pass)
    are embedded: the kick starts the phase again once the stopped run has ended."""
    make_tree(tmp_path / "a", 8)
    ds = fastindex.Dataset.create("k", db=tmp_path / "s.db")
    log = tmp_path / "forward.log"
    model = slow_model(forward_s=1.0, batch_size=4, log=str(log))
    ds.add_images_from_path(tmp_path / "a", embed=model)
    assert model.in_forward.wait(HANG)  # a claimed batch is in its forward pass
    # A forward pass does not stop midway: cancel gives up after its timeout.
    assert ds.cancel(timeout=0.05) is False
    make_tree(tmp_path / "b", 5)
    job = ds.add_images_from_path(tmp_path / "b", embed=model)  # kicks while cancelling
    assert ds.wait(timeout=HANG), ds.get_loading_progress()
    p = ds.get_loading_progress()
    assert p["ready"] == p["total"] == 13 and p["embedding"] == 0
    assert job.progress()["ready"] == 5
    ds.cancel()


def test_cancel_then_kick_resumes_and_cancel_alone_stops(tmp_path: Path) -> None:
    make_tree(tmp_path / "a", 8)
    ds = fastindex.Dataset.create("c", db=tmp_path / "s.db")
    model = slow_model(forward_s=0.3, batch_size=4)
    ds.add_images_from_path(tmp_path / "a", embed=model)
    assert ds.cancel(timeout=HANG) is True
    p = ds.get_loading_progress()
    assert p["embedding"] == 0  # claims given back by a run that stopped
    assert not ds._pipeline.running
    ds.embed(model)
    assert ds.wait(timeout=HANG)
    assert ds.get_loading_progress()["ready"] == 8


# -- leases across processes ----------------------------------------------------------------

EMBED_CHILD = (
    SLOW_MODEL
    + """
import sys, json
import fastindex
db, name, folder, kw = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
ds = fastindex.Dataset.load_or_create(name, db=db)
model = SlowModel(**kw)
if folder:
    ds.add_images_from_path(folder, embed=model)
else:
    ds.embed(model)
print("done", ds.wait(120), json.dumps(ds.get_loading_progress()), flush=True)
"""
)


def spawn_embedder(
    db: Path, name: str, folder: Path | None, ttl: float, **kw: Any
) -> subprocess.Popen[str]:
    env = {**os.environ, "FASTINDEX_LEASE_TTL": str(ttl)}
    return subprocess.Popen(
        [sys.executable, "-c", EMBED_CHILD, str(db), name, str(folder or ""), json.dumps(kw)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def test_the_lease_is_renewed_while_the_model_loads(tmp_path: Path) -> None:
    """A model that loads for several TTLs keeps its process's embed lease: another owner
    trying to take it over all that time never gets it."""
    ttl = 1.5  # renewed every 0.5 s: a wide margin on a loaded machine
    make_tree(tmp_path / "imgs", 6)
    db = tmp_path / "s.db"
    marker = tmp_path / "loading"
    child = spawn_embedder(
        db, "l", tmp_path / "imgs", ttl, load_s=4 * ttl, batch_size=4, marker=str(marker)
    )
    try:
        deadline = time.monotonic() + HANG
        while not marker.exists():
            assert child.poll() is None, child.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.01)
        store = _core.Store(str(db))
        ds_id = store.find_dataset("l")[0]  # type: ignore[index]
        tries = 0
        while child.poll() is None:
            p = store.progress(ds_id)
            if p["ready"] > 0:
                break  # loaded and embedding: the window is over
            assert not store.acquire_lease(ds_id, "embed", "intruder:1:x", ttl), "taken over"
            tries += 1
            time.sleep(ttl / 4)
            assert time.monotonic() < deadline
        assert tries >= 8  # the attempts spanned several TTLs
        out, err = child.communicate(timeout=HANG)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == 0, err
    assert out.startswith("done True"), out + err


def test_a_second_process_does_not_take_over_a_live_renewing_holder(tmp_path: Path) -> None:
    """Batches that each take longer than the TTL: a second process that wants the same
    dataset embedded waits; every row is forwarded once, by the first."""
    ttl = 1.5
    make_tree(tmp_path / "imgs", 12)
    db = tmp_path / "s.db"
    a_log, b_log = tmp_path / "a.log", tmp_path / "b.log"
    a = spawn_embedder(
        db, "t", tmp_path / "imgs", ttl, forward_s=1.5 * ttl, batch_size=4, log=str(a_log)
    )
    try:
        deadline = time.monotonic() + HANG
        while not a_log.exists():  # A is through its first batch
            assert a.poll() is None, a.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.01)
        b = spawn_embedder(db, "t", None, ttl, forward_s=0.0, batch_size=4, log=str(b_log))
        out_a, err_a = a.communicate(timeout=HANG)
        out_b, err_b = b.communicate(timeout=HANG)
    finally:
        for proc in (a,):
            if proc.poll() is None:
                proc.kill()
    assert a.returncode == 0 and out_a.startswith("done True"), out_a + err_a
    assert b.returncode == 0 and out_b.startswith("done True"), out_b + err_b
    forwarded_a = sum(int(x) for x in a_log.read_text().split())
    assert forwarded_a == 12
    assert not b_log.exists() or b_log.read_text() == ""
    assert counts(db, "t")["ready"] == 12


def test_a_lost_lease_stops_the_work_commits_nothing_and_is_not_an_error(tmp_path: Path) -> None:
    """Another owner takes the embed lease over while a batch is in its forward pass: the
    holder stops, writes nothing more while the other holds it, reports no error, and once
    the lease is free again it takes the work back and finishes it."""
    ttl = 1.0
    make_tree(tmp_path / "imgs", 8)
    db = tmp_path / "s.db"
    child = spawn_embedder(db, "x", tmp_path / "imgs", ttl, forward_s=2.0, batch_size=4)
    try:
        store = _core.Store(str(db)) if db.exists() else None
        deadline = time.monotonic() + HANG
        ds_id = None
        while True:  # until a batch is claimed and in its forward pass
            assert child.poll() is None, child.communicate()
            assert time.monotonic() < deadline
            if db.exists():
                store = store or _core.Store(str(db))
                row = store.find_dataset("x")
                if row is not None:
                    ds_id = row[0]
                    if store.progress(ds_id)["embedding"] > 0:
                        break
            time.sleep(0.01)
        assert store is not None and ds_id is not None
        intruder = "intruder:1:x"
        assert store.acquire_lease(ds_id, "embed", intruder, -1.0)  # take it over now
        ready = store.progress(ds_id)["ready"]
        until = time.monotonic() + 3.0  # past the forward pass and several TTLs
        while time.monotonic() < until:
            assert store.acquire_lease(ds_id, "embed", intruder, ttl)  # still ours
            assert store.progress(ds_id)["ready"] == ready, "the old holder committed"
            time.sleep(0.1)
        store.release_lease(ds_id, "embed", intruder)
        out, err = child.communicate(timeout=HANG)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == 0, err
    assert out.startswith("done True"), out + err
    p = json.loads(out.split(" ", 2)[2])
    assert p["ready"] == 8 and p["errors"] == {}


# -- the CLI: reruns, full disks, Ctrl-C ----------------------------------------------------


def test_a_rerun_after_kill_9_finishes_every_row_and_says_so(tmp_path: Path) -> None:
    folder = make_tree(tmp_path / "photos", 6000)
    db = tmp_path / "s.db"
    kill_after_phase_1(db, "photos", folder)
    before = counts(db, "photos")
    assert before["total"] == 6000 and before["status"] == "in_progress"
    r = run_cli("index", str(folder), "--db", str(db), "--no-embed", "--quiet")
    assert r.returncode == 0, r.stderr
    after = counts(db, "photos")
    assert after["status"] == "complete" and after["pending"] == 0
    assert after["indexed"] == 6000
    assert "0 added, 6,000 already there" in r.stderr
    assert "indexed 6,000" in r.stderr
    if before["pending"]:
        assert f"finished {before['pending']:,} rows left by an earlier run" in r.stderr


@pytest.fixture
def small_disk(tmp_path: Path) -> Any:
    with tmpfs(tmp_path / "mnt", "16m") as mnt:
        yield mnt


def test_a_full_disk_ends_the_cli_with_exit_1_and_a_rerun_after_space_is_freed_finishes(
    tmp_path: Path, small_disk: Path
) -> None:
    folder = make_tree(tmp_path / "photos", 20_000)
    db = small_disk / "s.db"
    kill_after_phase_1(db, "photos", folder)
    # Leave the store almost no room: phase 2's writes hit ENOSPC.
    free = shutil.disk_usage(small_disk).free
    (small_disk / "filler").write_bytes(b"\0" * max(0, free - 96 * 1024))
    r = run_cli("index", str(folder), "--db", str(db), "--no-embed", "--quiet", timeout=30)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "Traceback" not in r.stderr
    assert "full" in r.stderr and "s.db" in r.stderr, r.stderr

    resize_tmpfs(small_disk, "64m")
    again = run_cli("index", str(folder), "--db", str(db), "--no-embed", "--quiet")
    assert again.returncode == 0, again.stderr
    assert "stopped" not in again.stderr
    p = counts(db, "photos")
    assert p["status"] == "complete" and p["pending"] == 0 and p["indexed"] == 20_000
    assert p["errors"] == {} and p["error"] is None
    # and a later run has nothing stale to report either
    third = run_cli("index", str(folder), "--db", str(db), "--no-embed", "--quiet")
    assert third.returncode == 0, third.stderr


def test_ctrl_c_during_phase_2_exits_130_and_the_next_run_finishes(tmp_path: Path) -> None:
    folder = make_tree(tmp_path / "photos", 20_000)
    db = tmp_path / "s.db"
    env = {**os.environ, "FASTINDEX_IO_THREADS": "1"}  # a phase 2 long enough to interrupt
    cli = subprocess.Popen(
        [*CLI, "index", str(folder), "--db", str(db), "--no-embed", "--quiet"],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    deadline = time.monotonic() + HANG
    while cli.poll() is None and _pending_or_none(db) is None:  # until phase 1 is committed
        assert time.monotonic() < deadline
        time.sleep(0.005)
    cli.send_signal(signal.SIGINT)
    _, err = cli.communicate(timeout=5)
    if cli.returncode == 0:
        pytest.skip("phase 2 finished before the signal (a machine too fast for the window)")
    assert cli.returncode == 130, err
    assert "Traceback" not in err and "interrupted" in err
    again = run_cli("index", str(folder), "--db", str(db), "--no-embed", "--quiet")
    assert again.returncode == 0, again.stderr
    p = counts(db, "photos")
    assert p["status"] == "complete" and p["indexed"] == 20_000


def test_ctrl_c_while_the_embed_thread_is_busy_exits_130_at_once(tmp_path: Path) -> None:
    """The default model is imported and loaded in the embed thread (seconds, and not
    interruptible): Ctrl-C then still ends the CLI at once with 130, and a rerun without
    embeddings finishes."""
    folder = make_tree(tmp_path / "photos", 50)
    db = tmp_path / "s.db"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cli = subprocess.Popen(
        [*CLI, "index", str(folder), "--db", str(db), "--quiet"],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    deadline = time.monotonic() + HANG
    while cli.poll() is None and _pending_or_none(db) != 0:  # phase 2 done, embed starting
        assert time.monotonic() < deadline
        time.sleep(0.005)
    cli.send_signal(signal.SIGINT)
    _, err = cli.communicate(timeout=5)
    if cli.returncode == 1 and "embed" in err:
        pytest.skip("the embed thread failed before the signal (no torch import to wait on)")
    assert cli.returncode == 130, err
    assert "Traceback" not in err
    p = counts(db, "photos")
    assert p["embedding"] == 0 and p["indexed"] == 50


def _pending_or_none(db: Path) -> int | None:
    try:
        p = counts(db, "photos")
    except (fastindex.DatasetNotFoundError, fastindex.StoreError):
        return None
    return int(p["pending"]) if p["total"] else None


# -- serve resumes ----------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.load(r)


def test_serve_resumes_pending_rows_until_progress_is_complete(tmp_path: Path) -> None:
    folder = make_tree(tmp_path / "photos", 3000)
    db = tmp_path / "s.db"
    kill_after_phase_1(db, "photos", folder)
    ds_id = counts(db, "photos")["dataset_id"]
    port = _free_port()
    server = subprocess.Popen(
        [*CLI, "serve", "--db", str(db), "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + HANG
        p: Any = None
        while time.monotonic() < deadline:
            try:
                p = _get(f"http://127.0.0.1:{port}/api/progress/{ds_id}")
            except OSError:
                p = None
            if p is not None and p["status"] == "complete":
                break
            assert server.poll() is None, server.communicate()
            time.sleep(0.05)
        assert p is not None and p["status"] == "complete", p
        assert p["pending"] == 0 and p["indexed"] == 3000 and p["error"] is None
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()


def test_index_serve_on_a_port_in_use_says_so_and_leaves_no_dataset(tmp_path: Path) -> None:
    """The server starts beside phase 1: a port it cannot listen on still ends the run with
    a one-line error (exit 2) and no dataset left behind."""
    folder = make_tree(tmp_path / "photos", 20)
    db = tmp_path / "s.db"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        r = run_cli("index", str(folder), "--db", str(db), "--serve", "--port", str(port))
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and "cannot listen" in r.stderr, r.stderr
    assert fastindex.list_datasets(db=db) == []


# -- hostile text on the command line -------------------------------------------------------


def test_failed_paths_with_rich_markup_characters_print(tmp_path: Path) -> None:
    folder = tmp_path / "photos [raw]"
    folder.mkdir()
    Image.new("RGB", (9, 9)).save(folder / "ok.png")
    (folder / "[bold]broken].jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    (folder / "x[\\]y[red.png").write_bytes(b"nope")
    r = run_cli("index", str(folder), "--db", str(tmp_path / "s.db"), "--no-embed")
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    assert "[bold]broken].jpg" in r.stderr and "x[\\]y[red.png" in r.stderr
    assert "failed 2" in r.stderr


def test_names_that_are_not_utf8_give_a_message_not_a_traceback(tmp_path: Path) -> None:
    base = os.fsencode(tmp_path)
    folder = base + b"/ph\xffotos"
    os.mkdir(folder)
    Image.new("RGB", (9, 9)).save(os.fsdecode(folder + b"/a.png"))
    db = os.fsencode(tmp_path / "s.db")

    def cli(*args: bytes) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [os.fsencode(sys.executable), b"-m", b"fastindex.cli", *args],
            capture_output=True,
            timeout=HANG,
        )

    # a name that is not valid UTF-8: a one-line error, exit 2
    r = cli(b"index", folder, b"--db", db, b"--name", b"n\xfe", b"--no-embed")
    err = r.stderr.decode("utf-8", "replace")
    assert r.returncode == 2, err
    assert err.startswith("fastindex: ") and err.count("\n") == 1 and "UTF-8" in err

    # a folder and a store whose names are not valid UTF-8: indexed, or (where the core
    # cannot take such a path) one line saying so
    for args in (
        (b"index", folder, b"--db", db, b"--no-embed"),
        (b"index", os.fsencode(tmp_path), b"--db", base + b"/st\xfeore.db", b"--no-embed"),
    ):
        r = cli(*args)
        err = r.stderr.decode("utf-8", "replace")
        assert "Traceback" not in err, err
        assert r.returncode in (0, 2), err
        if r.returncode == 2:
            assert err.startswith("fastindex: ") and err.count("\n") == 1, err


def test_the_default_call_imports_torch_only_in_the_background(tmp_path: Path) -> None:
    """With `embed` left at its default, open_clip and torch are imported by the embed thread,
    never by the thread that called `add_images_from_path`."""
    make_tree(tmp_path / "imgs", 5)
    child = textwrap.dedent(
        """
        import builtins, sys, threading
        seen = []
        real_import = builtins.__import__
        def watch(name, *args, **kw):  # every `import` statement comes through here
            if name.split(".")[0] in ("torch", "open_clip") and name not in sys.modules:
                seen.append((name, threading.current_thread().name))
            return real_import(name, *args, **kw)
        builtins.__import__ = watch
        import fastindex
        ds = fastindex.Dataset.create("d", db=sys.argv[1])
        job = ds.add_images_from_path(sys.argv[2])
        in_call = list(seen)
        ds.wait(60)
        print(in_call, seen, ds.get_loading_progress()["errors"])
        assert not in_call, in_call
        assert seen and all(t != "MainThread" for _, t in seen), seen
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}  # the default weights need not be here
    r = subprocess.run(
        [sys.executable, "-c", child, str(tmp_path / "s.db"), str(tmp_path / "imgs")],
        capture_output=True,
        text=True,
        timeout=HANG,
        env=env,
    )
    assert r.returncode == 0, r.stdout + r.stderr
