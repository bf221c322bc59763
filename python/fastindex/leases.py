"""Leases: which process runs a phase of a dataset, and the thread that keeps them.

A lease row in the store names the process that runs a phase (probe or embed) of a dataset.
Its holder renews it every `LEASE_TTL / 3` seconds from one keeper thread per process,
whatever its workers are doing (loading a model, a long batch on the CPU), so another
process takes it over only when the holder stopped renewing it (a crash, a frozen host). A
holder that finds its lease gone stops that phase's work at once; its commits are checked
against the lease in the store too, so nothing it still had in flight is written.

The store calls that carry the lease are wrapped below, in one place.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from . import _core
from .errors import FastIndexError

log = logging.getLogger("fastindex")


def _ttl_from_env() -> float:
    try:
        ttl = float(os.environ.get("FASTINDEX_LEASE_TTL", "15"))
    except ValueError:
        return 15.0
    return ttl if ttl > 0 else 15.0


#: A lease not renewed for this long (seconds) is taken over by another process. The
#: environment variable `FASTINDEX_LEASE_TTL` changes it (tests use a short one).
LEASE_TTL = _ttl_from_env()

_NONCE = uuid.uuid4().hex[:8]


def owner() -> str:
    """This process's name on leases, `host:pid:nonce`: the store takes over at once a lease
    whose process on this host is gone (computed per call: a forked child is another owner)."""
    return f"{socket.gethostname()}:{os.getpid()}:{_NONCE}"


# -- the store calls that carry the lease ----------------------------------------------------
# Each is checked in the store inside its write transaction: once another process holds the
# phase's lease, it writes nothing and raises `LeaseLostError`. `who=None` (a caller that
# holds no lease, as the benchmarks) means no check.


def renew(store: _core.Store, dataset_id: int, phase: str, who: str, ttl: float) -> bool:
    """Renew a lease `who` holds; False when it is no longer theirs (never takes one over)."""
    return store.renew_lease(dataset_id, phase, who, ttl)


def probe(store: _core.Store, dataset_id: int, stop: _core.StopFlag, who: str, ttl: float) -> int:
    """Phase 2 under the lease."""
    return store.probe_pending(dataset_id, stop=stop, lease=(who, ttl))


def claim(
    store: _core.Store, dataset_id: int, limit: int, after: int, who: str | None
) -> list[tuple[int, Any]]:
    """Rows for phase 3, claimed only while `who` holds the embed lease."""
    return store.claim_for_embedding(dataset_id, limit, after, owner=who)


def finish(
    store: _core.Store,
    dataset_id: int,
    model_id: int,
    ids: list[int],
    vectors: bytes,
    failed: list[tuple[int, str]],
    who: str | None,
) -> None:
    """Commit phase-3 results, only while `who` holds the embed lease."""
    store.finish_embeddings(dataset_id, model_id, ids, vectors, failed, owner=who)


# -- the keeper -----------------------------------------------------------------------------


@dataclass(eq=False)
class Held:
    """A lease this process holds, and what to do when it finds it lost."""

    db: str
    dataset_id: int
    phase: str
    on_lost: Callable[[], None]
    lost: bool = field(default=False)


class Keeper:
    """One thread per process that renews every lease the process holds."""

    def __init__(self) -> None:
        self._lock = threading.Condition()
        self._held: set[Held] = set()
        self._thread: threading.Thread | None = None

    @contextlib.contextmanager
    def holding(
        self, db: str, dataset_id: int, phase: str, on_lost: Callable[[], None]
    ) -> Iterator[Held]:
        """Keep a lease the caller has just acquired renewed for the duration of the block."""
        h = Held(db, dataset_id, phase, on_lost)
        with self._lock:
            self._held.add(h)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="fastindex-leases", daemon=True
                )
                self._thread.start()
        try:
            yield h
        finally:
            with self._lock:
                self._held.discard(h)

    def _run(self) -> None:
        stores: dict[str, _core.Store] = {}
        while True:
            with self._lock:
                self._lock.wait(LEASE_TTL / 3)
                held = list(self._held)
            # A connection per store with leases held now; the others are closed.
            dbs = {h.db for h in held}
            stores = {db: s for db, s in stores.items() if db in dbs}
            for h in held:
                lost = False
                # Under the lock: a block that ends waits for a renewal in flight, so a lease
                # released at its end is never written back.
                with self._lock:
                    if h not in self._held:
                        continue
                    try:
                        store = stores.get(h.db)
                        if store is None:
                            store = stores[h.db] = _core.Store(h.db)
                        lost = not renew(store, h.dataset_id, h.phase, owner(), LEASE_TTL)
                    except FastIndexError as e:
                        # The store cannot be written (disk full...): try again next time. If
                        # that lasts past the TTL another process may take over; the
                        # lease-checked commits then refuse this process's results.
                        log.warning(
                            "cannot renew the %s lease of dataset %s: %s", h.phase, h.dataset_id, e
                        )
                    if lost:
                        h.lost = True
                        self._held.discard(h)
                if lost:
                    log.info(
                        "the %s lease of dataset %s was taken over by another process",
                        h.phase,
                        h.dataset_id,
                    )
                    h.on_lost()


_keeper = Keeper()


def keeper() -> Keeper:
    return _keeper


def _after_fork_in_child() -> None:
    # The keeper's thread does not exist in a forked child, and the leases are the parent's.
    global _keeper
    _keeper = Keeper()


os.register_at_fork(after_in_child=_after_fork_in_child)
