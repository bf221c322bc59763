"""`EmbeddingModel`: a CLIP model named the way open_clip names it, its spec, loading its
weights (and the errors that says), and encoding text and images."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import EmbeddingError, InvalidArgumentError, PathNotFoundError
from .configs import _builtin_config, _open_clip, register_model_config
from .decode_cpu import _decode_into, _pil_into
from .orientation import _orientation_of
from .read import _DecodeError, _read
from .transform import _Preprocess
from .weights import _check_hub, _fetch_weights, _hub_offline, _quiet_random_init

if TYPE_CHECKING:
    import torch
    from PIL import Image

#: The model `EmbeddingModel()` means.
DEFAULT_MODEL = "ViT-B-32"
#: The pretrained tag `EmbeddingModel()` means (LAION-2B, the best open ViT-B-32 weights).
DEFAULT_PRETRAINED = "laion2b_s34b_b79k"
#: Seed of the weights `pretrained=None` makes, so that random weights are reproducible.
RANDOM_SEED = 0

_SPEC_KEYS = ("name", "pretrained", "checkpoint", "device", "batch_size", "precision", "workers")


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
        offline = _hub_offline()
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

        from ..errors import ImageError

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
            except (_DecodeError, OSError) as e:
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


def _describe(item: object) -> str:
    if isinstance(item, str | os.PathLike):
        return os.fspath(item)
    return f"<{type(item).__name__}>"
