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
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule, Trainer
from torch import Tensor

from data_modules.pipeline import make_eval_loader
from data_modules.views import EvalView
from vlp_lightning.callbacks.features import EvaluationCallback, encode_across_ranks, module_device


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


class ZeroShotSegmentation(EvaluationCallback):
    """Mean foreground IoU of prompt-patch segmentation on `shards` (images with `.mask.png`), logged as
    `promptseg/<name>/miou@<threshold>` for each threshold and `promptseg/<name>/miou_best`.

    Args:
        shards: evaluation shard pattern whose samples carry a `.mask.png` foreground mask.
        thresholds: cosine-similarity thresholds to segment at (module doc).
        name: metric prefix.
        max_samples: score the first this many images (None: all).
        every_n_epochs, batch_size, num_workers: see `EvaluationCallback`.
    """

    def __init__(
        self,
        shards: str,
        thresholds: tuple[float, ...] = (0.2, 0.4, 0.6, 0.8),
        name: str = "seg",
        max_samples: int | None = None,
        every_n_epochs: int = 1,
        batch_size: int = 64,
        num_workers: int = 0,
    ) -> None:
        super().__init__(every_n_epochs=every_n_epochs, batch_size=batch_size, num_workers=num_workers)
        if not thresholds:
            raise ValueError("ZeroShotSegmentation needs at least one threshold")
        self.shards = shards
        self.thresholds = tuple(thresholds)
        self.name = name
        self.max_samples = max_samples

    def evaluate(self, trainer: Trainer, method: LightningModule) -> dict[str, float]:
        device = module_device(method)
        mean, std = method.train_views().normalization  # as `extract_features`: the statistics the tower trained on
        loader = make_eval_loader(self.shards, method.image_size, self.batch_size, num_workers=self.num_workers,
                                  view=EvalView(mean=mean, std=std), device=device)
        masks: list[Tensor] = []
        grid: list[tuple[int, int]] = []

        def batches() -> Iterator[tuple[Tensor, int]]:
            seen = 0
            for batch in loader:
                if "mask" not in batch:
                    raise ValueError(f"ZeroShotSegmentation: the shards {self.shards!r} have no .mask.png member")
                rows = len(batch["__key__"]) if self.max_samples is None else min(
                    len(batch["__key__"]), self.max_samples - seen)
                if rows <= 0:
                    return
                masks.append(batch["mask"][:rows])
                seen += rows
                yield batch["image"][:rows], rows

        def encode(images: Tensor) -> Tensor:
            features = method.patch_features(images.to(device))  # [n, L, D]
            if not grid:
                patch_size = getattr(getattr(method, "vision", None), "patch_size", None)
                grid.append(_grid_of(features.shape[1], images.shape[-1], patch_size))
            return features.flatten(1)

        flat = encode_across_ranks(encode, batches())
        all_masks = torch.cat(masks)
        (patch_grid,) = grid
        features = flat.view(len(all_masks), patch_grid[0] * patch_grid[1], -1)
        has_object = all_masks.flatten(1).any(dim=1)
        all_masks, features = all_masks[has_object], features[has_object]
        similarity = prompt_similarity_maps(features, prompt_patches(all_masks, patch_grid), patch_grid,
                                            all_masks.shape[-1])
        metrics = {f"miou@{t:g}": foreground_iou(similarity, all_masks, t).mean().item() for t in self.thresholds}
        metrics["miou_best"] = max(metrics.values())
        return {f"promptseg/{self.name}/{metric}": value for metric, value in metrics.items()}


def _grid_of(num_patches: int, size: int, patch_size: int | None) -> tuple[int, int]:
    """The (rows, columns) of `num_patches` tokens of a square `size` image (a ViT's patches, a CNN's map)."""
    side = size // patch_size if patch_size else round(num_patches**0.5)
    if side * side != num_patches:
        raise ValueError(f"{num_patches} patch features do not form a square grid for {size} px images")
    return side, side
