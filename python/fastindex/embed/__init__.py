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

The package, by module: `configs` (open_clip, and model configs registered here), `model`
(`EmbeddingModel`), `weights` (finding and downloading pretrained weights), `transform` (the
resize, crop and pad plan), `orientation` (EXIF orientation), `read` (reading files, decode
failures), `decode_cpu` (libjpeg-turbo and Pillow), `decode_gpu` (torchvision's nvJPEG) and
`pipeline` (`embed_pending`).
"""

from __future__ import annotations

from .configs import available, register_model_config
from .decode_cpu import _decode_into as _decode_into
from .decode_gpu import _TorchJpegDecoder as _TorchJpegDecoder
from .model import DEFAULT_MODEL, DEFAULT_PRETRAINED, RANDOM_SEED, EmbeddingModel
from .orientation import _orientation_of as _orientation_of
from .pipeline import embed_pending
from .transform import _Preprocess as _Preprocess
from .weights import HUB_CONNECT_TIMEOUT

__all__ = [
    "DEFAULT_MODEL",
    "DEFAULT_PRETRAINED",
    "HUB_CONNECT_TIMEOUT",
    "RANDOM_SEED",
    "EmbeddingModel",
    "available",
    "embed_pending",
    "register_model_config",
]
