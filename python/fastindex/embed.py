"""Phase 3: CLIP image embeddings with open_clip, and the pipeline that keeps the model busy.

`EmbeddingModel` names a model (an open_clip architecture plus a pretrained tag, a local
checkpoint file, or random weights) and loads it lazily. `embed_pending` is the phase-3 worker
that `jobs.py` runs in a background thread: it claims `indexed` rows from the store, reads and
decodes the files, runs the model in batches and writes the vectors back, all stages at once.

Images are preprocessed with the model's own semantics (open_clip's validation transform:
resize, center crop, normalise with the model's mean and std), with two differences, both
deliberate:

- EXIF orientation is applied first, so a photo is embedded the way every viewer (and the web
  page) shows it. Plain open_clip, given `Image.open(path)`, does not rotate; to compare, give
  it `ImageOps.exif_transpose(Image.open(path))` (see `EmbeddingModel.reference_transform`).
- JPEGs are decoded with libjpeg-turbo's DCT-domain downscaling (1/2, 1/4 or 1/8, never below
  the resized size) before the bicubic resize, and palette or alpha images are converted to
  RGB before resizing (open_clip converts after). The pixels differ from the reference by
  resampling noise; the embeddings agree to a cosine similarity of about 0.99 or better.
"""

from __future__ import annotations

import collections
import contextlib
import io
import json
import logging
import math
import os
import queue
import socket
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from . import _core
from .errors import CancelledError, EmbeddingError, InvalidArgumentError, PathNotFoundError

if TYPE_CHECKING:
    import torch
    from PIL import Image

log = logging.getLogger("fastindex")

#: The model `EmbeddingModel()` means.
DEFAULT_MODEL = "ViT-B-32"
#: The pretrained tag `EmbeddingModel()` means (LAION-2B, the best open ViT-B-32 weights).
DEFAULT_PRETRAINED = "laion2b_s34b_b79k"
#: Seed of the weights `pretrained=None` makes, so that random weights are reproducible.
RANDOM_SEED = 0
#: Seconds to wait for the model hub to answer before saying weights cannot be downloaded.
HUB_CONNECT_TIMEOUT = 5.0

_JPEG_MAGIC = b"\xff\xd8\xff"
_SPEC_KEYS = ("name", "pretrained", "checkpoint", "device", "batch_size", "precision", "workers")


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


# -- custom model configs -------------------------------------------------------------------
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


# -- the model ------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Preprocess:
    """The geometry and colour constants of a model's image transform."""

    size: tuple[int, int]  # (height, width)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str  # "bicubic" | "bilinear"
    resize_mode: str  # "shortest" | "longest" | "squash"
    fill: int

    @classmethod
    def from_cfg(cls, cfg: dict[str, Any]) -> _Preprocess:
        size = cfg.get("size", 224)
        hw = (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[-1]))
        interp = "bilinear" if cfg.get("interpolation") == "bilinear" else "bicubic"
        mode = cfg.get("resize_mode") or "shortest"
        if mode not in ("shortest", "longest", "squash"):
            raise EmbeddingError(f"unsupported resize_mode {mode!r} in the model's preprocessing")
        mean = cfg.get("mean") or (0.48145466, 0.4578275, 0.40821073)
        std = cfg.get("std") or (0.26862954, 0.26130258, 0.27577711)
        mean3 = tuple(float(m) for m in (mean if len(mean) == 3 else (mean[0],) * 3))
        std3 = tuple(float(s) for s in (std if len(std) == 3 else (std[0],) * 3))
        fill = cfg.get("fill_color", 0)
        return cls(hw, mean3, std3, interp, mode, int(fill) if isinstance(fill, int) else 0)  # type: ignore[arg-type]

    def plan(self, h: int, w: int) -> _Plan:
        """Where an `h` x `w` (oriented) image lands: resized size, then crop or pad.

        Must match open_clip's `image_transform` (torchvision `Resize` + `CenterCrop` for a
        square `shortest`, `ResizeKeepRatio` + `CenterCrop(OrPad)` otherwise).
        """
        th, tw = self.size
        if self.resize_mode == "squash":
            rh, rw = th, tw
        elif self.resize_mode == "shortest" and th == tw:
            # torchvision's Resize(int): the short side becomes `th`, the long one truncates.
            if w <= h:
                rw, rh = th, int(th * h / w)
            else:
                rh, rw = th, int(th * w / h)
        else:
            rh_, rw_ = h / th, w / tw
            ratio = max(rh_, rw_) if self.resize_mode == "longest" else min(rh_, rw_)
            rh, rw = max(1, round(h / ratio)), max(1, round(w / ratio))
        # center_crop_or_pad: pad a short side (fill), crop a long one (rounded half to even,
        # as torchvision does).
        if rh >= th:
            top, dy, ch = round((rh - th) / 2.0), 0, th
        else:
            top, dy, ch = 0, (th - rh) // 2, rh
        if rw >= tw:
            left, dx, cw = round((rw - tw) / 2.0), 0, tw
        else:
            left, dx, cw = 0, (tw - rw) // 2, rw
        return _Plan(rh, rw, top, left, ch, cw, dy, dx, ch < th or cw < tw)


@dataclass(frozen=True, slots=True)
class _Plan:
    rh: int  # resized height and width
    rw: int
    top: int  # crop origin in the resized image
    left: int
    ch: int  # size of the region copied out of the resized image
    cw: int
    dy: int  # where it lands in the output (non-zero only when padding)
    dx: int
    padded: bool


class EmbeddingModel:
    """A CLIP model to embed images and text with, named the way open_clip names models.

    Construction checks the arguments and reads the architecture's config (for `dim`); the
    weights load on first use (`load()`), in the thread that embeds.

    Args:
        name: an open_clip architecture (`open_clip.list_models()`), or one registered with
            `register_model_config`.
        pretrained: an open_clip pretrained tag for `name`
            (`open_clip.list_pretrained_tags_by_model(name)`); `"default"` means
            `laion2b_s34b_b79k` for ViT-B-32 and the first listed tag for other models;
            `None` (or `"random"`) means random weights made with a fixed seed (reproducible,
            for tests and benchmarks: their embeddings mean nothing to a text search).
        checkpoint: a local weights file (`.pt`, `.bin`, `.safetensors`) for `name`, in place
            of a pretrained tag.
        device: `"cuda"`, `"cuda:1"`, `"cpu"`...; by default CUDA when torch sees a device.
        batch_size: images per forward pass (and per store write).
        precision: `"fp16"` (the default on CUDA), `"bf16"` or `"fp32"` (the default on CPU).
        workers: CPU threads that decode images (default: one per CPU).

    Weights named by a tag come from the local Hugging Face cache, or are downloaded when the
    hub answers within `HUB_CONNECT_TIMEOUT` seconds (never with `HF_HUB_OFFLINE=1`).

    Raises:
        InvalidArgumentError: an unknown architecture, a bad option value.
        PathNotFoundError: `checkpoint` does not exist.
    """

    def __init__(
        self,
        name: str = DEFAULT_MODEL,
        pretrained: str | None = "default",
        *,
        checkpoint: str | os.PathLike[str] | None = None,
        device: str | None = None,
        batch_size: int = 256,
        precision: str | None = None,
        workers: int | None = None,
    ) -> None:
        self._init(name, pretrained, checkpoint, device, batch_size, precision, workers, True)

    def _init(
        self,
        name: str,
        pretrained: str | None,
        checkpoint: str | os.PathLike[str] | None,
        device: str | None,
        batch_size: int,
        precision: str | None,
        workers: int | None,
        check_files: bool,
    ) -> None:
        if not isinstance(name, str) or not name:
            raise InvalidArgumentError(f"model name must be a non-empty string, got {name!r}")
        if name.startswith(("hf-hub:", "local-dir:")):
            raise InvalidArgumentError(
                f"model {name!r}: name an open_clip architecture and pass the weights file "
                "as checkpoint="
            )
        oc = _open_clip()
        cfg = oc.get_model_config(name)
        if cfg is None:
            close = [m for m in oc.list_models() if m.lower() == name.lower()]
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise InvalidArgumentError(
                f"unknown open_clip model {name!r}{hint}; see open_clip.list_models()"
            )
        if pretrained is not None and not isinstance(pretrained, str):
            raise InvalidArgumentError(f"pretrained must be a tag or None, got {pretrained!r}")
        if pretrained == "random":  # what the command line can say for None
            pretrained = None
        ckpt: str | None = None
        if checkpoint is not None:
            if not isinstance(checkpoint, str | os.PathLike) or not os.fspath(checkpoint):
                raise InvalidArgumentError(f"checkpoint must be a path, got {checkpoint!r}")
            if pretrained not in ("default", None):
                raise InvalidArgumentError(
                    f"give pretrained={pretrained!r} or checkpoint=, not both"
                )
            ckpt = os.path.abspath(os.fspath(checkpoint))
            if check_files and not os.path.isfile(ckpt):
                raise PathNotFoundError(f"checkpoint {ckpt} does not exist")
            pretrained = None
        elif pretrained == "default":
            if name == DEFAULT_MODEL:
                pretrained = DEFAULT_PRETRAINED
            else:
                tags = oc.list_pretrained_tags_by_model(name)
                if not tags:
                    raise InvalidArgumentError(
                        f"open_clip has no pretrained weights for {name!r}: pass "
                        "checkpoint=<file>, or pretrained=None for random weights"
                    )
                pretrained = str(tags[0])
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise InvalidArgumentError(f"batch_size must be a positive integer, got {batch_size!r}")
        if device is not None:
            import torch

            try:
                torch.device(device)
            except (RuntimeError, ValueError, TypeError) as e:
                raise InvalidArgumentError(f"device {device!r} is not a torch device") from e
        if precision not in (None, "fp32", "fp16", "bf16"):
            raise InvalidArgumentError(
                f"precision must be 'fp16', 'bf16' or 'fp32', got {precision!r}"
            )
        if workers is not None and (
            isinstance(workers, bool) or not isinstance(workers, int) or workers < 1
        ):
            raise InvalidArgumentError(f"workers must be a positive integer, got {workers!r}")
        self.name = name
        self.pretrained: str | None = pretrained
        self.checkpoint = ckpt
        self.device_arg = device
        self.batch_size = batch_size
        self.precision_arg = precision
        self.workers = workers
        self._cfg: dict[str, Any] = cfg
        self._custom = not _builtin_config(name)
        self._lock = threading.Lock()
        self._model: Any = None
        self._tokenizer: Any = None
        self._device: torch.device | None = None
        self._dtype: torch.dtype | None = None
        self._pre: _Preprocess | None = None

    def __repr__(self) -> str:
        return f"EmbeddingModel({self.name!r}, {self.key_pretrained!r})"

    # -- identity ---------------------------------------------------------------------------
    @property
    def key_name(self) -> str:
        """The model's name in the store (the architecture)."""
        return self.name

    @property
    def key_pretrained(self) -> str:
        """Which weights, in the store: the tag, `file:<absolute path>`, or `random:<seed>`."""
        if self.checkpoint is not None:
            return f"file:{self.checkpoint}"
        if self.pretrained is None:
            return f"random:{RANDOM_SEED}"
        return self.pretrained

    @property
    def dim(self) -> int:
        """Length of the embeddings (from the architecture's config; loads nothing)."""
        return int(self._cfg["embed_dim"])

    def spec(self) -> dict[str, Any]:
        """A JSON-serialisable description that `from_spec` turns back into this model."""
        d: dict[str, Any] = {
            "name": self.name,
            "pretrained": self.pretrained,
            "checkpoint": self.checkpoint,
            "device": self.device_arg,
            "batch_size": self.batch_size,
            "precision": self.precision_arg,
            "workers": self.workers,
        }
        if self._custom:
            d["model_cfg"] = self._cfg
        return d

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> EmbeddingModel:
        """The model a `spec()` describes. Registers a custom architecture the spec carries;
        does not check that a checkpoint file still exists (`load()` will say so)."""
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise InvalidArgumentError(f"not an embedding model spec: {spec!r}")
        cfg = spec.get("model_cfg")
        if isinstance(cfg, dict):
            register_model_config(spec["name"], cfg)
        m = cls.__new__(cls)
        kw = {k: spec.get(k) for k in _SPEC_KEYS}
        m._init(
            spec["name"],
            kw["pretrained"],
            kw["checkpoint"],
            kw["device"],
            kw["batch_size"] if kw["batch_size"] is not None else 256,
            kw["precision"],
            kw["workers"],
            False,
        )
        return m

    # -- loading ----------------------------------------------------------------------------
    @property
    def loaded(self) -> bool:
        return self._model is not None

    def load(self) -> EmbeddingModel:
        """Load the weights (once; later calls return at once). Blocks.

        Raises:
            EmbeddingError: the weights cannot be loaded (unknown tag, not cached and the hub
                unreachable, a bad checkpoint file, a missing device), with the model named.
        """
        with self._lock:
            if self._model is None:
                self._load()
        return self

    def _load(self) -> None:
        import torch

        oc = _open_clip()
        what = f"model {self.name} ({self.key_pretrained})"
        device = self._resolve_device(what)
        precision = self.precision_arg or ("fp16" if device.type == "cuda" else "fp32")
        kw: dict[str, Any] = {"precision": precision, "device": device, "pretrained_text": False}
        weights: str | None = None
        if self.checkpoint is not None:
            if not os.path.isfile(self.checkpoint):
                raise EmbeddingError(f"cannot load {what}: {self.checkpoint} does not exist")
            weights = self.checkpoint
        elif self.pretrained is not None:
            tag_cfg = oc.get_pretrained_cfg(self.name, self.pretrained)
            if not tag_cfg:
                known = ", ".join(oc.list_pretrained_tags_by_model(self.name)) or "none"
                raise EmbeddingError(
                    f"cannot load {what}: open_clip has no pretrained tag "
                    f"{self.pretrained!r} for {self.name} (known tags: {known}); pass "
                    "checkpoint= for a local file"
                )
            weights = _fetch_weights(what, tag_cfg)
            kw["force_preprocess_cfg"] = {
                k: tag_cfg[k]
                for k in ("mean", "std", "interpolation", "resize_mode")
                if k in tag_cfg
            }
            # The tag says whether its weights were trained with QuickGELU; build to match.
            kw["force_quick_gelu"] = bool(tag_cfg.get("quick_gelu", False))
        text_cfg = self._cfg.get("text_cfg", {})
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        if (text_cfg.get("hf_tokenizer_name") or text_cfg.get("hf_model_name")) and not offline:
            # Offline, transformers reads its cache at once; online it retries for minutes.
            _check_hub(what, "its tokenizer comes from the Hugging Face hub")
        try:
            if weights is None:
                # Random weights, the same in every process.
                with torch.random.fork_rng(devices=[]), _quiet_random_init():
                    torch.manual_seed(RANDOM_SEED)
                    model = oc.create_model(self.name, pretrained=None, **kw)
            else:
                model = oc.create_model(self.name, pretrained=weights, **kw)
            tokenizer = oc.get_tokenizer(self.name)
        except EmbeddingError:
            raise
        except Exception as e:  # torch.load, a state dict that does not fit, CUDA...
            src = f" from {weights}" if weights else ""
            raise EmbeddingError(f"cannot load {what}{src}: {type(e).__name__}: {e}") from e
        model.eval()
        self._pre = _Preprocess.from_cfg(dict(getattr(model.visual, "preprocess_cfg", {})))
        self._device = device
        self._dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision, torch.float32)
        self._tokenizer = tokenizer
        self._model = model

    def _resolve_device(self, what: str) -> torch.device:
        import torch

        if self.device_arg is None:
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        device = torch.device(self.device_arg)
        if device.type == "cuda":
            if not torch.cuda.is_available():
                raise EmbeddingError(f"cannot load {what}: device {device} but torch sees no CUDA")
            if device.index is not None and device.index >= torch.cuda.device_count():
                raise EmbeddingError(f"cannot load {what}: no device {device}")
        return device

    @property
    def device(self) -> torch.device:
        """The device the weights are on (loads them)."""
        self.load()
        assert self._device is not None
        return self._device

    @property
    def preprocess(self) -> _Preprocess:
        self.load()
        assert self._pre is not None
        return self._pre

    def reference_transform(self) -> Callable[[Image.Image], torch.Tensor]:
        """open_clip's own validation transform for this model (PIL image -> tensor), for
        comparisons: fastindex's pipeline matches it to resampling noise, on
        `ImageOps.exif_transpose(image)`."""
        oc = _open_clip()
        self.load()
        cfg = oc.transform.PreprocessCfg(**self._model.visual.preprocess_cfg)
        return oc.transform.image_transform_v2(cfg, is_train=False)  # type: ignore[no-any-return]

    # -- encoding ---------------------------------------------------------------------------
    def encode_text(self, texts: Sequence[str]) -> np.ndarray:
        """L2-normalised float32 embeddings of `texts`, shape `(len(texts), dim)`. Blocks."""
        import torch

        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise InvalidArgumentError("encode_text takes a list of strings")
        self.load()
        out = np.empty((len(texts), self.dim), np.float32)
        for i in range(0, len(texts), self.batch_size):
            tokens = self._tokenizer(list(texts[i : i + self.batch_size])).to(self._device)
            with torch.inference_mode():
                v = self._model.encode_text(tokens).float()
                v = torch.nn.functional.normalize(v, dim=-1)
            out[i : i + len(v)] = v.cpu().numpy()
        return out

    def encode_images(
        self, images: Sequence[str | os.PathLike[str] | bytes | Image.Image]
    ) -> np.ndarray:
        """L2-normalised float32 embeddings of images (paths, encoded bytes or PIL images),
        preprocessed as `embed_pending` does (EXIF orientation applied). Blocks.

        Raises:
            ImageError: an image cannot be read or decoded.
        """
        from PIL import Image as PILImage

        from .errors import ImageError

        self.load()
        pre = self.preprocess
        th, tw = pre.size
        buf = np.empty((len(images), th, tw, 3), np.uint8)
        for i, item in enumerate(images):
            try:
                if isinstance(item, PILImage.Image):
                    _pil_into(item, 1, pre, buf[i])
                else:
                    data = item if isinstance(item, bytes) else _read(os.fspath(item))
                    orientation = _orientation_of(bytes(data))
                    _decode_into(data, orientation, pre, buf[i])
            except _DecodeError as e:
                raise ImageError(f"{_describe(item)}: {e}") from None
            except OSError as e:
                raise ImageError(f"{_describe(item)}: {e}") from None
        out = np.empty((len(images), self.dim), np.float32)
        for i in range(0, len(images), self.batch_size):
            out[i : i + self.batch_size] = self._forward(buf[i : i + self.batch_size])
        return out

    def _normalise_batch(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 `(n, h, w, 3)` on the model's device -> normalised `(n, 3, h, w)` input."""
        import torch

        pre = self._pre
        assert pre is not None and self._dtype is not None
        mean = torch.tensor(pre.mean, device=x.device).view(1, 3, 1, 1) * 255.0
        inv = 1.0 / (torch.tensor(pre.std, device=x.device).view(1, 3, 1, 1) * 255.0)
        x = x.permute(0, 3, 1, 2).float()
        return ((x - mean) * inv).to(self._dtype).contiguous()

    def _forward(self, batch: np.ndarray | torch.Tensor) -> np.ndarray:
        """Embed a uint8 `(n, h, w, 3)` batch (numpy, or a tensor on any device)."""
        import torch

        with torch.inference_mode():
            x = torch.from_numpy(batch) if isinstance(batch, np.ndarray) else batch
            x = self._normalise_batch(x.to(self._device, non_blocking=True))
            v = self._model.encode_image(x).float()
            v = torch.nn.functional.normalize(v, dim=-1)
            return v.cpu().numpy()


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


def _describe(item: object) -> str:
    if isinstance(item, str | os.PathLike):
        return os.fspath(item)
    return f"<{type(item).__name__}>"


# -- fetching weights -----------------------------------------------------------------------
def _check_hub(what: str, why: str) -> None:
    """Fail fast when the hub is unreachable (a lookup there retries for half a minute)."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
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


# -- decoding -------------------------------------------------------------------------------
class _DecodeError(Exception):
    """An image that cannot be decoded: the message becomes the sample's error."""


def _read(path: str) -> bytearray:
    # A bytearray: torch can wrap it without a copy (and without a read-only warning).
    with open(path, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        data = bytearray(size)
        n = f.readinto(data)
        if n != size:
            del data[n:]
        return data


def _orientation_of(data: bytes) -> int:
    try:
        return int(_core.probe_bytes(data).get("orientation") or 1)
    except Exception:
        return 1


def _orient(a: np.ndarray, orientation: int) -> np.ndarray:
    """Apply an EXIF orientation to an `(h, w, c)` array (PIL's `exif_transpose`)."""
    if orientation == 2:
        return a[:, ::-1]
    if orientation == 3:
        return a[::-1, ::-1]
    if orientation == 4:
        return a[::-1]
    if orientation == 5:
        return a.transpose(1, 0, 2)
    if orientation == 6:
        return a.transpose(1, 0, 2)[:, ::-1]
    if orientation == 7:
        return a.transpose(1, 0, 2)[::-1, ::-1]
    if orientation == 8:
        return a.transpose(1, 0, 2)[::-1]
    return a


def _swaps(orientation: int) -> bool:
    return orientation in (5, 6, 7, 8)


def _decode_into(
    data: bytes | bytearray, orientation: int, pre: _Preprocess, out: np.ndarray
) -> str:
    """Decode one image into `out` (`(h, w, 3)` uint8, the model's input size); returns the
    decoder that did it ("jpeg" or "pil"). Raises `_DecodeError` with a one-line reason."""
    if bytes(data[:3]) == _JPEG_MAGIC:
        try:
            _jpeg_into(data, orientation, pre, out)
            return "jpeg"
        except _NotForTurbo:
            pass
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.format == "JPEG":
                # Let libjpeg scale in the DCT domain here too (CMYK and other rare JPEGs).
                w, h = im.size
                p = pre.plan(*((w, h) if _swaps(orientation) else (h, w)))
                rh, rw = (p.rw, p.rh) if _swaps(orientation) else (p.rh, p.rw)
                im.draft("RGB", (rw, rh))
            _pil_into(im, orientation, pre, out)
    except _DecodeError:
        raise
    except Exception as e:
        raise _DecodeError(_reason(e)) from None
    return "pil"


class _NotForTurbo(Exception):
    """A JPEG that libjpeg-turbo's RGB output does not serve well (CMYK): use Pillow."""


def _reason(e: BaseException) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return f"cannot decode image: {msg}"


def _jpeg_into(
    data: bytes | bytearray, orientation: int, pre: _Preprocess, out: np.ndarray
) -> None:
    import simplejpeg  # type: ignore[import-untyped]

    try:
        h, w, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError as e:
        raise _DecodeError(_reason(e)) from None
    if colorspace in ("CMYK", "YCCK"):
        raise _NotForTurbo
    oh, ow = (w, h) if _swaps(orientation) else (h, w)
    p = pre.plan(oh, ow)
    need_h, need_w = (p.rw, p.rh) if _swaps(orientation) else (p.rh, p.rw)
    # The smallest power-of-two DCT scale that keeps the resized size (1/2, 1/4 and 1/8
    # are libjpeg-turbo's fast paths; 3/8, 5/8... cost more than a full decode).
    scale = 1
    while (
        scale < 8 and math.ceil(h / (scale * 2)) >= need_h and math.ceil(w / (scale * 2)) >= need_w
    ):
        scale *= 2
    try:
        a = simplejpeg.decode_jpeg(
            data,
            colorspace="RGB",
            min_height=math.ceil(h / scale),
            min_width=math.ceil(w / scale),
        )
    except ValueError as e:
        raise _DecodeError(_reason(e)) from None
    _array_into(_orient(a, orientation), pre, p, out)


def _pil_into(im: Image.Image, orientation: int, pre: _Preprocess, out: np.ndarray) -> None:
    from PIL import Image

    im.load()
    if orientation != 1:
        im = im.transpose(_PIL_ORIENT[orientation])
    if im.mode != "RGB":
        im = im.convert("RGB")
    w, h = im.size
    p = pre.plan(h, w)
    _resize_into(im, p, pre, out, Image)


_PIL_ORIENT: dict[int, Any] = {}


def _init_pil_orient() -> None:
    from PIL import Image

    t = Image.Transpose
    _PIL_ORIENT.update(
        {
            2: t.FLIP_LEFT_RIGHT,
            3: t.ROTATE_180,
            4: t.FLIP_TOP_BOTTOM,
            5: t.TRANSPOSE,
            6: t.ROTATE_270,
            7: t.TRANSVERSE,
            8: t.ROTATE_90,
        }
    )


_init_pil_orient()


def _array_into(a: np.ndarray, pre: _Preprocess, p: _Plan, out: np.ndarray) -> None:
    from PIL import Image

    im = Image.fromarray(np.ascontiguousarray(a), "RGB")
    _resize_into(im, p, pre, out, Image)


def _resize_into(im: Image.Image, p: _Plan, pre: _Preprocess, out: np.ndarray, Image: Any) -> None:
    """Resize `im` (whatever its size: full or DCT-scaled) to the plan's resized size and copy
    the planned crop into `out`, padding with the fill colour. Only the cropped region is
    resampled (`box`), which is what resizing everything and then cropping gives."""
    w, h = im.size
    sx, sy = w / p.rw, h / p.rh
    box = (
        p.left * sx,
        p.top * sy,
        min(w, (p.left + p.cw) * sx),
        min(h, (p.top + p.ch) * sy),
    )
    resample = (
        Image.Resampling.BILINEAR if pre.interpolation == "bilinear" else Image.Resampling.BICUBIC
    )
    if (w, h) == (p.cw, p.ch) and box == (0, 0, w, h):
        r = im
    else:
        r = im.resize((p.cw, p.ch), resample, box=box, reducing_gap=None)
    if p.padded:
        out[...] = pre.fill
    out[p.dy : p.dy + p.ch, p.dx : p.dx + p.cw] = np.asarray(r)


# -- the GPU decoder ------------------------------------------------------------------------
class _TorchJpegDecoder:
    """Batched JPEG decoding with torchvision (nvJPEG on CUDA), then a resize batched per
    distinct source size, crop and pad, into uint8 `(h, w, 3)` slots on the device.

    Runs in its own thread (and CUDA stream), so that decoding overlaps the forward pass.
    """

    #: Most source pixels one interpolate call takes (bounds its float32 temporary).
    MAX_PIXELS = 48_000_000

    def __init__(self, device: torch.device, pre: _Preprocess) -> None:
        import torch

        self.device = device
        self.pre = pre
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None  # type: ignore[no-untyped-call]

    def decode(
        self, items: list[tuple[bytes | bytearray, int]]
    ) -> tuple[list[torch.Tensor | None], list[str | None]]:
        """Decode `(data, orientation)` items; returns per item the `(h, w, 3)` uint8 tensor
        on the device, or None with a reason (the caller then lets the CPU try)."""
        import torch

        ctx = (
            torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()
        )
        with ctx, torch.inference_mode():
            out, errs = self._decode(items)
            if self.stream is not None:
                self.stream.synchronize()
        return out, errs

    def _decode(
        self, items: list[tuple[bytes | bytearray, int]]
    ) -> tuple[list[torch.Tensor | None], list[str | None]]:
        import torch
        import torch.nn.functional as F

        n = len(items)
        out: list[torch.Tensor | None] = [None] * n
        errs: list[str | None] = [None] * n
        datas = [torch.frombuffer(_writable(d), dtype=torch.uint8) for d, _ in items]
        try:
            decoded: list[torch.Tensor | None] = list(_torch_decode_jpegs(datas, self.device))
        except RuntimeError:
            # One bad file fails the whole batched call: decode one by one to find it.
            decoded = []
            for k, d in enumerate(datas):
                try:
                    decoded.extend(_torch_decode_jpegs([d], self.device))
                except RuntimeError as e:
                    decoded.append(None)
                    errs[k] = _reason(e)
        # Orient, then group by size: one interpolate call per distinct size.
        groups: dict[tuple[int, int], list[int]] = collections.defaultdict(list)
        oriented: list[torch.Tensor | None] = [None] * n
        for i, t in enumerate(decoded):
            if t is None:
                continue
            t = _orient_chw(t, items[i][1])
            oriented[i] = t
            groups[(int(t.shape[1]), int(t.shape[2]))].append(i)
        th, tw = self.pre.size
        mode = "bilinear" if self.pre.interpolation == "bilinear" else "bicubic"
        for (h, w), idx in groups.items():
            p = self.pre.plan(h, w)
            step = max(1, self.MAX_PIXELS // (h * w))
            for s in range(0, len(idx), step):
                part = idx[s : s + step]
                x = torch.stack([oriented[i] for i in part]).float()  # type: ignore[misc]
                if (p.rh, p.rw) != (h, w):
                    x = F.interpolate(
                        x, size=(p.rh, p.rw), mode=mode, antialias=True, align_corners=False
                    )
                x = x[:, :, p.top : p.top + p.ch, p.left : p.left + p.cw]
                x = x.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
                if p.padded:
                    canvas = torch.full(
                        (len(part), th, tw, 3), self.pre.fill, dtype=torch.uint8, device=self.device
                    )
                    canvas[:, p.dy : p.dy + p.ch, p.dx : p.dx + p.cw] = x
                    x = canvas
                for j, i in enumerate(part):
                    out[i] = x[j]
        return out, errs


def _torch_decode_jpegs(datas: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """torchvision's JPEG decoder (nvJPEG, batched, on CUDA), as RGB `(3, h, w)` uint8.

    Calls the operators `torchvision.io.decode_jpeg` calls, without its deprecation warning
    (torchvision 0.29 points to TorchCodec, which has no batched nvJPEG decoder yet); where
    they are gone, the public function."""
    import torch
    import torchvision.io.image as tvi  # type: ignore[import-untyped]

    rgb = tvi.ImageReadMode.RGB.value
    ops = getattr(torch.ops, "image", None)
    if ops is not None and tvi._has_image_ops():
        if device.type == "cuda":
            return list(ops.decode_jpegs_cuda(datas, rgb, device))
        return [ops.decode_jpeg(d, rgb, False) for d in datas]
    return list(
        tvi.decode_jpeg(datas, mode=tvi.ImageReadMode.RGB, device=device)
    )  # pragma: no cover


def _writable(d: bytes | bytearray) -> bytearray:
    return d if isinstance(d, bytearray) else bytearray(d)


def _orient_chw(t: torch.Tensor, orientation: int) -> torch.Tensor:
    """`_orient` for a `(c, h, w)` tensor."""
    if orientation == 2:
        return t.flip(2)
    if orientation == 3:
        return t.flip(1, 2)
    if orientation == 4:
        return t.flip(1)
    if orientation == 5:
        return t.transpose(1, 2)
    if orientation == 6:
        return t.transpose(1, 2).flip(2)
    if orientation == 7:
        return t.transpose(1, 2).flip(1, 2)
    if orientation == 8:
        return t.transpose(1, 2).flip(1)
    return t


# -- the pipeline ---------------------------------------------------------------------------
@dataclass(eq=False)
class _Batch:
    """Claimed rows on their way through the pipeline."""

    ids: list[int]
    paths: list[str]
    orientation: list[int]
    data: list[bytearray | None]
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
    ) -> None:
        self.store = store
        self.dataset_id = dataset_id
        self.model = model
        self.model_id = model_id
        self.stop = stop
        self.producer_alive = producer_alive
        self.on_batch = on_batch
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
        def start(name: str, target: Callable[[], None]) -> None:
            t = threading.Thread(
                target=self._guard(target), name=f"fastindex-embed-{name}", daemon=True
            )
            t.start()
            self.threads.append(t)

        start("feed", self._feed)
        for i in range(self.workers):
            start(f"decode-{i}", self._decode_cpu)
        if self.gpu is not None:
            start("decode-gpu", self._decode_gpu)
        writer = threading.Thread(
            target=self._guard(self._write), name="fastindex-embed-write", daemon=True
        )
        writer.start()
        self.threads.append(writer)
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
            if self.abort.is_set():
                raise _Abort
            try:
                q.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    # -- claim and read -------------------------------------------------------------------
    def _feed(self) -> None:
        after = 0
        with ThreadPoolExecutor(
            min(32, 4 * self.workers), thread_name_prefix="fastindex-read"
        ) as io_pool:
            while True:
                if self.abort.is_set() or self.stop.is_set():
                    raise _Abort
                while not self.slots.acquire(timeout=0.1):
                    if self.abort.is_set():
                        raise _Abort
                # Ask whether phase 2 runs *before* claiming: if it had stopped, every row
                # it made is visible to this claim.
                alive = self.producer_alive()
                rows = self.store.claim_for_embedding(self.dataset_id, self.n, after)
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
            while not self.slots.acquire(timeout=0.1):
                if self.abort.is_set():
                    raise _Abort
        self._put(self.q_forward, None)

    def _submit(self, rows: list[tuple[int, Any]], io_pool: ThreadPoolExecutor) -> None:
        ids = [int(r[0]) for r in rows]
        paths = [os.fspath(r[1]) for r in rows]
        meta = {int(s["id"]): s for s in self.store.samples_by_id(ids)}
        orientation = [int(meta.get(i, {}).get("orientation") or 1) for i in ids]
        n = len(ids)
        b = _Batch(
            ids, paths, orientation, [None] * n, self._buffer(), [None] * n, np.zeros(n, bool)
        )
        results = io_pool.map(_try_read, paths)
        for i, (data, err) in enumerate(results):
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
            ids = [b.ids[i] for i in np.flatnonzero(b.ok)]
            blob = np.ascontiguousarray(vecs, dtype="<f2").tobytes()
            self.store.finish_embeddings(self.dataset_id, self.model_id, ids, blob, b.failed)
            self.stats.embedded += len(ids)
            self.stats.failed += len(b.failed)
            self.stats.batches += 1
            self.on_batch()


def _try_read(path: str) -> tuple[bytearray | None, str | None]:
    try:
        return _read(path), None
    except OSError as e:
        return None, f"cannot read file: {e.strerror or e}"


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
) -> int:
    """Phase 3: embed the dataset's `indexed` samples until none is left. Blocks.

    Loads `model` first. Then claims rows (`indexed` -> `embedding`), reads the files with a
    pool of threads, decodes them on CPU threads (and, on CUDA, with nvJPEG in a thread of
    its own, the two sharing the work as they go), runs the model on full batches and writes
    the vectors (`embedding` -> `ready`); a file that cannot be read or decoded becomes
    `failed` with its reason. While `producer_alive()` (phase 2 runs), an empty queue is
    polled every 50 ms. `on_batch()` follows each committed batch.

    Args:
        gpu_decode: decode JPEGs with torchvision too (default: on CUDA devices).
        stats: filled with counts (`embedded`, `failed`, `batches`, `decoded_cpu`,
            `decoded_gpu`, `decoded_pil`) for benchmarks.

    Returns:
        The number of samples embedded.

    Raises:
        EmbeddingError: the model cannot be loaded (nothing was claimed).
        CancelledError: `stop` was set; rows claimed and not written stay `embedding`, for
            the caller to release.
    """
    model.load()
    model_id = store.register_model(model.key_name, model.key_pretrained, model.dim)
    st = _Stats()
    try:
        _Pipeline(
            store, dataset_id, model, int(model_id), stop, producer_alive, on_batch, st, gpu_decode
        ).run()
    except _Abort:  # pragma: no cover - an abort always carries an error or a stop
        raise CancelledError("embedding stopped") from None
    finally:
        if stats is not None:
            stats.update(vars(st))
    return st.embedded
