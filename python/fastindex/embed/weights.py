"""Pretrained weights: from the local Hugging Face cache, else downloaded when the hub answers."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import urllib.parse
from collections.abc import Iterator
from typing import Any

from ..errors import EmbeddingError

#: Seconds to wait for the model hub to answer before saying weights cannot be downloaded.
HUB_CONNECT_TIMEOUT = 5.0


def _hub_offline() -> bool:
    """True when `HF_HUB_OFFLINE` says not to reach the Hugging Face hub."""
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


@contextlib.contextmanager
def _quiet_random_init() -> Iterator[None]:
    """Random weights are what the caller asked for: drop open_clip's warning about them."""

    def drop(record: logging.LogRecord) -> bool:
        return "initialized randomly" not in record.getMessage()

    root = logging.getLogger()
    root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)


def _check_hub(what: str, why: str) -> None:
    """Fail fast when the hub is unreachable (a lookup there retries for half a minute)."""
    if _hub_offline():
        raise EmbeddingError(
            f"cannot load {what}: {why} and they are not in the local cache (HF_HUB_OFFLINE "
            "is set); download them once with network access, or pass checkpoint="
        )
    try:
        from huggingface_hub import constants

        endpoint = str(constants.ENDPOINT)
    except ImportError:
        endpoint = "https://huggingface.co"
    url = urllib.parse.urlsplit(endpoint)
    host = url.hostname or "huggingface.co"
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=HUB_CONNECT_TIMEOUT).close()
    except OSError as e:
        raise EmbeddingError(
            f"cannot load {what}: {why}, not in the local cache, and {host} is unreachable "
            f"({e}); download them once with network access, or pass checkpoint="
        ) from None


def _fetch_weights(what: str, tag_cfg: dict[str, Any]) -> str:
    """Local path of a pretrained tag's weights: from the cache, else downloaded."""
    if tag_cfg.get("file"):
        return str(tag_cfg["file"])
    hub = tag_cfg.get("hf_hub", "")
    if not hub:
        raise EmbeddingError(f"cannot load {what}: the tag names no Hugging Face repository")
    try:
        from huggingface_hub import hf_hub_download, try_to_load_from_cache
    except ImportError as e:
        raise EmbeddingError(f"cannot load {what}: huggingface_hub is not installed") from e
    repo, filename = os.path.split(hub)
    filename = filename or "open_clip_pytorch_model.bin"
    # open_clip prefers a .safetensors twin of the file when the repository has one.
    candidates = [filename]
    if filename.endswith((".bin", ".pth")):
        candidates.insert(0, filename[:-4] + ".safetensors")
    for fn in candidates:
        cached = try_to_load_from_cache(repo, fn)
        if isinstance(cached, str) and os.path.isfile(cached):
            return cached
    _check_hub(what, f"its weights come from the Hugging Face repository {repo}")
    last: Exception | None = None
    for fn in candidates:
        try:
            return str(hf_hub_download(repo, fn, library_name="fastindex"))
        except Exception as e:  # the hub's errors vary by version; the last one says most
            last = e
    raise EmbeddingError(f"cannot load {what}: download from {repo} failed: {last}")
