"""What the view-based self-supervised methods share: their tiny default backbone and the check of their views."""

from __future__ import annotations

from torch import Tensor

from vlp_lightning.modules.vision import VisionEncoder


def tiny_vit(dynamic_img_size: bool = False) -> VisionEncoder:
    """The constructor default: a 2-block ViT of width 64 on 32 px images, 8 px patches (a CPU step in
    milliseconds); recipes pass the paper's backbone (ResNet-50, ViT-S/16, ...)."""
    return VisionEncoder(
        "vit_tiny_patch16_224",
        img_size=32,
        patch_size=8,
        width=64,
        depth=2,
        num_heads=2,
        dynamic_img_size=dynamic_img_size,
    )


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
