"""`RayEngine`: phase 3 on a Ray cluster, every row embedded exactly once whatever dies.

The process that opened the store is the coordinator and the store's only writer. It hands
out *batches* of `indexed` rows (`Store.claim_batch`: status `embedding`, a batch id that is
never reused, counters moved in the same transaction, checked against its embed lease) to one
Ray actor per GPU (`num_gpus=1`; on a cluster without GPUs, `cpu_actors` actors), at most
`max_in_flight_per_actor` batches each so that the next batch is already there when one ends.
Each worker builds the dataset's model from its spec and runs the single-machine pipeline on
its batch (`ray_actor.EmbedWorker`). A returned batch is committed in one transaction for the
rows still out under its id (`Store.commit_batch`): a duplicate or late result changes nothing.

Failures:
- a worker that dies (or is restarted by Ray) gives back its batches: the one it was running
  counts an attempt against its rows, the ones queued behind it do not (`released` counts the
  rows given back);
- a batch running far longer than the median (`lease_timeout`) gets its worker killed (Ray
  restarts it) and is given back the same way;
- rows that were with one dying worker go out again in small batches, those that were with
  two alone; a row with `max_attempts` deaths becomes `failed` ("worker died");
- when the coordinator dies, Ray ends its actors (they belong to its driver); the next run
  takes the embed lease, which gives back the rows still `embedding`, and goes on.

Ray is imported only when a run starts: without an engine fastindex never imports it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from . import _core, extras
from .errors import CancelledError, FastIndexError, InvalidArgumentError, LeaseLostError

if TYPE_CHECKING:
    from .embed import EmbeddingModel

log = logging.getLogger("fastindex")

#: Deaths of its worker after which a row is `failed` ("worker died").
MAX_ATTEMPTS = 3
#: A batch is killed past this many times the median time of a batch of its size...
TIMEOUT_FACTOR = 10.0
#: ... and never before this many seconds.
MIN_TIMEOUT_S = 60.0


class EngineError(FastIndexError):
    """The cluster cannot run phase 3 (no connection, a worker that cannot start or cannot
    read the dataset's folders); the message names the node."""


@dataclass(eq=False)
class _Out:
    """A batch handed to a worker."""

    batch: int
    ids: list[int]
    worker: _Worker
    ref: Any
    sent: float
    #: When the worker started on it (it runs its batches one after the other).
    started: float | None = None
    #: Queued behind a batch whose worker died: its rows are not to blame.
    behind_death: bool = False


@dataclass(eq=False)
class _Worker:
    """One actor and what the progress shows of it."""

    index: int
    actor: Any
    ping: Any  # the pending `info` call while starting, else None
    state: str = "starting"  # starting | running | idle | restarting
    node: str = ""
    host: str = ""
    gpus: list[str] = field(default_factory=list)
    pid: int = 0
    rows: int = 0
    busy_s: float = 0.0
    restarts: int = 0
    #: Was ready once: if its next ping fails (gone for good), a fresh actor replaces it; a
    #: worker that never became ready stops the run with its reason instead.
    proven: bool = False
    out: deque[_Out] = field(default_factory=deque)
    killed: bool = False
    recent: deque[tuple[float, int]] = field(default_factory=deque)

    def row(self) -> dict[str, Any]:
        now = time.monotonic()
        while self.recent and now - self.recent[0][0] > 30.0:
            self.recent.popleft()
        span = (now - self.recent[0][0]) if self.recent else 0.0
        rate = sum(n for _, n in self.recent) / span if span > 1.0 else None
        return {
            "worker": self.index,
            "node": self.node or None,
            "host": self.host or None,
            "gpu": ",".join(self.gpus) or None,
            "state": self.state,
            "rows": self.rows,
            "img_per_s": None if rate is None else round(rate, 1),
            "restarts": self.restarts,
        }


class RayEngine:
    """Run phase 3 on a Ray cluster; phases 1 and 2 stay in this process.

    Pass it as `engine=` to `Dataset.add_images_from_path`, `add_samples_from_coco` or
    `embed`. The folders must be at the same path on every node (shared storage).

    Args:
        address: the cluster (`ray.init(address=...)`): `"auto"` for the one `ray start`
            runs on this machine, `"ray://host:10001"`, or `None` to start a local one.
        lease_rows: rows per lease (about 0.25 s of an H200 at ViT-B-32 for the default),
            rounded up to a multiple of the model's batch size.
        max_in_flight_per_actor: leases an actor holds at once (the next one waits there).
        lease_timeout: seconds after which a lease still running is killed with its actor;
            `None`: `TIMEOUT_FACTOR` times the median time of a lease of its size, at least
            `MIN_TIMEOUT_S`.
        cpu_actors: actors on a cluster without GPUs (each takes `cpus_per_actor` CPUs).
        cpus_per_actor: CPUs each actor reserves (its decode threads run on them).
        max_attempts: deaths of its worker after which a row is `failed`.
        poll_s: how often the cluster's GPUs are counted (new ones get workers).
        runtime_env: passed to the actors (Ray's `runtime_env`); `FASTINDEX_*` variables of
            this process are added to its `env_vars`.

    Raises:
        MissingExtraError: ray is not installed (`pip install 'fastindex[ray]'`).
    """

    def __init__(
        self,
        address: str | None = "auto",
        *,
        lease_rows: int = 8192,
        max_in_flight_per_actor: int = 2,
        lease_timeout: float | None = None,
        cpu_actors: int = 1,
        cpus_per_actor: float = 1.0,
        max_attempts: int = MAX_ATTEMPTS,
        poll_s: float = 2.0,
        runtime_env: dict[str, Any] | None = None,
    ) -> None:
        extras.require("ray")
        for name, v in (
            ("lease_rows", lease_rows),
            ("max_in_flight_per_actor", max_in_flight_per_actor),
            ("cpu_actors", cpu_actors),
            ("max_attempts", max_attempts),
        ):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise InvalidArgumentError(f"{name} must be a positive integer, got {v!r}")
        if lease_timeout is not None and not lease_timeout > 0:
            raise InvalidArgumentError(f"lease_timeout must be positive, got {lease_timeout!r}")
        self.address = address
        self.lease_rows = lease_rows
        self.max_in_flight = max_in_flight_per_actor
        self.lease_timeout = lease_timeout
        self.cpu_actors = cpu_actors
        self.cpus_per_actor = cpus_per_actor
        self.max_attempts = max_attempts
        self.poll_s = poll_s
        self.runtime_env = dict(runtime_env or {})
        self._lock = threading.Lock()
        self._workers: list[_Worker] = []
        self._spec: dict[str, Any] | None = None
        self._next_index = 0
        #: Rows given back after a worker died or was killed (their batches' rows still out).
        self.released = 0
        #: Rows that became `failed` ("worker died").
        self.gave_up = 0
        #: Seconds from the run's start to its first committed batch (None before).
        self.first_result_s: float | None = None
        self._per_row: deque[float] = deque(maxlen=200)

    def __repr__(self) -> str:
        return f"RayEngine(address={self.address!r}, lease_rows={self.lease_rows})"

    # -- what progress shows --------------------------------------------------------------
    def workers(self) -> list[dict[str, Any]]:
        """One row per worker: `worker`, `node`, `host`, `gpu`, `state`, `rows` (committed),
        `img_per_s` (over the last 30 s), `restarts`."""
        with self._lock:
            return [w.row() for w in self._workers]

    def progress(self) -> dict[str, Any]:
        """`{"engine": "ray", "workers": [...], "released": n, "worker_died": n}`."""
        return {
            "engine": "ray",
            "workers": self.workers(),
            "released": self.released,
            "worker_died": self.gave_up,
        }

    # -- the run --------------------------------------------------------------------------
    def embed_pending(
        self,
        store: _core.Store,
        dataset_id: int,
        model: EmbeddingModel,
        *,
        stop: _core.StopFlag,
        producer_alive: Callable[[], bool],
        on_batch: Callable[[], None],
        owner: str,
    ) -> int:
        """Phase 3 of one dataset on the cluster until no `indexed` row is left. Blocks; the
        same contract as `embed.embed_pending` (`CancelledError` on `stop`, `LeaseLostError`
        once another process holds the embed lease). Returns the rows embedded."""
        return _Run(self, store, dataset_id, model, stop, producer_alive, on_batch, owner).run()

    def close(self) -> None:
        """End the workers (a later run starts new ones)."""
        with self._lock:
            workers, self._workers = self._workers, []
        if workers:
            import ray

            for w in workers:
                with contextlib.suppress(Exception):
                    ray.kill(w.actor, no_restart=True)

    # -- pieces the run uses ----------------------------------------------------------------
    def _connect(self) -> Any:
        import ray

        if not ray.is_initialized():
            try:
                ray.init(
                    address=self.address,
                    ignore_reinit_error=True,
                    log_to_driver=False,
                    logging_level=logging.WARNING,
                )
            except Exception as e:  # ConnectionError, ValueError...: say which cluster
                raise EngineError(
                    f"cannot connect to the Ray cluster at {self.address}: {e}"
                ) from e
        return ray

    def _actor_env(self) -> dict[str, Any]:
        env = dict(self.runtime_env)
        vars_ = {k: v for k, v in os.environ.items() if k.startswith("FASTINDEX_")}
        vars_.update(env.get("env_vars") or {})
        if vars_:
            env["env_vars"] = vars_
        return env

    def _wanted(self, ray: Any) -> tuple[int, bool]:
        """How many workers the cluster has room for now, and whether they are GPU ones."""
        gpus = int(ray.cluster_resources().get("GPU", 0))
        return (gpus, True) if gpus > 0 else (self.cpu_actors, False)

    def _spawn(self, ray: Any, spec: dict[str, Any], gpu: bool, roots: list[str]) -> _Worker:
        from .ray_actor import EmbedWorker

        opts: dict[str, Any] = {
            "max_restarts": -1,
            "max_task_retries": 0,
            "num_gpus": 1 if gpu else 0,
            "num_cpus": self.cpus_per_actor,
        }
        env = self._actor_env()
        if env:
            opts["runtime_env"] = env
        actor = ray.remote(EmbedWorker).options(**opts).remote(spec)
        w = _Worker(self._next_index, actor, actor.info.remote(roots))
        self._next_index += 1
        return w

    def _timeout(self, rows: int) -> float:
        if self.lease_timeout is not None:
            return self.lease_timeout
        if not self._per_row:
            return 30 * 60.0  # no batch finished yet: the first ones load and warm up
        return max(MIN_TIMEOUT_S, TIMEOUT_FACTOR * statistics.median(self._per_row) * rows)


_ACTOR_GONE: tuple[type[BaseException], ...] = ()


def _actor_gone() -> tuple[type[BaseException], ...]:
    global _ACTOR_GONE
    if not _ACTOR_GONE:
        import ray.exceptions as rx

        names = ("RayActorError", "ActorUnavailableError", "WorkerCrashedError")
        _ACTOR_GONE = tuple(getattr(rx, n) for n in names if hasattr(rx, n))
    return _ACTOR_GONE


def _cause(e: BaseException) -> str:
    """The message of the exception a worker raised (Ray wraps it)."""
    inner = getattr(e, "cause", None)
    if isinstance(inner, BaseException):
        return str(inner)
    return str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__


class _Run:
    """One `embed_pending` of the engine: claim, dispatch, wait, commit, recover."""

    def __init__(
        self,
        engine: RayEngine,
        store: _core.Store,
        dataset_id: int,
        model: EmbeddingModel,
        stop: _core.StopFlag,
        producer_alive: Callable[[], bool],
        on_batch: Callable[[], None],
        owner: str,
    ) -> None:
        self.e = engine
        self.store = store
        self.dataset_id = dataset_id
        self.model = model
        self.stop = stop
        self.producer_alive = producer_alive
        self.on_batch = on_batch
        self.owner = owner
        self.out: dict[Any, _Out] = {}
        self.after = 0
        self.embedded = 0
        self.t0 = time.monotonic()
        self.polled = 0.0
        #: Nothing was left to claim: no claim (a scan from the first row) until rows come back.
        self.drained = False

    def run(self) -> int:
        e = self.e
        ray = e._connect()
        self.ray = ray
        self.model_id = int(
            self.store.register_model(
                self.model.key_name, self.model.key_pretrained, self.model.dim
            )
        )
        spec = self.model.spec()
        if e._spec != spec:
            e.close()
            e._spec = spec
        bs = max(1, int(self.model.batch_size))
        self.rows = -(-e.lease_rows // bs) * bs  # whole forward batches: the same as one machine
        self.roots = [os.fsdecode(r) for r in self.store.roots(self.dataset_id)]
        e.first_result_s = None
        # Workers kept from an earlier run check this dataset's folders before their first
        # lease, as new ones do. A check still pending from that run asked about its folders:
        # its answer (maybe an error about them) is dropped, never read by this run.
        for w in e._workers:
            w.state = "starting"
            w.ping = w.actor.info.remote(self.roots)
        lost = False
        try:
            while True:
                if self.stop.is_set():
                    raise CancelledError("embedding cancelled")
                self._poll()
                if self._dispatch():
                    return self.embedded
                self._wait()
                self._check_timeouts()
        except LeaseLostError:
            lost = True
            raise
        except CancelledError:
            # The workers stop too: what they still compute would be refused.
            e.close()
            raise
        except Exception:
            log.debug("phase 3 on the cluster stopped", exc_info=True)
            raise
        finally:
            if not lost:
                self._give_back_all()

    # -- workers ----------------------------------------------------------------------------
    def _poll(self) -> None:
        """Start workers for the room the cluster has (GPUs that joined get theirs)."""
        now = time.monotonic()
        if self.e._workers and now - self.polled < self.e.poll_s:
            return
        self.polled = now
        want, gpu = self.e._wanted(self.ray)
        spec = self.e._spec
        assert spec is not None
        with self.e._lock:
            while len(self.e._workers) < want:
                self.e._workers.append(self.e._spawn(self.ray, spec, gpu, self.roots))

    def _live(self) -> list[_Worker]:
        return [w for w in self.e._workers if w.state in ("running", "idle")]

    def _replace(self, w: _Worker) -> None:
        spec = self.e._spec
        assert spec is not None
        with contextlib.suppress(Exception):
            self.ray.kill(w.actor, no_restart=True)
        gpu = self.e._wanted(self.ray)[1]
        with self.e._lock:
            if w not in self.e._workers:
                return
            new = self.e._spawn(self.ray, spec, gpu, self.roots)
            new.restarts = w.restarts
            new.index = w.index
            self.e._workers[self.e._workers.index(w)] = new

    def _pinged(self, w: _Worker) -> None:
        ref, w.ping = w.ping, None
        if ref is None:
            return
        try:
            info = self.ray.get(ref)
        except _actor_gone() as err:
            if w.proven:
                self._replace(w)  # gone for good: a fresh actor
                return
            raise EngineError(f"a worker could not start: {_cause(err)}") from err
        except self.ray.exceptions.RayTaskError as err:
            raise EngineError(_cause(err)) from err
        w.node, w.host, w.gpus = info["node"], info["host"], list(info["gpus"])
        w.pid = int(info["pid"])
        w.proven = True
        w.state = "idle"

    # -- dispatch -----------------------------------------------------------------------------
    def _dispatch(self) -> bool:
        """Hand out batches to workers with room. True when the dataset is done: nothing is
        out and nothing is left to claim with phase 2 stopped."""
        live = self._live()
        if self.drained:
            return not self.out
        for w in live:
            while len(w.out) < self.e.max_in_flight:
                rows = self._claim()
                if rows is None:
                    self.drained = True
                    return not self.out
                if not rows:
                    return False  # phase 2 still makes rows: ask again after the wait
                batch, got = rows
                self._send(w, batch, got)
        return not live and not self.out and self._nothing_left()

    def _nothing_left(self) -> bool:
        """With no worker up yet: whether there is anything to do at all."""
        if self.producer_alive():
            return False
        p = self.store.progress(self.dataset_id)
        return int(p["indexed"]) + int(p["embedding"]) == 0

    def _claim(self) -> tuple[int, list[tuple[int, Any, int, int]]] | list[Any] | None:
        """A batch, `[]` when none now but phase 2 runs, None when none is left."""
        while True:
            alive = self.producer_alive()  # before the claim: a stopped phase 2 made all rows
            batch, rows = self.store.claim_batch(self.dataset_id, self.rows, self.after, self.owner)
            if rows:
                if all(r[3] == 0 for r in rows):
                    self.after = int(rows[-1][0])
                return int(batch), rows
            if alive:
                return []
            if self.after:
                self.after = 0  # a last sweep for rows behind the cursor
                continue
            return None

    def _send(self, w: _Worker, batch: int, rows: list[tuple[int, Any, int, int]]) -> None:
        ids = [int(r[0]) for r in rows]
        paths = [os.fsdecode(r[1]) for r in rows]
        orient = [int(r[2]) for r in rows]
        ref = w.actor.embed.remote(batch, ids, paths, orient)
        o = _Out(batch, ids, w, ref, time.monotonic())
        if not w.out:
            o.started = o.sent
        w.out.append(o)
        w.state = "running"
        self.out[ref] = o

    # -- results ------------------------------------------------------------------------------
    def _wait(self) -> None:
        pings = {w.ping: w for w in self.e._workers if w.ping is not None}
        refs = list(self.out) + list(pings)
        if not refs:
            time.sleep(0.1)
            return
        ready, _ = self.ray.wait(refs, num_returns=len(refs), timeout=0.1, fetch_local=True)
        for ref in ready:
            if ref in pings:
                self._pinged(pings[ref])
            else:
                self._finished(self.out.pop(ref))

    def _finished(self, o: _Out) -> None:
        w = o.worker
        now = time.monotonic()
        head = bool(w.out) and w.out[0] is o
        with contextlib.suppress(ValueError):
            w.out.remove(o)
        if w.out and w.out[0].started is None:
            w.out[0].started = now
        try:
            batch, ids, blob, failed, secs = self.ray.get(o.ref)
        except _actor_gone():
            self._died(o, w, running=head and not o.behind_death)
            return
        except self.ray.exceptions.RayTaskError as err:
            # The worker is alive and raised: a bug or a model that cannot run. Not the rows'
            # fault: they go back, and the phase stops with the reason.
            self._release(o, died=False)
            raise EngineError(f"worker on node {w.node}: {_cause(err)}") from err
        n = int(
            self.store.commit_batch(
                self.dataset_id, self.model_id, batch, ids, blob, failed, owner=self.owner
            )
        )
        self.embedded += len(ids)
        if o.ids:
            self.e._per_row.append(float(secs) / len(o.ids))
        with self.e._lock:
            w.rows += n
            w.busy_s += float(secs)
            w.recent.append((now, n))
            if not w.out:
                w.state = "idle"
        if self.e.first_result_s is None:
            self.e.first_result_s = now - self.t0
        self.on_batch()

    def _died(self, o: _Out, w: _Worker, *, running: bool) -> None:
        """A batch whose worker died: the one it was running counts an attempt against its
        rows; the others were only queued there."""
        self._release(o, died=running)
        for q in w.out:
            q.behind_death = True
        if running:
            with self.e._lock:
                w.restarts += 1
                w.state = "restarting"
                w.killed = False
            if w.ping is None:
                w.ping = w.actor.info.remote(self.roots)

    def _release(self, o: _Out, *, died: bool) -> None:
        self.drained = False
        back, failed = self.store.release_batch(
            self.dataset_id,
            o.batch,
            o.ids,
            worker_died=died,
            max_attempts=self.e.max_attempts,
            owner=self.owner,
        )
        if died:
            self.e.released += int(back) + int(failed)
            self.e.gave_up += int(failed)

    def _check_timeouts(self) -> None:
        now = time.monotonic()
        for w in self._live():
            if w.killed or not w.out:
                continue
            o = w.out[0]
            if o.started is not None and now - o.started > self.e._timeout(len(o.ids)):
                log.warning(
                    "batch %s (%d rows) on worker %d ran past its timeout: killing the worker",
                    o.batch,
                    len(o.ids),
                    w.index,
                )
                w.killed = True
                self.ray.kill(w.actor, no_restart=False)

    def _give_back_all(self) -> None:
        outs, self.out = list(self.out.values()), {}
        for o in outs:
            with contextlib.suppress(FastIndexError):
                self._release(o, died=False)
        for w in self.e._workers:
            w.out.clear()
            if w.state == "running":
                w.state = "idle"
