"""WebDataset DataModules, views and the `vlp-data` shard builder.

The names below load their module on first use (PEP 562), so `vlp-data` and DataLoader workers do not import
Lightning just by importing this package.
"""

from __future__ import annotations

import importlib
import os

from PIL import Image

# A backstop behind the pipeline's own header check: OpenCV refuses images above PIL's decompression-bomb limit.
# OpenCV reads the variable once, when it is imported (its default allows 2^30 pixels), so it is set here, before
# any module of this package imports cv2.
os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(2 * Image.MAX_IMAGE_PIXELS))

_EXPORTS = {
    "ImageTextDataModule": "data_modules.datamodules",
    "ImageDataModule": "data_modules.datamodules",
    "InstructionDataModule": "data_modules.datamodules",
    "VideoDataModule": "data_modules.datamodules",
    "TaskImageDataModule": "data_modules.tasks",
    "ClipViews": "data_modules.clip_views",
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
