"""Live progress for many watchers at the price of one: a `ProgressHub` reads a dataset's
progress at most `interval` apart while anyone watches it, and hands each watcher the latest
answer when it changed (or every `heartbeat` seconds while work runs). A slow watcher skips
to the latest answer instead of queueing old ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

log = logging.getLogger("fastindex.server")

#: Seconds between two reads of a watched dataset's progress (so at most 10 messages a second).
INTERVAL = 0.1
#: While work runs, a watcher hears at least this often (seconds), even if nothing changed.
HEARTBEAT = 1.0


class Subscription:
    """One watcher's mailbox: holds only the newest message."""

    def __init__(self) -> None:
        self._event = asyncio.Event()
        self._text: str | None = None
        self._final = False
        self._closed = False
        self.last_text: str | None = None
        self.last_at = 0.0

    def offer(self, text: str, *, final: bool, now: float) -> None:
        self._text, self._final = text, final
        self.last_text, self.last_at = text, now
        self._event.set()

    def close(self) -> None:
        """End the stream (the server is stopping)."""
        self._closed = True
        self._event.set()

    async def messages(self) -> AsyncIterator[str]:
        """Progress answers as JSON text; ends after the one that says `complete`."""
        while True:
            await self._event.wait()
            self._event.clear()
            if self._closed:
                return
            text, final = self._text, self._final
            if text is not None:
                yield text
            if final:
                return


class _Watch:
    def __init__(self) -> None:
        self.subs: set[Subscription] = set()
        self.task: asyncio.Task[None] | None = None


class ProgressHub:
    """Shares one progress reader per watched dataset among all its watchers."""

    def __init__(
        self,
        read: Callable[[int], dict[str, Any]],
        *,
        interval: float = INTERVAL,
        heartbeat: float = HEARTBEAT,
    ) -> None:
        self._read = read
        self.interval = interval
        self.heartbeat = heartbeat
        self._watches: dict[int, _Watch] = {}
        self.closed = False
        #: Progress reads made (for tests and the benchmark).
        self.reads = 0

    def watchers(self, dataset_id: int | None = None) -> int:
        if dataset_id is not None:
            w = self._watches.get(dataset_id)
            return len(w.subs) if w is not None else 0
        return sum(len(w.subs) for w in self._watches.values())

    @contextlib.asynccontextmanager
    async def subscribe(self, dataset_id: int) -> AsyncIterator[Subscription]:
        sub = Subscription()
        if self.closed:
            sub.close()
            yield sub
            return
        w = self._watches.get(dataset_id)
        if w is None:
            w = self._watches[dataset_id] = _Watch()
        w.subs.add(sub)
        if w.task is None:
            w.task = asyncio.get_running_loop().create_task(self._run(dataset_id, w))
        try:
            yield sub
        finally:
            w.subs.discard(sub)

    def close(self) -> None:
        """End every stream; new subscriptions end at once."""
        self.closed = True
        for w in self._watches.values():
            for sub in w.subs:
                sub.close()

    async def _run(self, dataset_id: int, w: _Watch) -> None:
        try:
            while w.subs and not self.closed:
                try:
                    p = self._read(dataset_id)  # O(1) and quick: see `GET /api/progress`
                except Exception as e:  # the dataset is gone or the store failed: say so, end
                    log.warning("progress of dataset %s: %s", dataset_id, e)
                    p = {"dataset_id": dataset_id, "status": "complete", "error": str(e)}
                self.reads += 1
                text = json.dumps(p, separators=(",", ":"))
                final = p.get("status") == "complete"
                now = time.monotonic()
                for sub in list(w.subs):
                    if final or sub.last_text != text or now - sub.last_at >= self.heartbeat:
                        sub.offer(text, final=final, now=now)
                await asyncio.sleep(self.interval)
        finally:
            # No await between the check above and this: a new watcher either saw this
            # watch's task running or finds no watch and starts a new one.
            if self._watches.get(dataset_id) is w:
                del self._watches[dataset_id]
            for sub in w.subs:  # only when closing: tell whoever is left
                sub.close()
