"""The FastAPI app: JSON API, progress streams, files of indexed samples, and the page."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Iterable, Sequence
from importlib import resources
from typing import TYPE_CHECKING, Annotated, Any, Literal

from fastapi import FastAPI, Path, Query, Request, Response, WebSocket
from fastapi.responses import HTMLResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.websockets import WebSocketDisconnect

from .. import __version__, _core
from ..errors import FastIndexError
from ..sample import Sample
from .errors import JSONResponse, install_error_handlers, refuse_websocket, status_of
from .guard import LocalOnly, SafeStaticFiles
from .media import (
    THUMB_WORKERS,
    DecodeBudget,
    OpenFileResponse,
    ThumbnailCache,
    cache_key,
    content_type,
    decode_cost,
    etag,
    open_image,
    open_sample_file,
    render_thumbnail,
)
from .roots import allowed_path, real_roots
from .state import ServerState
from .streams import ProgressHub

if TYPE_CHECKING:
    from ..embed import EmbeddingModel

#: Host names the server answers to by default. Anything else is refused, so that a web page
#: elsewhere cannot reach a server on 127.0.0.1 through DNS rebinding.
LOCAL_HOSTS: tuple[str, ...] = ("127.0.0.1", "localhost", "::1", "[::1]")
#: The largest id or offset (SQLite integers are signed 64-bit); larger ones are a 422.
MAX_INT = 2**63 - 1

Status = Literal["pending", "indexed", "embedding", "ready", "failed", "missing"]
#: An id in a URL path: a 64-bit non-negative integer, else 422 before any lookup.
Id = Annotated[int, Path(ge=0, le=MAX_INT)]

__all__ = ["LOCAL_HOSTS", "THUMB_WORKERS", "create_app"]


class NewDataset(BaseModel):
    """`POST /api/datasets`: add a folder (and optionally a COCO file) to a dataset."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200, description="created if it does not exist")
    images_path: str = Field(min_length=1, description="folder of images on the server")
    annotations_json: str | None = Field(None, description="COCO detection file for the images")
    embed: bool | None = Field(
        None, description="CLIP embeddings (phase 3); left out: when torch is installed"
    )


class Started(BaseModel):
    dataset_id: int
    task_group_id: int


def _static_dir() -> str:
    return str(resources.files("fastindex") / "static")


def create_app(
    db: str | os.PathLike[str],
    *,
    embed_model: EmbeddingModel | None = None,
    allowed_hosts: Sequence[str] | None = None,
    allowed_roots: Iterable[str | os.PathLike[str]] | None = None,
    thumbnail_cache_bytes: int = 64 << 20,
) -> FastAPI:
    """The server of one store.

    Args:
        db: the store (created if the file does not exist).
        embed_model: the model used when a `POST /api/datasets` asks for embeddings
            (default: the library's default model).
        allowed_hosts: `Host` header values to answer (default: the loopback names);
            `["*"]` answers any.
        allowed_roots: folders a `POST /api/datasets` may index (with everything below
            them); its `images_path` and `annotations_json` must lie inside one, after
            links and `..` are resolved. Default: none (every such `POST` is a 403).
        thumbnail_cache_bytes: memory kept for thumbnails.

    Raises:
        StoreError: `db` is not a fastindex store.
    """
    state = ServerState(db, embed_model=embed_model)
    hub = ProgressHub(state.progress)  # reads on the event loop, as `GET /api/progress` does
    thumbs = ThumbnailCache(thumbnail_cache_bytes)
    hosts = list(allowed_hosts) if allowed_hosts is not None else list(LOCAL_HOSTS)
    roots = real_roots(allowed_roots)
    budget: list[DecodeBudget] = []  # made on the server's event loop

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        budget[:] = [DecodeBudget()]
        app.state.decode_budget = budget[0]
        state.store()  # open the event loop thread's connection now, not on a first request
        yield
        hub.close()

    app = FastAPI(
        title="fastindex",
        version=__version__,
        summary="Browse, watch and search image datasets as they are indexed.",
        lifespan=lifespan,
        default_response_class=JSONResponse,
    )
    app.state.fastindex = state
    app.state.hub = hub
    app.state.thumbnails = thumbs
    app.state.allowed_roots = roots
    app.add_middleware(LocalOnly, allowed_hosts=hosts)
    install_error_handlers(app)

    # -- datasets ---------------------------------------------------------------------------
    @app.post("/api/datasets", status_code=202, response_model=Started, tags=["datasets"])
    def add_dataset(body: NewDataset) -> dict[str, int]:
        """Start indexing a folder (or a COCO file's images) into a dataset; answers at once.

        Phase 1 runs in the background; watch `/api/progress/{dataset_id}`. A dataset name that
        exists gets the files it does not have yet. Both paths must lie inside a folder the
        server was told to allow (`--allow-root`), else 403.
        """
        images_path = allowed_path("images_path", body.images_path, roots)
        annotations_json = (
            allowed_path("annotations_json", body.annotations_json, roots)
            if body.annotations_json is not None
            else None
        )
        task = state.start_indexing(
            name=body.name,
            images_path=images_path,
            annotations_json=annotations_json,
            embed=body.embed,
        )
        return {"dataset_id": task.dataset_id, "task_group_id": task.id}

    @app.get("/api/datasets", tags=["datasets"])
    def list_datasets() -> list[dict[str, Any]]:
        """Every dataset of the store, with its progress."""
        return state.datasets()

    @app.get("/api/datasets/{dataset_id}", tags=["datasets"])
    def get_dataset(dataset_id: Id) -> dict[str, Any]:
        return state.dataset_info(dataset_id)

    @app.get("/api/tasks/{task_group_id}", tags=["datasets"])
    def get_task(task_group_id: Id) -> dict[str, Any]:
        """What one `POST /api/datasets` started: phase 1's summary and its rows' progress."""
        return state.task(task_group_id)

    # -- progress ---------------------------------------------------------------------------
    @app.get("/api/progress/{dataset_id}", tags=["progress"])
    async def get_progress(dataset_id: Id) -> dict[str, Any]:
        """Counts by status: `{dataset_id, total, pending, indexed, embedding, ready, failed,
        missing, status: in_progress | complete, phases, rate, eta_s, rate_phase, error}` (the rates
        as `Dataset.get_loading_progress` documents them). O(1) in the number of samples."""
        # Read on the event loop itself: a few indexed point reads on this thread's own
        # connection (WAL readers never wait for the writer), far cheaper than a hop to a
        # worker thread, which on a machine busy indexing waits for a core twice.
        return state.progress(dataset_id)

    @app.websocket("/ws/progress/{dataset_id}")
    async def ws_progress(ws: WebSocket, dataset_id: Id) -> None:
        """The progress object on every change (at most ~10 a second, at least every second
        while work runs); the last message says `complete`, then the socket closes."""
        # (`LocalOnly` has refused foreign hosts and origins already.)
        try:
            await run_in_threadpool(state.require_dataset, dataset_id)
        except Exception as e:  # no such dataset (404), or the store failed (500)
            code = status_of(e) if isinstance(e, FastIndexError) else 500
            close = 4404 if code == 404 else 1011
            await refuse_websocket(
                ws.scope, ws.receive, ws.send, code, type(e).__name__, str(e), close_code=close
            )
            return
        await ws.accept()
        try:
            async with hub.subscribe(dataset_id) as sub:
                async for text in sub.messages():
                    await ws.send_text(text)
            await ws.close(code=1000 if not hub.closed else 1001)
        except (WebSocketDisconnect, RuntimeError, OSError):
            pass  # the watcher left

    @app.get("/sse/progress/{dataset_id}", tags=["progress"])
    async def sse_progress(dataset_id: Id) -> StreamingResponse:
        """The same messages as the WebSocket, as Server-Sent Events (`data: {...}`)."""
        await run_in_threadpool(state.require_dataset, dataset_id)

        async def events() -> AsyncIterator[str]:
            yield "retry: 1000\n\n"
            async with hub.subscribe(dataset_id) as sub:
                async for text in sub.messages():
                    yield f"data: {text}\n\n"

        return StreamingResponse(
            events(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    # -- samples ----------------------------------------------------------------------------
    @app.get("/api/datasets/{dataset_id}/samples", tags=["samples"])
    def list_samples(
        dataset_id: Id,
        status: Status | None = None,
        offset: Annotated[int, Query(ge=0, le=MAX_INT)] = 0,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        after_id: Annotated[int, Query(ge=0, le=MAX_INT)] = 0,
        format: Annotated[str | None, Query(min_length=1, max_length=64)] = None,
        min_width: Annotated[int | None, Query(ge=0, le=MAX_INT)] = None,
        max_width: Annotated[int | None, Query(ge=0, le=MAX_INT)] = None,
        min_height: Annotated[int | None, Query(ge=0, le=MAX_INT)] = None,
        max_height: Annotated[int | None, Query(ge=0, le=MAX_INT)] = None,
        path_glob: Annotated[str | None, Query(min_length=1, max_length=1024)] = None,
        category: Annotated[str | None, Query(min_length=1, max_length=1024)] = None,
        has_annotations: bool | None = None,
    ) -> dict[str, Any]:
        """A page of samples in id order matching every filter given, each with its boxes.

        The filters are those of `Dataset.samples`; page with `offset` or with `after_id`
        (the previous page's `next_after_id`)."""
        filters = {
            k: v
            for k, v in (
                ("format", format),
                ("min_width", min_width),
                ("max_width", max_width),
                ("min_height", min_height),
                ("max_height", max_height),
                ("path_glob", path_glob),
                ("category", category),
                ("has_annotations", has_annotations),
            )
            if v is not None
        }
        return state.samples(
            dataset_id,
            status=status,
            offset=offset,
            limit=limit,
            after_id=after_id,
            filters=filters,
        )

    @app.get("/api/datasets/{dataset_id}/facets", tags=["samples"])
    def get_facets(dataset_id: Id) -> dict[str, Any]:
        """Samples per status, format and category (`{"status": {...}, "format": {...},
        "category": {...}, "total"}`), from counters: cheap to poll while indexing."""
        return state.facets(dataset_id)

    @app.get(
        "/api/datasets/{dataset_id}/export",
        tags=["samples"],
        response_class=StreamingResponse,
        responses={200: {"content": {"application/json": {}, "text/csv": {}}}},
    )
    def export_dataset(
        dataset_id: Id,
        format: Literal["coco", "csv", "parquet"] = "coco",
        status: Status | None = None,
    ) -> StreamingResponse:
        """The dataset as a download, streamed page by page: COCO JSON, CSV or Parquet (the
        last needs pyarrow: `pip install 'fastindex[export]'`, else a 400 that says so)."""
        from ..export import content_type, iter_export

        state.require_dataset(dataset_id)
        store = _core.Store(state.db)  # its own connection: the stream outlives this thread
        filters = {"status": status} if status is not None else {}
        chunks = iter_export(store, dataset_id, format, **filters)
        name = f"dataset-{dataset_id}.{'json' if format == 'coco' else format}"
        return StreamingResponse(
            chunks,
            media_type=content_type(format),
            headers={"Content-Disposition": f'attachment; filename="{name}"'},
        )

    @app.get("/api/samples/{sample_id}", tags=["samples"])
    def get_sample(sample_id: Id) -> dict[str, Any]:
        """One sample with its annotations (boxes in the frame the COCO file declared)."""
        return state.sample(sample_id)

    @app.get(
        "/api/samples/{sample_id}/thumbnail",
        tags=["samples"],
        response_class=Response,
        responses={200: {"content": {"image/jpeg": {}}}},
    )
    async def get_thumbnail(sample_id: Id, request: Request) -> Response:
        """A small JPEG of an indexed sample, upright, made on first request and cached.

        Decoded at reduced size, a bounded number at a time; an image with more pixels to
        decode than `MAX_THUMB_PIXELS` is a 422 (its original is still served)."""
        sample = await run_in_threadpool(state.indexed_sample, sample_id)
        tag = etag(sample)
        headers = {"ETag": tag, "Cache-Control": "private, max-age=86400"}
        if request.headers.get("if-none-match") == tag:
            return Response(status_code=304, headers=headers)
        data = await _shared_thumbnail(sample)
        headers["X-Content-Type-Options"] = "nosniff"
        return Response(data, media_type="image/jpeg", headers=headers)

    @app.get(
        "/api/samples/{sample_id}/image",
        tags=["samples"],
        response_class=Response,
        responses={200: {"content": {"image/*": {}}}},
    )
    async def get_image(sample_id: Id) -> Response:
        """The original file of an indexed sample, with its content type. 403 if its path
        now leads outside its dataset's folder (a link swapped in after indexing)."""
        sample = await run_in_threadpool(state.indexed_sample, sample_id)
        f = await run_in_threadpool(open_sample_file, sample)
        try:
            return OpenFileResponse(
                f,
                media_type=content_type(sample),
                filename=sample.file_name,
                headers={
                    "X-Content-Type-Options": "nosniff",
                    "Cache-Control": "private, max-age=3600",
                },
            )
        except BaseException:
            f.close()
            raise

    # Thumbnails being made: requests for the same one wait for it rather than decode it again.
    making: dict[tuple[int, int | None, int | None], asyncio.Future[bytes]] = {}

    async def _shared_thumbnail(sample: Sample) -> bytes:
        key = cache_key(sample)
        while True:
            data = thumbs.get(key)
            if data is not None:
                return data
            fut = making.get(key)
            if fut is None:
                break
            await asyncio.wait([fut])  # never raises: a maker that gave up leaves it cancelled
            if not fut.cancelled():
                return fut.result()  # its thumbnail, or its ImageError
        fut = making[key] = asyncio.get_running_loop().create_future()
        try:
            data = await _thumbnail(sample)
            thumbs.put(key, data)
            fut.set_result(data)
            return data
        except FastIndexError as e:  # the same answer for whoever waits
            fut.set_exception(e)
            fut.exception()  # retrieved: not logged when nobody else waited
            raise
        finally:
            if not fut.done():
                fut.cancel()  # the maker was cancelled: a waiter makes it instead
            del making[key]

    async def _thumbnail(sample: Sample) -> bytes:
        f = await run_in_threadpool(open_sample_file, sample)
        try:
            name = f"sample {sample.id}: {sample.path}"
            img = await run_in_threadpool(open_image, f, name=name)
            try:
                async with budget[0].hold(decode_cost(img)):
                    return await run_in_threadpool(render_thumbnail, img, name=name)
            finally:
                img.close()
        finally:
            f.close()

    # -- search -----------------------------------------------------------------------------
    @app.get("/api/datasets/{dataset_id}/search", tags=["search"])
    def search(
        dataset_id: Id,
        q: Annotated[str, Query(min_length=1, max_length=1000)],
        k: Annotated[int, Query(ge=1, le=500)] = 48,
    ) -> dict[str, Any]:
        """The `k` samples whose embeddings best match the text `q` (409 until the dataset
        has embeddings)."""
        return {"dataset_id": dataset_id, "q": q, "items": state.search(dataset_id, q, k=k)}

    @app.get("/api/datasets/{dataset_id}/similar/{sample_id}", tags=["search"])
    def similar(
        dataset_id: Id, sample_id: Id, k: Annotated[int, Query(ge=1, le=500)] = 48
    ) -> dict[str, Any]:
        """The `k` samples most like `sample_id`, itself first (409 until it is embedded)."""
        items = state.similar(dataset_id, sample_id, k=k)
        return {"dataset_id": dataset_id, "sample_id": sample_id, "items": items}

    # -- the page ---------------------------------------------------------------------------
    static = _static_dir()

    @app.get("/", include_in_schema=False)
    def index() -> HTMLResponse:
        with open(os.path.join(static, "index.html"), encoding="utf-8") as f:
            return HTMLResponse(f.read(), headers={"Cache-Control": "no-cache"})

    app.mount("/static", SafeStaticFiles(directory=static), name="static")
    return app
