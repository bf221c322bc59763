"""`embed_pending`, phase 3: claim -> read -> decode (CPU threads + GPU thread) -> forward ->
write, with bounded queues between the stages."""

from __future__ import annotations

import collections
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import _core, leases
from ..errors import CancelledError
from ..objects import is_object_uri
from .decode_cpu import _decode_into
from .decode_gpu import _TorchJpegDecoder
from .read import _JPEG_MAGIC, _DecodeError, _reason, _try_read, _try_read_objects

if TYPE_CHECKING:
    from .model import EmbeddingModel

log = logging.getLogger("fastindex")


@dataclass(eq=False)
class _Batch:
    """Claimed rows on their way through the pipeline."""

    ids: list[int]
    paths: list[str]
    orientation: list[int]
    data: list[bytes | bytearray | None]
    cpu: np.ndarray  # (n, h, w, 3) uint8: what the CPU decoders made
    gpu: list[Any]  # per row: a (h, w, 3) uint8 tensor on the device from the GPU decoder
    ok: np.ndarray  # per row: decoded
    failed: list[tuple[int, str]] = field(default_factory=list)
    remaining: int = 0


@dataclass
class _Stats:
    """What one `embed_pending` run did (for benchmarks and logs)."""

    embedded: int = 0
    failed: int = 0
    batches: int = 0
    decoded_cpu: int = 0
    decoded_gpu: int = 0
    decoded_pil: int = 0


class _Abort(Exception):
    pass


class _Pipeline:
    """Claim -> read -> decode (CPU threads + GPU thread) -> forward -> write, with bounded
    queues between the stages so that all of them run at once on different batches."""

    #: Batches claimed and not yet through the forward pass (bounds memory and claims).
    IN_FLIGHT = 4
    #: JPEGs the GPU decoder takes at once.
    GPU_CHUNK = 64

    def __init__(
        self,
        store: _core.Store,
        dataset_id: int,
        model: EmbeddingModel,
        model_id: int,
        stop: _core.StopFlag,
        producer_alive: Callable[[], bool],
        on_batch: Callable[[], None],
        stats: _Stats,
        gpu_decode: bool | None,
        owner: str | None,
    ) -> None:
        self.store = store
        self.dataset_id = dataset_id
        self.model = model
        self.model_id = model_id
        self.stop = stop
        self.producer_alive = producer_alive
        self.on_batch = on_batch
        self.owner = owner
        self.stats = stats
        self.pre = model.preprocess
        self.n = model.batch_size
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        self.workers = model.workers or max(1, cpus or 1)
        use_gpu = model.device.type == "cuda" if gpu_decode is None else gpu_decode
        self.gpu = _TorchJpegDecoder(model.device, self.pre) if use_gpu else None
        self.abort = threading.Event()
        self.error: BaseException | None = None
        self.slots = threading.Semaphore(self.IN_FLIGHT)
        self.q_forward: queue.Queue[_Batch | None] = queue.Queue()
        self.q_write: queue.Queue[tuple[_Batch, np.ndarray] | None] = queue.Queue(maxsize=2)
        # Decode work, shared by the CPU threads and the GPU thread: whoever is free takes
        # the next item, so the split follows their speeds.
        self.work_lock = threading.Condition()
        self.jpegs: collections.deque[tuple[_Batch, int]] = collections.deque()
        self.others: collections.deque[tuple[_Batch, int]] = collections.deque()
        self.feeding = True
        self.threads: list[threading.Thread] = []
        self.buffers: queue.SimpleQueue[np.ndarray] = queue.SimpleQueue()

    # -- driver ---------------------------------------------------------------------------
    def run(self) -> None:
        def start(name: str, target: Callable[[], None]) -> threading.Thread:
            t = threading.Thread(
                target=self._guard(target), name=f"fastindex-embed-{name}", daemon=True
            )
            t.start()
            self.threads.append(t)
            return t

        start("feed", self._feed)
        for i in range(self.workers):
            start(f"decode-{i}", self._decode_cpu)
        if self.gpu is not None:
            start("decode-gpu", self._decode_gpu)
        writer = start("write", self._write)
        try:
            self._forward_loop()
            self._put(self.q_write, None)
            while writer.is_alive():
                writer.join(0.1)
                self._raise_if_failed()
            self._raise_if_failed()
        except _Abort:
            self._raise_if_failed()  # the error or the stop behind the abort
            raise
        finally:
            # Done or failed: the decode threads wait for work that will not come.
            self.abort.set()
            with self.work_lock:
                self.work_lock.notify_all()
            for t in self.threads:
                t.join()

    def _guard(self, target: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                target()
            except _Abort:
                pass
            except BaseException as e:
                if self.error is None:
                    self.error = e
                self.abort.set()
                with self.work_lock:
                    self.work_lock.notify_all()

        return run

    def _raise_if_failed(self) -> None:
        if self.error is not None:
            raise self.error
        if self.stop.is_set():
            raise CancelledError("embedding cancelled")

    def _check(self) -> None:
        self._raise_if_failed()
        if self.abort.is_set():
            raise _Abort

    def _put(self, q: queue.Queue[Any], item: Any) -> None:
        while True:
            # A stop too: the writer ends on one, and would never drain a full queue.
            if self.abort.is_set() or self.stop.is_set():
                raise _Abort
            try:
                q.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def _acquire_slot(self) -> None:
        while not self.slots.acquire(timeout=0.1):
            if self.abort.is_set():
                raise _Abort

    # -- claim and read -------------------------------------------------------------------
    def _feed(self) -> None:
        after = 0
        with ThreadPoolExecutor(
            min(32, 4 * self.workers), thread_name_prefix="fastindex-read"
        ) as io_pool:
            while True:
                if self.abort.is_set() or self.stop.is_set():
                    raise _Abort
                self._acquire_slot()
                # Ask whether phase 2 runs *before* claiming: if it had stopped, every row
                # it made is visible to this claim.
                alive = self.producer_alive()
                rows = leases.claim(self.store, self.dataset_id, self.n, after, self.owner)
                if not rows:
                    self.slots.release()
                    if alive:
                        time.sleep(0.05)
                    elif after:
                        after = 0  # a last sweep for rows behind the cursor
                    else:
                        break
                    continue
                after = rows[-1][0]
                self._submit(rows, io_pool)
        # Wait until every batch is decoded, then tell the forward loop it has them all.
        for _ in range(self.IN_FLIGHT):
            self._acquire_slot()
        self._put(self.q_forward, None)

    def _submit(self, rows: list[tuple[int, Any]], io_pool: ThreadPoolExecutor) -> None:
        ids = [int(r[0]) for r in rows]
        meta = {int(s["id"]): s for s in self.store.samples_by_id(ids)}
        # An object's URI from its root and key (the claim's joined path is a file path: a
        # `pathlib.Path` would fold `s3://` into `s3:/`). A Ray worker's batch carries the
        # joined path as a str already, and its rows have no root.
        paths = [
            os.path.join(m["root"], m["path"])
            if (m := meta.get(i)) is not None and "root" in m
            else os.fspath(r[1])
            for i, r in zip(ids, rows, strict=True)
        ]
        orientation = [int(meta.get(i, {}).get("orientation") or 1) for i in ids]
        n = len(ids)
        b = _Batch(
            ids, paths, orientation, [None] * n, self._buffer(), [None] * n, np.zeros(n, bool)
        )
        for i, (data, err) in zip(range(n), self._read(paths, io_pool), strict=True):
            if err is not None:
                b.failed.append((ids[i], err))
            b.data[i] = data
        todo = [i for i in range(n) if b.data[i] is not None]
        b.remaining = len(todo)
        if not todo:
            self._decoded(b)
            return
        with self.work_lock:
            for i in todo:
                d = b.data[i]
                assert d is not None
                (self.jpegs if bytes(d[:3]) == _JPEG_MAGIC else self.others).append((b, i))
            self.work_lock.notify_all()

    @staticmethod
    def _read(
        paths: list[str], io_pool: ThreadPoolExecutor
    ) -> list[tuple[bytes | bytearray | None, str | None]]:
        """Files on the I/O threads; objects in one call that keeps many requests in flight.
        The feed thread reads ahead: while the model runs a batch, the next `IN_FLIGHT - 1`
        batches are claimed, read and decoded."""
        out: list[tuple[bytes | bytearray | None, str | None]] = [(None, None)] * len(paths)
        objs = [i for i, p in enumerate(paths) if is_object_uri(p)]
        files = [i for i, p in enumerate(paths) if not is_object_uri(p)]
        if files:
            read = io_pool.map(_try_read, [paths[i] for i in files])
            for i, file in zip(files, read, strict=True):
                out[i] = file
        if objs:
            for i, obj in zip(objs, _try_read_objects([paths[i] for i in objs]), strict=True):
                out[i] = obj
        return out

    def _buffer(self) -> np.ndarray:
        try:
            return self.buffers.get_nowait()
        except queue.Empty:
            th, tw = self.pre.size
            if self.gpu is not None and self.gpu.device.type == "cuda":
                import torch

                # Pinned, so that the upload of CPU-decoded images overlaps.
                return torch.empty((self.n, th, tw, 3), dtype=torch.uint8).pin_memory().numpy()
            return np.empty((self.n, th, tw, 3), np.uint8)

    # -- decode ---------------------------------------------------------------------------
    def _take(self, gpu: bool) -> list[tuple[_Batch, int]]:
        with self.work_lock:
            while True:
                if self.abort.is_set():
                    raise _Abort
                if gpu:
                    if self.jpegs:
                        # Leave the CPU threads a share of the tail of the queue.
                        k = min(self.GPU_CHUNK, max(1, len(self.jpegs) - self.workers))
                        return [self.jpegs.popleft() for _ in range(k)]
                elif self.others:
                    return [self.others.popleft()]
                elif self.jpegs:
                    return [self.jpegs.popleft()]
                self.work_lock.wait(0.1)

    def _decode_cpu(self) -> None:
        while True:
            for b, i in self._take(gpu=False):
                self._decode_one(b, i)

    def _decode_one(self, b: _Batch, i: int) -> None:
        data = b.data[i]
        assert data is not None
        how = "failed"
        try:
            how = _decode_into(data, b.orientation[i], self.pre, b.cpu[i])
            b.ok[i] = True
        except _DecodeError as e:
            b.failed.append((b.ids[i], str(e)))
        except Exception as e:  # a decoder bug must not stop the batch
            b.failed.append((b.ids[i], _reason(e)))
        self._done(b, how)

    def _decode_gpu(self) -> None:
        gpu = self.gpu
        assert gpu is not None
        while True:
            chunk = self._take(gpu=True)
            items = [(b.data[i], b.orientation[i]) for b, i in chunk]
            try:
                out, errs = gpu.decode(items)  # type: ignore[arg-type]
            except Exception as e:  # the device failed on this chunk: let the CPU do it
                log.debug("GPU decode failed, the CPU takes over: %s", e)
                out, errs = [None] * len(chunk), [None] * len(chunk)
            retry: list[tuple[_Batch, int]] = []
            for (b, i), t, err in zip(chunk, out, errs, strict=True):
                if t is not None:
                    b.gpu[i] = t
                    b.ok[i] = True
                    self._done(b, "gpu")
                else:
                    # nvJPEG refuses some files libjpeg-turbo takes (and vice versa).
                    del err
                    retry.append((b, i))
            if retry:
                with self.work_lock:
                    self.others.extendleft(reversed(retry))
                    self.work_lock.notify_all()

    def _done(self, b: _Batch, how: str) -> None:
        with self.work_lock:
            if how != "failed":
                key = {"gpu": "decoded_gpu", "pil": "decoded_pil"}.get(how, "decoded_cpu")
                setattr(self.stats, key, getattr(self.stats, key) + 1)
            b.remaining -= 1
            last = b.remaining == 0
        if last:
            self._decoded(b)

    def _decoded(self, b: _Batch) -> None:
        b.data = [None] * len(b.ids)  # the bytes are no longer needed
        self.q_forward.put(b)

    # -- forward --------------------------------------------------------------------------
    def _forward_loop(self) -> None:
        import torch

        model = self.model
        while True:
            self._check()
            try:
                b = self.q_forward.get(timeout=0.1)
            except queue.Empty:
                continue
            if b is None:
                return
            ok = np.flatnonzero(b.ok)
            if len(ok) == 0:
                vecs = np.empty((0, model.dim), np.float32)
            else:
                cpu_idx = [int(i) for i in ok if b.gpu[i] is None]
                gpu_idx = [int(i) for i in ok if b.gpu[i] is not None]
                device = model.device
                with torch.inference_mode():
                    parts = []
                    if cpu_idx:
                        src = b.cpu[: len(b.ids)] if len(cpu_idx) == len(b.ids) else b.cpu[cpu_idx]
                        parts.append(torch.from_numpy(src).to(device, non_blocking=True))
                    if gpu_idx:
                        parts.append(torch.stack([b.gpu[i] for i in gpu_idx]))
                    x = parts[0] if len(parts) == 1 else torch.cat(parts)
                    order = cpu_idx + gpu_idx
                    vecs = model._forward(x)
                if order != sorted(order):
                    vecs = vecs[np.argsort(order)]  # back to row order
            b.gpu = []
            self.buffers.put(b.cpu)
            self.slots.release()
            self._put(self.q_write, (b, vecs))

    # -- write ----------------------------------------------------------------------------
    def _write(self) -> None:
        while True:
            try:
                item = self.q_write.get(timeout=0.1)
            except queue.Empty:
                if self.abort.is_set():
                    raise _Abort from None
                continue
            if item is None:
                return
            b, vecs = item
            if self.stop.is_set() or self.abort.is_set():
                # Stopped (cancelled, or the lease was lost): a batch in flight is not
                # committed; its rows are given back, or taken over by the lease's new holder.
                raise _Abort
            ids = [b.ids[i] for i in np.flatnonzero(b.ok)]
            blob = np.ascontiguousarray(vecs, dtype="<f2").tobytes()
            leases.finish(
                self.store, self.dataset_id, self.model_id, ids, blob, b.failed, self.owner
            )
            self.stats.embedded += len(ids)
            self.stats.failed += len(b.failed)
            self.stats.batches += 1
            self.on_batch()


def embed_pending(
    store: _core.Store,
    dataset_id: int,
    model: EmbeddingModel,
    *,
    stop: _core.StopFlag,
    producer_alive: Callable[[], bool],
    on_batch: Callable[[], None],
    gpu_decode: bool | None = None,
    stats: dict[str, int] | None = None,
    owner: str | None = None,
) -> int:
    """Phase 3: embed the dataset's `indexed` samples until none is left. Blocks.

    Loads `model` first. Then claims rows (`indexed` -> `embedding`), reads the files with a
    pool of threads (objects under an `s3://` root through the Rust reader, whole, 64
    requests in flight, with the GIL released; the next batches are read while the model
    runs one), decodes them on CPU threads (and, on CUDA, with nvJPEG in a thread of
    its own, the two sharing the work as they go), runs the model on full batches and writes
    the vectors (`embedding` -> `ready`); a file that cannot be read or decoded becomes
    `failed` with its reason. While `producer_alive()` (phase 2 runs), an empty queue is
    polled every 50 ms. `on_batch()` follows each committed batch.

    Args:
        gpu_decode: decode JPEGs with torchvision too (default: on CUDA devices).
        stats: filled with counts (`embedded`, `failed`, `batches`, `decoded_cpu`,
            `decoded_gpu`, `decoded_pil`) for benchmarks.
        owner: the holder of the dataset's embed lease (`leases.owner()`): claims and
            commits are then refused (`LeaseLostError`) once another process holds it.

    Returns:
        The number of samples embedded.

    Raises:
        EmbeddingError: the model cannot be loaded (nothing was claimed).
        CancelledError: `stop` was set; rows claimed and not written stay `embedding`, for
            the caller to release.
        LeaseLostError: another process holds the embed lease now (nothing more written).
    """
    model.load()
    if stop.is_set():  # stopped (or the lease lost) while the weights loaded
        raise CancelledError("embedding cancelled")
    model_id = store.register_model(model.key_name, model.key_pretrained, model.dim)
    st = _Stats()
    try:
        _Pipeline(
            store,
            dataset_id,
            model,
            int(model_id),
            stop,
            producer_alive,
            on_batch,
            st,
            gpu_decode,
            owner,
        ).run()
    except _Abort:  # pragma: no cover - an abort always carries an error or a stop
        raise CancelledError("embedding stopped") from None
    finally:
        if stats is not None:
            stats.update(vars(st))
    return st.embedded
