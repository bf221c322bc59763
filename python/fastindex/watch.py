"""Following a folder live: `Dataset.watch` and the `Watcher` it returns.

The core watches the folder (inotify on Linux, through the Rust `notify` crate) on threads of
its own: events are gathered into batches (applied after 50 ms without a new event, at least
every 250 ms under a stream of them, or every 5,000 paths) and each batch is one short
transaction of the sync rules (a new file `pending`, a changed one back to `pending`, a
deleted one `missing`). When events may have been lost (the kernel's queue or the watcher's
own overflowed) and when it starts, the watcher syncs the whole folder instead. After each
batch that changed rows, a thread here kicks the dataset's background work, so new files go
through phases 2 and 3.
"""

from __future__ import annotations

import atexit
import os
import threading
import weakref
from types import TracebackType
from typing import TYPE_CHECKING, Any

from . import _core
from .errors import InvalidArgumentError

if TYPE_CHECKING:
    from .dataset import Dataset
    from .embed import EmbeddingModel

#: Paths queued between the watch thread and the batch thread before events are dropped (and
#: a full sync catches up): the environment variable `FASTINDEX_WATCH_QUEUE` sets another.
DEFAULT_QUEUE = 65_536

_live: weakref.WeakSet[Watcher] = weakref.WeakSet()


def _queue_size(queue_size: int | None) -> int:
    if queue_size is None:
        env = os.environ.get("FASTINDEX_WATCH_QUEUE")
        if not env:
            return DEFAULT_QUEUE
        try:
            queue_size = int(env)
        except ValueError:
            raise InvalidArgumentError(
                f"FASTINDEX_WATCH_QUEUE must be a positive integer, got {env!r}"
            ) from None
    if isinstance(queue_size, bool) or not isinstance(queue_size, int) or queue_size < 1:
        raise InvalidArgumentError(f"queue_size must be a positive integer, got {queue_size!r}")
    return queue_size


class Watcher:
    """Follows folders of a dataset until `stop()` (or the end of a `with` block, or of the
    process). Made by `Dataset.watch`."""

    def __init__(
        self,
        ds: Dataset,
        roots: list[str],
        *,
        queue_size: int | None = None,
        include_hidden: bool = False,
        follow_links: bool = False,
    ) -> None:
        self.dataset = ds
        self.roots = list(roots)
        self._core = _core.Watcher(
            ds.db,
            ds.id,
            self.roots,
            queue=_queue_size(queue_size),
            include_hidden=include_hidden,
            follow_links=follow_links,
        )
        self._stopping = threading.Event()
        self._kicker = threading.Thread(
            target=self._follow, name=f"fastindex-watch-{ds.id}", daemon=True
        )
        self._kicker.start()
        _live.add(self)

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<Watcher of {self.dataset.name!r} on {', '.join(self.roots)}: {state}>"

    def _follow(self) -> None:
        """Kick the dataset's phases 2 and 3 after each batch that changed rows."""
        seen = 0
        pipeline = self.dataset._pipeline
        while not self._stopping.is_set():
            generation = self._core.wait_change(seen, 0.5)
            if generation != seen:
                seen = generation
                pipeline.kick()
            if not self._core.running:
                break

    @property
    def running(self) -> bool:
        """True until `stop()`."""
        return bool(self._core.running)

    def stats(self) -> dict[str, Any]:
        """The watcher's counters: `events` (paths reported), `batches` (store transactions
        of the batches: one per folder and batch), `paths` (paths they synced), `full_syncs`,
        `changed` (rows they changed), `dropped` and `overflows` (events lost, each followed
        by a full sync), `errors` and `last_error`, `missing_roots` (watched folders that are
        gone now: their rows are `missing`, and they are watched again once back),
        `last_sync` (Unix time of the last batch or sync applied), `running`."""
        stats: dict[str, Any] = self._core.stats()
        return stats

    @property
    def error(self) -> str | None:
        """The last error the watcher met (it goes on: a failed batch is retried as a full
        sync a second later)."""
        err: str | None = self.stats()["last_error"]
        return err

    def stop(self, timeout: float | None = 10.0) -> None:
        """Stop following: returns once the watcher's threads have ended (a batch being
        applied is finished first). Background work already started goes on. Idempotent."""
        self._stopping.set()
        self._core.stop()
        if self._kicker is not threading.current_thread():
            self._kicker.join(timeout)
        _live.discard(self)

    def __enter__(self) -> Watcher:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def watch_folder(
    ds: Dataset,
    path: str,
    *,
    embed: EmbeddingModel | bool | None,
    include_hidden: bool,
    follow_links: bool,
    queue_size: int | None,
) -> Watcher:
    """`Dataset.watch`: add the folder if it is new to the dataset, then follow it."""
    from .dataset import _resolve_embed
    from .jobs import ModelSpec

    real = os.path.realpath(path)
    if not os.path.isdir(real) or not _known(ds, real):
        # Phase 1 first (it raises for a folder that is missing or not a folder); the
        # watcher's first full sync then catches what changed since.
        ds.add_images_from_path(
            path, embed=embed, include_hidden=include_hidden, follow_links=follow_links
        )
    else:
        model = _resolve_embed(embed)
        if isinstance(model, ModelSpec):
            ds._set_default_model(model)
        elif model is not None:
            ds.set_embedding_model(model)
        if model is None:
            ds.resume()
        else:
            ds._pipeline.kick(model)
    return Watcher(
        ds,
        [real],
        queue_size=_queue_size(queue_size),
        include_hidden=include_hidden,
        follow_links=follow_links,
    )


def _known(ds: Dataset, real: str) -> bool:
    """Whether `real` is a folder of the dataset or lies inside one."""
    for root in ds._store.roots(ds.id):
        r = os.fsdecode(root)
        if real == r or real.startswith(r.rstrip(os.sep) + os.sep):
            return True
    return False


def stop_all() -> None:
    """Stop every watcher of this process (at exit: before the background work stops)."""
    for w in list(_live):
        w.stop(1.0)


atexit.register(stop_all)


def _after_fork_in_child() -> None:
    # The parent's watcher threads do not exist in a forked child.
    _live.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)
