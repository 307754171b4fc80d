"""What the view-based self-supervised methods share: their tiny default backbone, BYOL's two-view augmentation,
the check of their views and the one-batch forward of both views."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from data_modules.views import TwoCrops
from vlp_lightning.modules.vision import VisionEncoder




def expect_views(batch: dict, count: int, method: str, views: str) -> list[Tensor]:
    """`batch["image"]` as a list of `count` view tensors, or one sentence naming what came and the fix."""
    images = batch["image"]
    if isinstance(images, Tensor) or len(images) != count:
        found = "one image tensor" if isinstance(images, Tensor) else f"{len(images)} views"
        raise ValueError(
            f"{method} expects `image` as a list of {count} views but got {found}; let the data module use "
            f"{method}.train_views() ({views}) or set matching views"
        )
    return list(images)


def byol_views(vision: VisionEncoder) -> TwoCrops:
    """BYOL's asymmetric two-crop augmentation (Grill et al. 2020, Table 6), which MoCo v3, Barlow Twins and VICReg
    adopt: crops of scale 0.08-1, colour jitter p 0.8, grayscale 0.2, blur 1.0 / 0.1, solarisation 0.0 / 0.2
    (jitter strength 0.5: brightness / contrast 0.4, hue 0.1; saturation 0.4 where the paper has 0.2, since
    `Augment` takes one strength for the three), normalised with the tower's statistics."""
    return TwoCrops(
        scale=(0.08, 1.0), color_jitter=0.5, grayscale_prob=0.2, blur_prob=1.0, second_blur_prob=0.1,
        solarize_prob=0.0, second_solarize_prob=0.2, mean=vision.mean, std=vision.std,
    )


def two_view_embeddings(batch: dict, method: str, network: Callable[[Tensor], Tensor]) -> tuple[Tensor, Tensor]:
    """Both views of a TwoCrops batch through `network` as one batch (BatchNorm sees both), split back: ([N, D],
    [N, D])."""
    views = expect_views(batch, 2, method, "TwoCrops")
    view_a, view_b = network(torch.cat(views)).split(len(views[0]))
    return view_a, view_b
