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

_OWNER = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"


class Pipeline:
    """The background threads of one dataset in this process."""

    def __init__(self, db: str, dataset_id: int) -> None:
        self.db = db
        self.dataset_id = dataset_id
        self._lock = threading.Condition()
        self._probe: threading.Thread | None = None
        self._embed: threading.Thread | None = None
        self._probe_wanted = False
        self._model: EmbeddingModel | None = None
        self.stop = _core.StopFlag()
        self.errors: dict[str, str] = {}

    # -- starting ---------------------------------------------------------------------------
    def kick(self, model: EmbeddingModel | None = None) -> None:
        """Make sure pending rows get probed and, with a model, indexed rows get embedded."""
        with self._lock:
            if self.stop.is_set():
                self.stop = _core.StopFlag()
            self._probe_wanted = True
            if self._probe is None or not self._probe.is_alive():
                self._probe = self._thread("probe", self._run_probe)
            if model is not None:
                self._model = model
            if self._model is not None and (self._embed is None or not self._embed.is_alive()):
                self._embed = self._thread("embed", self._run_embed)
            self._lock.notify_all()

    def _thread(self, phase: str, target: Callable[[], None]) -> threading.Thread:
        t = threading.Thread(target=target, name=f"fastindex-{phase}-{self.dataset_id}", daemon=True)
        t.start()
        return t

    # -- state ------------------------------------------------------------------------------
    @property
    def probing(self) -> bool:
        t = self._probe
        return t is not None and t.is_alive()

    @property
    def running(self) -> bool:
        return any(t is not None and t.is_alive() for t in (self._probe, self._embed))

    def wait_change(self, timeout: float) -> None:
        """Sleep until a worker commits a batch or stops, or `timeout` passes."""
        with self._lock:
            self._lock.wait(timeout)

    def _notify(self) -> None:
        with self._lock:
            self._lock.notify_all()

    def cancel(self) -> None:
        self.stop.set()
        for t in (self._probe, self._embed):
            if t is not None and t is not threading.current_thread():
                t.join()

    # -- phase 2 ----------------------------------------------------------------------------
    def _run_probe(self) -> None:
        store = _core.Store(self.db)
        try:
            while True:
                with self._lock:
                    if not self._probe_wanted:
                        return
                    self._probe_wanted = False
                if not self._hold_lease(store, "probe"):
                    return
                try:
                    store.probe_pending(
                        self.dataset_id, stop=self.stop, lease=(_OWNER, LEASE_TTL)
                    )
                finally:
                    self._notify()
        except CancelledError:
            pass
        except FastIndexError as e:  # the store failed: say so in the progress
            self.errors["probe"] = str(e)
            with contextlib.suppress(FastIndexError):
                store.set_phase_error(self.dataset_id, "probe", str(e))
            log.error("probe of dataset %s stopped: %s", self.dataset_id, e)
        finally:
            with contextlib.suppress(FastIndexError):
                store.release_lease(self.dataset_id, "probe", _OWNER)
            self._notify()

    def _hold_lease(self, store: _core.Store, phase: str) -> bool:
        """Take the phase's lease, waiting while another live process holds it."""
        while not store.acquire_lease(self.dataset_id, phase, _OWNER, LEASE_TTL):
            if self.stop.is_set():
                return False
            time.sleep(min(1.0, LEASE_TTL / 4))
        return True

    # -- phase 3 ----------------------------------------------------------------------------
    def _run_embed(self) -> None:
        from .embed import embed_pending  # torch is imported only when embeddings are wanted

        store = _core.Store(self.db)
        model = self._model
        assert model is not None
        try:
            if not self._hold_lease(store, "embed"):
                return
            # Rows a crashed run had claimed go back to the queue.
            store.release_claims(self.dataset_id)
            store.set_phase_error(self.dataset_id, "embed", None)
            self.errors.pop("embed", None)
            embed_pending(
                store,
                self.dataset_id,
                model,
                stop=self.stop,
                producer_alive=lambda: self.probing,
                on_batch=lambda: self._heartbeat(store, "embed"),
            )
        except CancelledError:
            with contextlib.suppress(FastIndexError):
                store.release_claims(self.dataset_id)
        except Exception as e:  # a phase that stops says why, on the job and in the progress
            msg = f"{type(e).__name__}: {e}" if not isinstance(e, FastIndexError) else str(e)
            self.errors["embed"] = msg
            with contextlib.suppress(FastIndexError):
                store.release_claims(self.dataset_id)
                store.set_phase_error(self.dataset_id, "embed", msg)
            log.error("embedding of dataset %s stopped: %s", self.dataset_id, msg)
        finally:
            with contextlib.suppress(FastIndexError):
                store.release_lease(self.dataset_id, "embed", _OWNER)
            self._notify()

    def _heartbeat(self, store: _core.Store, phase: str) -> None:
        """Called after each committed batch: renew the lease, wake the waiters."""
        store.acquire_lease(self.dataset_id, phase, _OWNER, LEASE_TTL)
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

    def __init__(self, store: _core.Store, pipeline: Pipeline, job_id: int, summary: dict[str, Any]):
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


def progress_of(store: _core.Store, dataset_id: int, job_id: int | None, pipeline: Pipeline | None) -> dict[str, Any]:
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
