"""MMC's zero-shot segmentation from a prompt patch (`ZeroShotSegmentation`) on generated shards whose
`.mask.png` members are exact: the evaluation loader hands the masks over cropped as the images, features that
separate object and background segment it exactly, features that do not segment everything."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch
from PIL import Image

from data_modules.pipeline import make_eval_loader
from data_modules.views import SingleCrop, Views
from vlp_lightning.callbacks import ZeroShotSegmentation
from vlp_lightning.callbacks.zero_shot_segmentation import prompt_patches
from vlp_lightning.methods.base import VLPMethod
from vlp_lightning.modules.masking import patchify

SIZE, PATCH = 32, 8


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def masked_shards(tmp_path, write_tar):
    """8 images of a red, patch-aligned rectangle on blue, with its exact mask; returns (pattern, masks)."""
    rng = random.Random(0)
    samples, masks = [], []
    for index in range(8):
        top, left = rng.randrange(3) * PATCH, rng.randrange(3) * PATCH
        height, width = rng.randint(1, 4 - top // PATCH) * PATCH, rng.randint(1, 4 - left // PATCH) * PATCH
        mask = np.zeros((SIZE, SIZE), dtype=bool)
        mask[top : top + height, left : left + width] = True
        image = np.zeros((SIZE, SIZE, 3), dtype=np.uint8)
        image[..., 2] = 255
        image[mask] = (255, 0, 0)
        samples.append({"__key__": f"k{index:03d}", "png": png(image), "mask.png": png(mask.astype(np.uint8) * 255)})
        masks.append(mask)
    write_tar(tmp_path / "eval-000000.tar", samples)
    return str(tmp_path / "eval-000000.tar"), torch.from_numpy(np.stack(masks))


class PatchPixels(VLPMethod):
    """No weights to train: each patch's feature is its pixels (`constant`: every patch the same feature)."""

    def __init__(self, constant: bool = False) -> None:
        super().__init__()
        self.constant = constant
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # a parameter, so the callback finds a device

    @property
    def image_size(self) -> int:
        return SIZE

    def train_views(self) -> Views:
        return SingleCrop()

    def patch_features(self, images):
        features = patchify(images, PATCH)  # [N, 16, 3*8*8]
        return torch.ones_like(features) if self.constant else features


def test_eval_loader_hands_over_the_masks_cropped_as_the_images(masked_shards):
    pattern, masks = masked_shards
    batches = list(make_eval_loader(pattern, SIZE, batch_size=3))
    assert torch.equal(torch.cat([batch["mask"] for batch in batches]), masks)
    # a 16 px evaluation crop of a 32 px image: the mask follows the image's geometry (nearest resize)
    (small,) = list(make_eval_loader(pattern, 16, batch_size=8))
    assert torch.equal(small["mask"], masks[:, ::2, ::2])


def test_prompt_is_a_patch_on_the_object(masked_shards):
    _, masks = masked_shards
    prompts = prompt_patches(masks, (4, 4))
    on_object = masks[:, ::PATCH, ::PATCH].flatten(1)  # [N, 16]: the top-left pixel of each patch
    assert on_object[torch.arange(len(masks)), prompts].all()


def test_separating_features_segment_the_object_exactly_and_uniform_ones_do_not(masked_shards):
    pattern, masks = masked_shards
    callback = ZeroShotSegmentation(pattern, thresholds=(0.5, 0.9), name="toy", batch_size=3)
    exact = callback.evaluate(None, PatchPixels())
    assert exact == {"promptseg/toy/miou@0.5": 1.0, "promptseg/toy/miou@0.9": 1.0, "promptseg/toy/miou_best": 1.0}
    uniform = callback.evaluate(None, PatchPixels(constant=True))  # everything is as similar as the prompt
    expected = masks.flatten(1).float().mean(dim=1).mean().item()  # IoU of "all foreground" = object area share
    assert uniform["promptseg/toy/miou_best"] == pytest.approx(expected) and expected < 0.5


def test_shards_without_masks_name_the_missing_member(make_shards, tmp_path):
    shards = make_shards(tmp_path / "plain", n=4, per_shard=4, image_size=SIZE)
    with pytest.raises(ValueError, match=r"no \.mask\.png member"):
        ZeroShotSegmentation(shards.pattern).evaluate(None, PatchPixels())
