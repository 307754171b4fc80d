"""Fashion-MNIST (Xiao et al., 2017) from the Debian package `dataset-fashion-mnist`.

The package holds the four gzipped IDX files of the official release: 60,000 training and 10,000 test images,
28x28 grayscale, 10 classes, MIT licence (Zalando SE). The official test set stays the split `test`; `--split`
divides the official training set. Captions are the class name in a prompt ("a photo of a trouser.") so the same
shards serve CLIP-style training and zero-shot evaluation with the manifest classnames.
"""

from __future__ import annotations

import gzip
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image

from data_modules.sources import Record, SourceData, SourceError

DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")
CLASSNAMES = ["t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"]
_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_IDX_UNSIGNED_BYTE = 0x08


def read_idx(path: Path) -> np.ndarray:
    """Read a gzipped IDX file (LeCun's MNIST format): magic `00 00 08 ndim`, big-endian dims, then uint8 data."""
    data = gzip.decompress(path.read_bytes())
    if data[0] != 0 or data[1] != 0 or data[2] != _IDX_UNSIGNED_BYTE:
        raise SourceError(f"{path} is not an IDX file of unsigned bytes")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * axis : 8 + 4 * axis], "big") for axis in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def fashion_mnist_source(root: Path, caption_template: str) -> SourceData:
    """Both official splits; training samples are left to `--split`, test samples stay in `test`."""
    missing = [name for files in _FILES.values() for name in files if not (root / name).is_file()]
    if missing:
        raise SourceError(
            f"Fashion-MNIST is not in {root} (missing {', '.join(missing)}); "
            "install it with: apt-get install dataset-fashion-mnist"
        )
    records = []
    for split, (image_file, label_file) in _FILES.items():
        images, labels = read_idx(root / image_file), read_idx(root / label_file)
        if len(images) != len(labels):
            raise SourceError(f"{image_file} has {len(images)} images but {label_file} has {len(labels)} labels")
        image_path = root / image_file
        for index, (image, label) in enumerate(zip(images, labels)):
            records.append(
                Record(
                    key=f"{split}_{index:05d}",
                    open_image=partial(Image.fromarray, image),
                    origin=f"{image_path}[{index}]",
                    caption=caption_template.format(CLASSNAMES[label]),
                    label=int(label),
                    split="test" if split == "test" else None,
                )
            )
    return SourceData(
        name=f"fashion-mnist:{root}",
        licence="MIT (Fashion-MNIST, Copyright 2017 Zalando SE)",
        records=records,
        inputs=[root / name for files in _FILES.values() for name in files],
        classnames={"cls": list(CLASSNAMES)},
    )
