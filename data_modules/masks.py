"""Foreground masks: the `<key>.mask.png` member (a greyscale or palette PNG, non-zero = foreground, as `vlp-data`
would keep an alpha channel), decoded and cropped as the image of the same sample is.

Only deterministic crops are supported (the `EvalView` centre crop): a mask scores a prediction on the very pixels
the model saw, so it must follow the image's geometry exactly; nearest-neighbour resizing keeps it binary.
"""

from __future__ import annotations

import io

import cv2
import numpy as np
from PIL import Image

from data_modules.views import Crop

#: the member name of a sample's foreground mask in a shard.
MASK_MEMBER = "mask.png"


def encode_alpha_mask(image: Image.Image, size: tuple[int, int]) -> bytes:
    """The alpha channel of `image` at `size` as a greyscale PNG (an image without alpha: all foreground).

    The alpha is kept as it is, edges included, rather than thresholded: `decode_mask` takes non-zero as
    foreground, and a soft matte stays available to whoever wants it. It is resized with the filter the builder
    resizes the image with, so mask and image share their geometry pixel for pixel.
    """
    alpha = image.convert("RGBA").getchannel("A")
    if alpha.size != size:
        alpha = alpha.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    buffer = io.BytesIO()
    alpha.save(buffer, format="PNG")
    return buffer.getvalue()


def decode_mask(data: bytes) -> np.ndarray:
    """PNG bytes -> bool [H, W], True where the mask is non-zero (the alpha channel where it has one)."""
    with Image.open(io.BytesIO(data)) as image:
        if image.format != "PNG":
            raise ValueError(f"a mask must be a PNG, got {image.format}")
        channels = image.getchannel("A") if "A" in image.getbands() else image.convert("L")
        return np.asarray(channels) > 0


def crop_mask(mask: np.ndarray, crop: Crop) -> np.ndarray:
    """bool [H, W] -> bool [size, size]: the region of the deterministic `crop` (`scale=None`), nearest-resized."""
    if crop.scale is not None or crop.affine is not None:
        raise ValueError("masks follow deterministic crops only (an EvalView), not random resized crops or affines")
    height, width = mask.shape
    top, left, crop_height, crop_width = crop.box(width, height, rng=None)
    region = mask[top : top + crop_height, left : left + crop_width].astype(np.uint8)
    if region.shape != (crop.size, crop.size):
        region = cv2.resize(region, (crop.size, crop.size), interpolation=cv2.INTER_NEAREST)
    return region.astype(bool)
