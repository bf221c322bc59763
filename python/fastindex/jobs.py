"""Background work: one pipeline per dataset and process, running phase 2 and phase 3.

The store is the queue. A pipeline's threads take rows by status (`pending` for the probe,
`indexed` for the embedder), so a restart resumes where the last run stopped. A lease in the
store keeps two processes from working on the same dataset's phase at once (see `leases`): a
phase waits while another live process holds it, takes over a lease whose holder stopped
renewing it (a crash; rows the crashed embedder had claimed go back to `indexed`), and stops
at once, committing nothing more, when it finds its own lease taken over.

Each phase of a pipeline is a small state machine, under one lock:

    idle --kick--> running --(no more rounds wanted)--> idle
                   running --cancel--> stopping --(thread ends)--> idle, or running again
                                                                   when kicked meanwhile

A *run* is one thread with its own stop flag. `kick` asks for another round; a run takes
the request before each round, and only a run that has ended (its lease released, its claims
given back) leaves the phase idle, in the same step in which it looks for a kick that came
too late for it: then it starts the next run itself. So no kick is lost, and two runs of a
phase never overlap in one process.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from . import _core, leases
from .errors import CancelledError, FastIndexError, LeaseLostError

if TYPE_CHECKING:
    from .embed import EmbeddingModel
    from .ray_engine import RayEngine

log = logging.getLogger("fastindex")

#: Kept for callers that read it here; see `leases.LEASE_TTL`.
LEASE_TTL = leases.LEASE_TTL
PHASES = ("probe", "embed")


@dataclass(eq=False)
class ModelSpec:
    """An embedding model that is not built yet: building it imports torch and open_clip
    (seconds), so the embed thread does it, never the caller of `kick`."""

    spec: dict[str, Any]
    #: What an error building it says first.
    what: str = "cannot resume embeddings"


def _same_model(have: EmbeddingModel | ModelSpec | None, new: EmbeddingModel | ModelSpec) -> bool:
    """A spec of the model already here: keep the one that may be loaded already."""
    if have is None or not isinstance(new, ModelSpec):
        return False
    spec = have.spec if isinstance(have, ModelSpec) else have.spec()
    return bool(spec == new.spec)


@dataclass(eq=False)
class _Run:
    """One thread of one phase, with its own stop flag."""

    phase: str
    stop: _core.StopFlag = field(default_factory=_core.StopFlag)
    stopped: threading.Event = field(default_factory=threading.Event)
    ended: threading.Event = field(default_factory=threading.Event)
    #: Another process took the phase's lease over: not an error of the dataset.
    lost: bool = False
    #: `cancel` stopped it: a lost lease is then not waited for again.
    cancelled: bool = False
    thread: threading.Thread | None = None

    def halt(self) -> None:
        self.stop.set()
        self.stopped.set()


class Pipeline:
    """The background threads of one dataset in this process."""

    def __init__(self, db: str, dataset_id: int) -> None:
        self.db = db
        self.dataset_id = dataset_id
        self._lock = threading.Condition()
        # Under `_lock`: the live run of each phase (None: idle) and whether another round
        # is asked for.
        self._runs: dict[str, _Run | None] = dict.fromkeys(PHASES)
        self._wanted = dict.fromkeys(PHASES, False)
        self._model: EmbeddingModel | ModelSpec | None = None
        #: Where phase 3 runs: None for this process, or a cluster (`RayEngine`).
        self.engine: RayEngine | None = _default_engine
        #: Why a phase stopped, in this process (also written to the store when it can be).
        self.errors: dict[str, str] = {}

    # -- the state machine ------------------------------------------------------------------
    def kick(
        self, model: EmbeddingModel | ModelSpec | None = None, *, engine: RayEngine | None = None
    ) -> None:
        """Make sure pending rows get probed and, with a model, indexed rows get embedded.
        Returns at once (a `ModelSpec` is built in the embed thread). With `engine`, phase 3
        runs there from its next run on."""
        with self._lock:
            if engine is not None:
                self.engine = engine
            if model is not None and not _same_model(self._model, model):
                self._model = model
            self._want("probe")
            if self._model is not None:
                self._want("embed")
            self._lock.notify_all()

    def _want(self, phase: str) -> None:  # under _lock
        self._wanted[phase] = True
        if self._runs[phase] is None:
            self._start(phase)

    def _start(self, phase: str) -> None:  # under _lock
        run = _Run(phase)
        target = self._probe_run if phase == "probe" else self._embed_run
        run.thread = threading.Thread(
            target=self._work,
            args=(run, target),
            name=f"fastindex-{phase}-{self.dataset_id}",
            daemon=True,
        )
        self._runs[phase] = run
        run.thread.start()

    def _work(self, run: _Run, target: Callable[[_Run], None]) -> None:
        try:
            target(run)
        except BaseException:  # pragma: no cover - the targets catch what they expect
            log.exception("%s of dataset %s failed", run.phase, self.dataset_id)
        finally:
            with self._lock:
                self._runs[run.phase] = None
                if run.lost and not run.cancelled:
                    # Wait for the lease again: the other process finishes the work, and if
                    # it dies this one takes over after the lease's TTL.
                    self._wanted[run.phase] = True
                if self._wanted[run.phase]:
                    self._start(run.phase)  # a kick that came while this run ended
                self._lock.notify_all()
            run.ended.set()

    def _next_round(self, run: _Run) -> bool:
        """For a run: True to go through the phase's rows once more."""
        with self._lock:
            if run.stop.is_set() or not self._wanted[run.phase]:
                return False
            self._wanted[run.phase] = False
            return True

    def cancel(self, timeout: float | None = None) -> bool:
        """Stop the runs now live and forget the kicks they had not taken; a kick from now on
        starts the phase again once its run has ended. Waits for the runs to end, at most
        `timeout` seconds; returns whether they did. A run stuck in one long step (a forward
        pass) ends after it, committing nothing."""
        with self._lock:
            runs = [r for r in self._runs.values() if r is not None]
            for phase in PHASES:
                self._wanted[phase] = False
            for r in runs:
                r.cancelled = True
                r.halt()
            self._lock.notify_all()
        deadline = None if timeout is None else time.monotonic() + timeout
        for r in runs:
            if r.thread is threading.current_thread():
                continue
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not r.ended.wait(left):
                return False
        return True

    # -- state ------------------------------------------------------------------------------
    @property
    def probing(self) -> bool:
        return self._runs["probe"] is not None

    @property
    def running(self) -> bool:
        return any(r is not None for r in self._runs.values())

    def is_running(self, phase: str) -> bool:
        return self._runs.get(phase) is not None

    def wait_change(self, timeout: float) -> None:
        """Sleep until a worker commits a batch or stops, or `timeout` passes."""
        with self._lock:
            self._lock.wait(timeout)

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until no run is live here (True), or `timeout` passes (False)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while self.running:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._lock.wait(0.25 if left is None else min(0.25, left))
        return True

    def _notify(self) -> None:
        with self._lock:
            self._lock.notify_all()

    # -- leases -----------------------------------------------------------------------------
    def _acquire(self, store: _core.Store, run: _Run) -> bool:
        """Take the phase's lease, waiting while another live process holds it. False if the
        run was stopped first."""
        while not store.acquire_lease(self.dataset_id, run.phase, leases.owner(), LEASE_TTL):
            if run.stopped.wait(min(1.0, LEASE_TTL / 4)):
                return False
        return True

    def _hold(self, run: _Run) -> contextlib.AbstractContextManager[leases.Held]:
        def lost() -> None:
            run.lost = True
            run.halt()
            self._notify()

        return leases.keeper().holding(self.db, self.dataset_id, run.phase, lost)

    def _let_go(self, store: _core.Store | None, run: _Run) -> None:
        if store is not None and not run.lost:
            with contextlib.suppress(FastIndexError):
                store.release_lease(self.dataset_id, run.phase, leases.owner())
        self._notify()

    # -- errors -----------------------------------------------------------------------------
    def _clear_error(self, store: _core.Store, phase: str) -> None:
        """A phase that runs again no longer stands stopped on its last error."""
        self.errors.pop(phase, None)
        with contextlib.suppress(FastIndexError):  # a full disk: cleared when it succeeds
            store.set_phase_error(self.dataset_id, phase, None)

    def _failed(self, store: _core.Store | None, phase: str, msg: str) -> None:
        """A phase stopped on an error: record why, here and in the store's progress. The
        kicks it had not taken yet are dropped (the phase just tried and failed): it stands
        stopped until the next kick, instead of retrying in a loop."""
        with self._lock:
            self._wanted[phase] = False
        self.errors[phase] = msg
        if store is not None:
            with contextlib.suppress(FastIndexError):
                store.set_phase_error(self.dataset_id, phase, msg)
        log.error("%s of dataset %s stopped: %s", phase, self.dataset_id, msg)

    # -- phase 2 ----------------------------------------------------------------------------
    def _probe_run(self, run: _Run) -> None:
        store: _core.Store | None = None
        try:
            store = _core.Store(self.db)
            if not self._acquire(store, run):
                return
            with self._hold(run):
                while self._next_round(run):
                    self._clear_error(store, "probe")
                    try:
                        leases.probe(store, self.dataset_id, run.stop, leases.owner(), LEASE_TTL)
                    finally:
                        self._notify()
                    self._clear_error(store, "probe")
        except (CancelledError, LeaseLostError) as e:
            run.lost = run.lost or isinstance(e, LeaseLostError)
        except FastIndexError as e:  # the store failed: say so in the progress
            self._failed(store, "probe", str(e))
        finally:
            self._let_go(store, run)

    # -- phase 3 ----------------------------------------------------------------------------
    def _embed_run(self, run: _Run) -> None:
        store: _core.Store | None = None
        holding = False
        try:
            store = _core.Store(self.db)
            if not self._acquire(store, run):
                return
            with self._hold(run):
                holding = True
                # Rows this process claimed before (a cancelled run) go back to the queue;
                # taking the lease over from a dead process already gave back its claims.
                store.release_claims(self.dataset_id, owner=leases.owner())
                while self._next_round(run):
                    self._clear_error(store, "embed")
                    model = self._built_model()
                    engine = self.engine
                    if engine is not None:
                        # The cluster's workers build and load the model; here only its
                        # spec and dimension are needed (the weights are never loaded).
                        engine.embed_pending(
                            store,
                            self.dataset_id,
                            model,
                            stop=run.stop,
                            producer_alive=lambda: self.probing,
                            on_batch=self._notify,
                            owner=leases.owner(),
                        )
                        continue
                    from .embed.pipeline import embed_pending

                    embed_pending(
                        store,
                        self.dataset_id,
                        model,
                        stop=run.stop,
                        producer_alive=lambda: self.probing,
                        on_batch=self._notify,
                        owner=leases.owner(),
                    )
        except (CancelledError, LeaseLostError) as e:
            run.lost = run.lost or isinstance(e, LeaseLostError)
            if holding and not run.lost:
                self._give_back(store)
        except Exception as e:  # a phase that stops says why, on the job and in the progress
            msg = str(e) if isinstance(e, FastIndexError) else f"{type(e).__name__}: {e}"
            if run.lost:
                return  # stopped because the lease was lost: the other process goes on
            if holding:
                self._give_back(store)
            self._failed(store, "embed", msg)
        finally:
            self._let_go(store, run)

    def _give_back(self, store: _core.Store | None) -> None:
        """Put the rows this process claimed back to `indexed` (it holds the lease, so the
        dataset's claims are its own)."""
        if store is not None:
            with contextlib.suppress(FastIndexError):
                store.release_claims(self.dataset_id, owner=leases.owner())

    def _built_model(self) -> EmbeddingModel:
        """The model to embed with; a `ModelSpec` is built here, in the embed thread."""
        with self._lock:
            src = self._model
        assert src is not None
        if not isinstance(src, ModelSpec):
            return src
        from .embed import EmbeddingModel

        try:
            model = EmbeddingModel.from_spec(src.spec)
        except (ImportError, FastIndexError) as e:
            raise _CannotBuild(f"{src.what}: {e}") from e
        with self._lock:
            if self._model is src:
                self._model = model
        return model


class _CannotBuild(FastIndexError):
    """The dataset's embedding model cannot be built in this process."""


_pipelines: dict[tuple[str, int], Pipeline] = {}
#: The engine of the pipelines made from now on in this process (`use_engine`).
_default_engine: RayEngine | None = None


def use_engine(engine: RayEngine | None) -> None:
    """Run phase 3 of every dataset this process opens from now on on `engine` (the
    command line's `--engine ray`: set before a dataset is opened, so a resumed phase 3 runs
    on the cluster from its start)."""
    global _default_engine
    _default_engine = engine
    with _pipelines_lock:
        for p in _pipelines.values():
            p.engine = engine


_pipelines_lock = threading.Lock()


#: How long the interpreter's exit waits for a worker to leave the store.
EXIT_TIMEOUT = 30.0


@atexit.register
def _stop_all() -> None:
    """Stop background work before the interpreter goes away: a worker must not be inside the
    store when Python finalises. Rows keep their status; the next `load` resumes them."""
    stop_all(EXIT_TIMEOUT)


def stop_all(timeout: float | None = None) -> bool:
    """Cancel every pipeline of this process; True when all their runs ended in `timeout`."""
    with _pipelines_lock:
        pipelines = list(_pipelines.values())
    deadline = None if timeout is None else time.monotonic() + timeout
    ok = True
    for p in pipelines:
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        ok = p.cancel(left) and ok
    return ok


def _after_fork_in_child() -> None:
    # The parent's threads do not exist in a forked child: its pipelines start afresh.
    global _pipelines_lock
    _pipelines.clear()
    _pipelines_lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)


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

    def cancel(self, timeout: float | None = None) -> bool:
        """Stop the dataset's background work (rows stay in the store; nothing is lost).
        Waits at most `timeout` seconds; returns whether every worker has stopped."""
        return self._pipeline.cancel(timeout)


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
    if pipeline is not None and pipeline.engine is not None:
        p["cluster"] = pipeline.engine.progress()
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
