"""Zero-shot segmentation from a prompt patch: the evaluation protocol of MMC ("Masked Momentum Contrastive Learning
for Zero-shot Semantic Understanding", Wu et al. 2023, abstract and sec. 3).

No training and no labels beyond the foreground masks used for scoring: for each image, one patch on the object is
the prompt; the cosine similarity between the prompt's patch feature (`method.patch_features`) and every patch of the
same image is a map over the patch grid; thresholding it segments the object, and the segment is scored against the
image's foreground mask (`<key>.mask.png`, decoded and cropped with the image by the evaluation loader) by its
intersection over union, averaged over images.

What the paper's abstract fixes is the protocol (a point on the target as the prompt, the similarity map, a simple
threshold). What could not be verified from the paper text available here, and is chosen as follows:

* the prompt: the patch with the largest foreground fraction, the nearest to the mask's centroid among ties (a
  point surely on the object; the paper's sampling of the point is not known here);
* the threshold: a sweep (`thresholds`), each logged, and the best of them (the paper's value is not known here);
* the map is compared at pixel resolution with every pixel taking its patch's similarity (nearest-neighbour
  upsampling, so a patch-aligned object can be segmented exactly).

On scene shards (`vlp-data scenes`: `.instances.png` and `.json` objects, no foreground mask) every object instance
of every image is a target of its own (`targets="instances"`): its prompt is a patch on that instance, the map is
the similarity to it over the whole image, and the segment is scored against that instance's mask alone, so the
other objects of the scene count as background; the mean is over instances. A ViT whose patches only tell
"object" from "background" therefore scores well on one-object scenes and poorly on crowded ones, which is the
intra- vs inter-object discrimination the paper measures next to the segmentation (abstract).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule, Trainer
from torch import Tensor

from vlp_lightning.callbacks.features import (
    EvaluationCallback,
    encode_patches,
    has_patch_features,
    method_eval_loader,
)


def prompt_patches(masks: Tensor, grid: tuple[int, int]) -> Tensor:
    """Foreground masks [N, S, S] -> the prompt patch of each image [N], row-major on the `grid` (module doc)."""
    fraction = F.adaptive_avg_pool2d(masks.float().unsqueeze(1), grid).flatten(1)  # [N, h*w]
    rows = torch.arange(grid[0]).repeat_interleave(grid[1]).float() + 0.5
    columns = torch.arange(grid[1]).repeat(grid[0]).float() + 0.5
    weights = fraction / fraction.sum(dim=1, keepdim=True).clamp_min(1e-12)
    centroid_row, centroid_column = weights @ rows, weights @ columns  # [N]
    distance = (rows - centroid_row[:, None]) ** 2 + (columns - centroid_column[:, None]) ** 2  # [N, h*w]
    fullest = fraction >= fraction.max(dim=1, keepdim=True).values - 1e-6
    return distance.masked_fill(~fullest, float("inf")).argmin(dim=1)


def prompt_similarity_maps(patch_features: Tensor, prompts: Tensor, grid: tuple[int, int], size: int) -> Tensor:
    """Patch features [N, h*w, D] and prompt indices [N] -> cosine similarity to the prompt, per pixel [N, S, S]."""
    features = F.normalize(patch_features.float(), dim=-1)
    prompt = features[torch.arange(len(features)), prompts]  # [N, D]
    similarity = torch.einsum("nld,nd->nl", features, prompt).view(-1, 1, *grid)
    return F.interpolate(similarity, size=(size, size), mode="nearest").squeeze(1)


def foreground_iou(similarity: Tensor, masks: Tensor, threshold: float) -> Tensor:
    """IoU [N] of the segment `similarity >= threshold` with each foreground mask [N, S, S]."""
    predicted, masks = similarity >= threshold, masks.bool()
    intersection = (predicted & masks).flatten(1).sum(dim=1)
    union = (predicted | masks).flatten(1).sum(dim=1)
    return intersection / union.clamp_min(1)


#: what a target is: the image's foreground (`.mask.png`), each object instance (`.instances.png`), or whichever
#: the shards hold (the foreground mask when both).
Targets = Literal["auto", "foreground", "instances"]


class ZeroShotSegmentation(EvaluationCallback):
    """Mean IoU of prompt-patch segmentation on `shards`, over images (foreground masks, `.mask.png`) or over object
    instances (scene shards, `.instances.png`; module doc), logged as `promptseg/<name>/miou@<threshold>` for each
    threshold and `promptseg/<name>/miou_best`.

    Args:
        shards: evaluation shard pattern whose samples carry a `.mask.png` foreground mask or an `.instances.png`.
        thresholds: cosine-similarity thresholds to segment at (module doc).
        name: metric prefix.
        max_samples: score the first this many images (None: all).
        targets: `foreground`, `instances`, or `auto` (the foreground mask when the shards have one, else instances).
        every_n_epochs, batch_size, num_workers: see `EvaluationCallback`.
    """

    def __init__(
        self,
        shards: str,
        thresholds: tuple[float, ...] = (0.2, 0.4, 0.6, 0.8),
        name: str = "seg",
        max_samples: int | None = None,
        targets: Targets = "auto",
        every_n_epochs: int = 1,
        batch_size: int = 64,
        num_workers: int = 0,
    ) -> None:
        super().__init__(every_n_epochs=every_n_epochs, batch_size=batch_size, num_workers=num_workers)
        if not thresholds:
            raise ValueError("ZeroShotSegmentation needs at least one threshold")
        if targets not in get_args(Targets):
            raise ValueError(f"ZeroShotSegmentation targets={targets!r} must be one of {get_args(Targets)}")
        self.shards = shards
        self.thresholds = tuple(thresholds)
        self.name = name
        self.max_samples = max_samples
        self.targets = targets

    def _target_masks(self, batch: dict) -> tuple[list[Tensor], list[int]]:
        """The target masks [S, S] of a batch and the batch row of the image each belongs to."""
        kind = self.targets
        if kind == "auto":
            kind = "foreground" if "mask" in batch else "instances"
        if kind == "foreground":
            if "mask" not in batch:
                raise ValueError(f"ZeroShotSegmentation: the shards {self.shards!r} have no .mask.png member; "
                                 "score scene shards with targets='instances'")
            return list(batch["mask"]), list(range(len(batch["mask"])))
        if "masks" not in batch:
            raise ValueError(f"ZeroShotSegmentation: the shards {self.shards!r} have no .mask.png member and no "
                             ".instances.png member to take targets from")
        masks, owners = [], []
        for row, (labels, objects) in enumerate(zip(batch["masks"], batch["objects"])):
            for number in range(1, len(objects) + 1):
                masks.append(labels == number)
                owners.append(row)
        return masks, owners

    def evaluate(self, trainer: Trainer, method: LightningModule) -> dict[str, float]:
        if not has_patch_features(method):
            self.warn_once(f"ZeroShotSegmentation skipped: {type(method).__name__} has no patch_features(images)")
            return {}
        loader, _ = method_eval_loader(method, self.shards, self.batch_size, self.num_workers)
        masks: list[Tensor] = []
        owners: list[int] = []

        def batches() -> Iterator[tuple[Tensor, int]]:
            seen = 0
            for batch in loader:
                rows = len(batch["__key__"]) if self.max_samples is None else min(
                    len(batch["__key__"]), self.max_samples - seen)
                if rows <= 0:
                    return
                for mask, owner in zip(*self._target_masks(batch)):
                    if owner < rows:
                        masks.append(mask)
                        owners.append(seen + owner)
                seen += rows
                yield batch["image"][:rows], rows

        image_features, patch_grid = encode_patches(method, batches())
        if not masks:
            raise ValueError(f"ZeroShotSegmentation: the shards {self.shards!r} hold no images")
        all_masks = torch.stack(masks).bool()
        features = image_features[torch.tensor(owners)]  # [M, L, D]: the image's patches, once per target
        has_object = all_masks.flatten(1).any(dim=1)
        all_masks, features = all_masks[has_object], features[has_object]
        similarity = prompt_similarity_maps(features, prompt_patches(all_masks, patch_grid), patch_grid,
                                            all_masks.shape[-1])
        metrics = {f"miou@{t:g}": foreground_iou(similarity, all_masks, t).mean().item() for t in self.thresholds}
        metrics["miou_best"] = max(metrics.values())
        return {f"promptseg/{self.name}/{metric}": value for metric, value in metrics.items()}
