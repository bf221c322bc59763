"""open_clip, imported on demand, and the model configs this process registers with it."""

from __future__ import annotations

import json
import os
import tempfile
import threading
from pathlib import Path
from typing import Any

from ..errors import InvalidArgumentError


def available() -> bool:
    """True when torch and open_clip_torch import (phase 3 can run)."""
    try:
        import open_clip  # type: ignore[import-untyped]  # noqa: F401
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def _open_clip() -> Any:
    try:
        import open_clip
    except ImportError as e:  # pragma: no cover - the [embed] extra is missing
        raise InvalidArgumentError(
            "embeddings need torch and open_clip_torch: pip install 'fastindex[embed]'"
        ) from e
    return open_clip


_config_dir: str | None = None
_config_lock = threading.Lock()


def _builtin_config(name: str) -> bool:
    oc = _open_clip()
    return (Path(oc.__file__).parent / "model_configs" / f"{name}.json").is_file()


def register_model_config(name: str, config: dict[str, Any]) -> None:
    """Make an open_clip architecture named `name` known to this process.

    `config` is an open_clip model config (`embed_dim`, `vision_cfg`, `text_cfg`). A dataset
    whose model is a registered config keeps the config in its stored model spec, so another
    process can load it without registering it again.

    Raises:
        InvalidArgumentError: the name is empty or has a path separator, or the config lacks
            a key open_clip needs.
    """
    if not name or "/" in name or os.sep in name or name.startswith("."):
        raise InvalidArgumentError(f"model config name {name!r} must be a plain name")
    missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if k not in config]
    if missing:
        raise InvalidArgumentError(f"model config {name!r} lacks {', '.join(missing)}")
    oc = _open_clip()
    global _config_dir
    with _config_lock:
        if oc.get_model_config(name) == config:
            return
        if _config_dir is None:
            _config_dir = tempfile.mkdtemp(prefix="fastindex-open-clip-")
            import atexit
            import shutil

            atexit.register(shutil.rmtree, _config_dir, True)
        # open_clip names a config after its file, and reads configs from files only.
        path = Path(_config_dir) / f"{name}.json"
        path.write_text(json.dumps(config))
        oc.add_model_config(path)
