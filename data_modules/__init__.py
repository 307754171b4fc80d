"""WebDataset DataModules, views and the `vlp-data` shard builder.

The names below load their module on first use (PEP 562), so `vlp-data` and DataLoader workers do not import
Lightning just by importing this package.
"""

from __future__ import annotations

import importlib
import os

# A backstop behind the pipeline's own header check: OpenCV refuses images above PIL's decompression-bomb limit
# (read when OpenCV first decodes; its default allows 2^30 pixels). PIL's limit, 2 * 89,478,485 pixels, written out
# so that this package does not import PIL just to be imported.
os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(2 * 89_478_485))

_EXPORTS = {
    "ImageTextDataModule": "data_modules.datamodules",
    "ImageDataModule": "data_modules.datamodules",
    "DataConfigError": "data_modules.pipeline",
    "BadSampleError": "data_modules.pipeline",
    "make_eval_loader": "data_modules.pipeline",
    "Views": "data_modules.views",
    "Augment": "data_modules.views",
    "SingleCrop": "data_modules.views",
    "TwoCrops": "data_modules.views",
    "MultiCrop": "data_modules.views",
    "EvalView": "data_modules.views",
    "finish_views": "data_modules.views",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> object:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'data_modules' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
