"""The worker side of `RayEngine`: one Ray actor per GPU (or per CPU slot) that embeds the
batches the coordinator hands it with the single-machine phase-3 pipeline (`embed_pending`),
and returns the vectors. It never opens the store: the coordinator is its only writer.

Imported only by `ray_engine` once a run starts (this module imports ray).

Test hook (documented, read only here, in the actor): the environment variable
`FASTINDEX_RAY_FAULT` makes a worker misbehave on purpose, since no real image crashes or
hangs a decoder reliably: `crash:TEXT` ends the worker process (`os._exit`) when a file name of
its batch contains TEXT, `hang:TEXT` sleeps forever then, and `slow:TEXT` sleeps half a
second then; several are separated by commas. The engine forwards `FASTINDEX_*` variables of the
coordinator to its workers.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any

from . import _core
from .errors import PathNotFoundError

#: The variable read by the test hook above.
FAULT_ENV = "FASTINDEX_RAY_FAULT"


class _BatchSource:
    """What `embed_pending` reads and writes, served from one batch in memory: the same
    pipeline as on one machine (claim in id order, read, decode, forward, write), with the
    claims taken from the batch and the results kept for the coordinator."""

    def __init__(self, ids: list[int], paths: list[str], orientation: list[int]) -> None:
        self._rows = list(zip(ids, paths, strict=True))
        self._orientation = dict(zip(ids, orientation, strict=True))
        self._next = 0
        self.vectors: dict[int, bytes] = {}
        self.failed: list[tuple[int, str]] = []
        self.dim = 0

    def register_model(self, name: str, pretrained: str | None, dim: int) -> int:
        self.dim = int(dim)
        return 0

    def claim_for_embedding(
        self, dataset_id: int, limit: int, after: int = 0, *, owner: str | None = None
    ) -> list[tuple[int, str]]:
        # Each row once, in the batch's (id) order; the pipeline's final sweep gets nothing.
        rows = self._rows[self._next : self._next + limit]
        self._next += len(rows)
        return rows

    def samples_by_id(self, ids: list[int]) -> list[dict[str, Any]]:
        return [{"id": i, "orientation": self._orientation.get(i, 1)} for i in ids]

    def finish_embeddings(
        self,
        dataset_id: int,
        model_id: int,
        ids: list[int],
        vectors: bytes,
        failed: list[tuple[int, str]] = (),  # type: ignore[assignment]
        *,
        owner: str | None = None,
    ) -> None:
        row = self.dim * 2
        for k, i in enumerate(ids):
            self.vectors[int(i)] = vectors[k * row : (k + 1) * row]
        self.failed.extend((int(i), str(r)) for i, r in failed)


def _faults() -> list[tuple[str, str]]:
    out = []
    for item in os.environ.get(FAULT_ENV, "").split(","):
        kind, _, arg = item.partition(":")
        if kind in ("crash", "hang", "slow") and arg:
            out.append((kind, arg))
    return out


def _fair_share(ray: Any, gpu: bool) -> int:
    """Decode threads for this worker: the CPUs Ray gave a CPU worker; a GPU worker shares its
    node's CPUs with the node's other GPU workers (one decode thread per CPU of the whole node
    in each would oversubscribe it as many times as it has GPUs)."""
    ctx = ray.get_runtime_context()
    if not gpu:
        return max(1, int(ctx.get_assigned_resources().get("CPU", 1)))
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpus = 1
    for n in ray.nodes():
        if n.get("NodeID") == ctx.get_node_id():
            gpus = max(1, int(n.get("Resources", {}).get("GPU", 1)))
    return max(1, (cpus or 1) // gpus)


class EmbedWorker:
    """A Ray actor (the engine wraps it with `ray.remote`): builds the dataset's model once,
    then embeds batches. Its constructor loads the weights, so `info` answers once the worker
    can embed."""

    def __init__(self, spec: dict[str, Any]) -> None:
        import ray

        from .embed import EmbeddingModel

        self.gpus = [str(g) for g in ray.get_gpu_ids()]
        spec = dict(spec)
        # The device is the one Ray gave this worker, whatever the coordinator's spec said.
        spec["device"] = "cuda" if self.gpus else "cpu"
        if spec.get("workers") is None:
            spec["workers"] = _fair_share(ray, bool(self.gpus))
        self.model = EmbeddingModel.from_spec(spec)
        self.model.load()
        self.node = str(ray.util.get_node_ip_address())  # type: ignore[no-untyped-call]
        self.host = socket.gethostname()

    def info(self, roots: list[str]) -> dict[str, Any]:
        """Where this worker runs; first checks that it can read the dataset's folders.

        Raises:
            PathNotFoundError: a folder is missing or unreadable on this node (named).
        """
        for r in roots:
            if not os.path.isdir(r) or not os.access(r, os.R_OK | os.X_OK):
                raise PathNotFoundError(
                    f"worker on node {self.node} ({self.host}) cannot read {r}: mount the "
                    "dataset's folders at the same path on every node"
                )
        return {"node": self.node, "host": self.host, "gpus": self.gpus, "pid": os.getpid()}

    def embed(
        self, batch: int, ids: list[int], paths: list[str], orientation: list[int]
    ) -> tuple[int, list[int], bytes, list[tuple[int, str]], float]:
        """Embed one batch. Returns `(batch, ids embedded, float16 vectors in that order,
        [(id, reason)] of the rows that failed, seconds)`."""
        from .embed.pipeline import embed_pending

        t0 = time.perf_counter()
        self._misbehave(paths)
        src = _BatchSource(ids, paths, orientation)
        embed_pending(
            src,  # type: ignore[arg-type]
            0,
            self.model,
            stop=_core.StopFlag(),
            producer_alive=lambda: False,
            on_batch=lambda: None,
        )
        done = sorted(src.vectors)
        blob = b"".join(src.vectors[i] for i in done)
        return batch, done, blob, src.failed, time.perf_counter() - t0

    @staticmethod
    def _misbehave(paths: list[str]) -> None:
        for kind, arg in _faults():
            if not any(arg in os.path.basename(p) for p in paths):
                continue
            if kind == "slow":
                time.sleep(0.5)
            elif kind == "crash":
                os._exit(17)
            else:
                while True:
                    time.sleep(3600)
