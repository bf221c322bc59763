"""Background work: one pipeline per dataset and process, running phase 2 and phase 3.

The store is the queue. A pipeline's threads take rows by status (`pending` for the probe,
`indexed` for the embedder), so a restart resumes where the last run stopped. A lease row in
the store keeps two processes from working on the same dataset's phase at once; a lease whose
holder stopped renewing it (a crash) is taken over, and rows the crashed embedder had claimed
are put back to `indexed`.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from . import _core
from .errors import CancelledError, FastIndexError

if TYPE_CHECKING:
    from .embed import EmbeddingModel

log = logging.getLogger("fastindex")

#: A lease not renewed for this long (seconds) is taken over by another process.
LEASE_TTL = 15.0
#: How often a waiting worker looks for new rows (seconds).
POLL = 0.05

_NONCE = uuid.uuid4().hex[:8]


def _owner() -> str:
    """This process's name on leases, `host:pid:nonce`: the store takes over at once a lease
    whose process on this host is gone (computed per call: a forked child is another owner)."""
    return f"{socket.gethostname()}:{os.getpid()}:{_NONCE}"


class Pipeline:
    """The background threads of one dataset in this process."""

    def __init__(self, db: str, dataset_id: int) -> None:
        self.db = db
        self.dataset_id = dataset_id
        self._lock = threading.Condition()
        self._threads: dict[str, threading.Thread] = {}
        # Under `_lock`: a phase is `active` from the moment its thread is started until the
        # thread has decided to exit, and `wanted` when new rows may wait for it. Deciding to
        # exit and marking inactive happen in one step, so a `kick` is never lost to a thread
        # that is on its way out.
        self._active = {"probe": False, "embed": False}
        self._wanted = {"probe": False, "embed": False}
        self._model: EmbeddingModel | None = None
        self.stop = _core.StopFlag()
        self.errors: dict[str, str] = {}

    # -- starting ---------------------------------------------------------------------------
    def kick(self, model: EmbeddingModel | None = None) -> None:
        """Make sure pending rows get probed and, with a model, indexed rows get embedded."""
        with self._lock:
            if self.stop.is_set():
                self.stop = _core.StopFlag()
            if model is not None:
                self._model = model
            self._want("probe", self._run_probe)
            if self._model is not None:
                self._want("embed", self._run_embed)
            self._lock.notify_all()

    def _want(self, phase: str, target: Callable[[], None]) -> None:
        self._wanted[phase] = True
        if not self._active[phase]:
            self._active[phase] = True
            t = threading.Thread(
                target=target, name=f"fastindex-{phase}-{self.dataset_id}", daemon=True
            )
            self._threads[phase] = t
            t.start()

    def _next_round(self, phase: str) -> bool:
        """For a worker: True to run another round, else the worker is marked inactive."""
        with self._lock:
            if self._wanted[phase] and not self.stop.is_set():
                self._wanted[phase] = False
                return True
            self._active[phase] = False
            self._lock.notify_all()
            return False

    def _retire(self, phase: str) -> None:
        with self._lock:
            self._active[phase] = False
            self._lock.notify_all()

    # -- state ------------------------------------------------------------------------------
    @property
    def probing(self) -> bool:
        return self._active["probe"]

    @property
    def running(self) -> bool:
        return self._active["probe"] or self._active["embed"]

    def wait_change(self, timeout: float) -> None:
        """Sleep until a worker commits a batch or stops, or `timeout` passes."""
        with self._lock:
            self._lock.wait(timeout)

    def _notify(self) -> None:
        with self._lock:
            self._lock.notify_all()

    def cancel(self) -> None:
        self.stop.set()
        for t in list(self._threads.values()):
            if t is not threading.current_thread():
                t.join()

    # -- phase 2 ----------------------------------------------------------------------------
    def _run_probe(self) -> None:
        store: _core.Store | None = None
        try:
            store = _core.Store(self.db)
            while self._next_round("probe"):
                if not self._hold_lease(store, "probe"):
                    continue  # stopped: the next round says so
                try:
                    store.probe_pending(
                        self.dataset_id, stop=self.stop, lease=(_owner(), LEASE_TTL)
                    )
                finally:
                    self._notify()
        except CancelledError:
            self._retire("probe")
        except FastIndexError as e:  # the store failed: say so in the progress
            self._failed(store, "probe", str(e))
        finally:
            self._let_go(store, "probe")

    def _failed(self, store: _core.Store | None, phase: str, msg: str) -> None:
        """A phase stopped on an error: record why, on the job and in the store's progress."""
        self.errors[phase] = msg
        if store is not None:
            with contextlib.suppress(FastIndexError):
                store.set_phase_error(self.dataset_id, phase, msg)
        log.error("%s of dataset %s stopped: %s", phase, self.dataset_id, msg)
        self._retire(phase)

    def _let_go(self, store: _core.Store | None, phase: str) -> None:
        if store is not None:
            with contextlib.suppress(FastIndexError):
                store.release_lease(self.dataset_id, phase, _owner())
        self._notify()

    def _hold_lease(self, store: _core.Store, phase: str) -> bool:
        """Take the phase's lease, waiting while another live process holds it."""
        while not store.acquire_lease(self.dataset_id, phase, _owner(), LEASE_TTL):
            if self.stop.is_set():
                return False
            time.sleep(min(1.0, LEASE_TTL / 4))
        return True

    # -- phase 3 ----------------------------------------------------------------------------
    def _run_embed(self) -> None:
        store: _core.Store | None = None
        try:
            from .embed import embed_pending  # torch is imported only when embeddings are wanted

            store = opened = _core.Store(self.db)
            if not self._hold_lease(store, "embed"):
                self._retire("embed")
                return
            # Rows a crashed run had claimed go back to the queue.
            store.release_claims(self.dataset_id)
            while self._next_round("embed"):
                model = self._model
                assert model is not None
                store.set_phase_error(self.dataset_id, "embed", None)
                self.errors.pop("embed", None)
                embed_pending(
                    store,
                    self.dataset_id,
                    model,
                    stop=self.stop,
                    producer_alive=lambda: self.probing,
                    on_batch=lambda: self._heartbeat(opened, "embed"),
                )
        except CancelledError:
            if store is not None:
                with contextlib.suppress(FastIndexError):
                    store.release_claims(self.dataset_id)
            self._retire("embed")
        except Exception as e:  # a phase that stops says why, on the job and in the progress
            msg = str(e) if isinstance(e, FastIndexError) else f"{type(e).__name__}: {e}"
            if store is not None:
                with contextlib.suppress(FastIndexError):
                    store.release_claims(self.dataset_id)
            self._failed(store, "embed", msg)
        finally:
            self._let_go(store, "embed")

    def _heartbeat(self, store: _core.Store, phase: str) -> None:
        """Called after each committed batch: renew the lease, wake the waiters."""
        store.acquire_lease(self.dataset_id, phase, _owner(), LEASE_TTL)
        self._notify()


_pipelines: dict[tuple[str, int], Pipeline] = {}
_pipelines_lock = threading.Lock()


@atexit.register
def _stop_all() -> None:
    """Stop background work before the interpreter goes away: a worker must not be inside the
    store when Python finalises. Rows keep their status; the next `load` resumes them."""
    with _pipelines_lock:
        pipelines = list(_pipelines.values())
    for p in pipelines:
        p.cancel()


def pipeline_for(db: str, dataset_id: int) -> Pipeline:
    """The one pipeline of a dataset in this process."""
    key = (os.path.realpath(db), dataset_id)
    with _pipelines_lock:
        p = _pipelines.get(key)
        if p is None:
            p = _pipelines[key] = Pipeline(db, dataset_id)
        return p


class Job:
    """The work started by one `add_*` call. Its counts cover the rows that call added."""

    def __init__(
        self, store: _core.Store, pipeline: Pipeline, job_id: int, summary: dict[str, Any]
    ):
        self._store = store
        self._pipeline = pipeline
        self.id = job_id
        self.dataset_id = pipeline.dataset_id
        #: What phase 1 (or the COCO ingest) found: `added`, `existing`, `errors`/`missing`...
        self.summary = summary

    def __repr__(self) -> str:
        return f"<Job {self.id} of dataset {self.dataset_id}: {self.progress()}>"

    def progress(self) -> dict[str, Any]:
        """Counts by status of this job's rows, as `Dataset.get_loading_progress` gives them."""
        return progress_of(self._store, self.dataset_id, self.id, self._pipeline)

    @property
    def done(self) -> bool:
        return bool(self.progress()["status"] == "complete")

    @property
    def error(self) -> str | None:
        """Why a phase stopped, if one did."""
        return self.progress().get("error")

    def wait(self, timeout: float | None = None) -> bool:
        """Block until this job's rows are through every phase that can run.

        Returns True when complete, False when `timeout` (seconds) passed first or a phase
        stopped on an error with rows left (see `error`). Releases the GIL while it sleeps.
        """
        return wait_for(lambda: self.progress(), self._pipeline, timeout)

    def cancel(self) -> None:
        """Stop the dataset's background work (rows stay in the store; nothing is lost)."""
        self._pipeline.cancel()


def progress_of(
    store: _core.Store, dataset_id: int, job_id: int | None, pipeline: Pipeline | None
) -> dict[str, Any]:
    p: dict[str, Any] = store.progress(dataset_id, job_id)
    errors: dict[str, str] = dict(p["errors"])
    if pipeline is not None:
        for phase, msg in pipeline.errors.items():
            errors.setdefault(phase, msg)
    p["errors"] = errors
    p["error"] = "; ".join(f"{k}: {v}" for k, v in sorted(errors.items())) or None
    return p


def wait_for(read: Callable[[], dict[str, Any]], pipeline: Pipeline, timeout: float | None) -> bool:
    """Poll `read` until complete. True only when complete with no phase stopped on an error
    (a phase that stopped leaves rows behind: `complete`, since nothing more will run, but not
    done)."""

    def finished(p: dict[str, Any]) -> bool | None:
        if p["status"] == "complete":
            return not p.get("error")
        return None

    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        done = finished(read())
        if done is not None:
            return done
        if not pipeline.running:
            # One more read: the last batch may have landed as the threads ended.
            return bool(finished(read()))
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            return False
        pipeline.wait_change(min(0.25, left) if left is not None else 0.25)
