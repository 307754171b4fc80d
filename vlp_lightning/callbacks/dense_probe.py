"""Linear semantic segmentation on frozen patch features: the dense counterpart of the linear probe.

The protocol is the linear segmentation probe of the self-supervised ViT literature (DINOv2, Oquab et al. 2023,
sec. 7.4 "linear": a linear layer on the frozen patch tokens predicts a class per patch, its logits are upsampled
to the image's resolution, and mean IoU is scored there). Here:

* **Classes.** `labels="category"`: background plus the emoji categories of the scene objects (`.json` objects'
  `category`: "Smileys & Emotion", "Food & Drink", ...), the one object class every split shares (the unseen split's
  concepts are new, their categories are not), so a probe fitted on training scenes can be scored on held-out
  concepts. `labels="foreground"`: object vs background. Each pixel's class is exact: the scene's instance mask
  (`.instances.png`, `data_modules.instances`) names the object, the object's `.json` entry its category.
* **Fit.** One class per patch, the class covering most of its pixels (ties to the lower class index, background
  first), and `linear_probe.fit_logistic_regression` on the patch features of the first `max_train_samples` scenes
  of `train_shards` (full-batch L-BFGS from zero in float64: deterministic, no seed), each feature standardised
  over the training patches (MAE's BatchNorm without affine, He et al. 2021, App. A.2).
* **Score.** At pixel resolution: the class logits of each patch of `test_shards` are upsampled to the evaluation
  crop's pixels (`upsampling="bilinear"`, DINOv2's choice: boundaries fall between patch centres by the logits, so
  they need not follow the patch grid, and even a perfect patch classifier is inexact there; `"nearest"`: every
  pixel takes its patch's class, which is exact on patch-aligned objects) and the argmax compared with the exact
  pixel classes; `miou` is torchmetrics' per-class
  Jaccard index averaged over the classes present in the targets or the predictions (a class that is neither has
  no IoU; one predicted but absent scores 0), and `pixel_accuracy` the share of pixels right.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule, Trainer
from torch import Tensor
from torchmetrics.functional.classification import multiclass_accuracy, multiclass_jaccard_index

from vlp_lightning.callbacks.features import (
    EvaluationCallback,
    encode_patches,
    has_patch_features,
    method_eval_loader,
    module_device,
)
from vlp_lightning.callbacks.linear_probe import linear_probe_scores

#: what a pixel's class is: background + the object's emoji category, or foreground vs background.
DenseLabels = Literal["category", "foreground"]
#: how patch logits become pixel logits (module doc).
Upsampling = Literal["bilinear", "nearest"]


def patch_labels(pixel_labels: Tensor, grid: tuple[int, int], num_classes: int) -> Tensor:
    """Pixel classes [N, S, S] -> the class covering most of each patch [N, rows * columns], row-major."""
    one_hot = F.one_hot(pixel_labels.long(), num_classes).permute(0, 3, 1, 2).float()  # [N, C, S, S]
    return F.adaptive_avg_pool2d(one_hot, grid).flatten(2).argmax(dim=1)


def segmentation_metrics(predicted: Tensor, target: Tensor, num_classes: int) -> dict[str, float]:
    """`miou` over the classes present in `target` or `predicted` (both [N, S, S] class indices) and
    `pixel_accuracy` (module doc)."""
    iou = multiclass_jaccard_index(predicted, target, num_classes, average="none")
    present = torch.bincount(target.flatten(), minlength=num_classes) + torch.bincount(predicted.flatten(),
                                                                                        minlength=num_classes)
    accuracy = multiclass_accuracy(predicted.flatten(), target.flatten(), num_classes, average="micro")
    return {"miou": iou[present > 0].mean().item(), "pixel_accuracy": accuracy.item()}


def dense_probe_predictions(
    train_features: Tensor,
    train_pixel_labels: Tensor,
    test_features: Tensor,
    grid: tuple[int, int],
    size: int,
    num_classes: int,
    inverse_regularization: float = 1.0,
    max_iter: int = 100,
    upsampling: Upsampling = "bilinear",
) -> Tensor:
    """Pixel classes [N_test, size, size] that a linear classifier fitted on the patches of `train_features`
    [N, L, D] (their classes from `train_pixel_labels` [N, S, S], `patch_labels`) predicts for `test_features`
    [N_test, L, D], from its logits upsampled to `size` by `upsampling` (module doc)."""
    targets = patch_labels(train_pixel_labels, grid, num_classes).flatten()
    scores = linear_probe_scores(
        train_features.flatten(0, 1), targets.to(train_features.device), test_features.flatten(0, 1), num_classes,
        inverse_regularization, max_iter, standardize=True,
    )  # [N_test * L, C]
    logits = scores.float().view(test_features.shape[0], *grid, num_classes).permute(0, 3, 1, 2)
    options = {"align_corners": False} if upsampling == "bilinear" else {}
    return F.interpolate(logits, size=(size, size), mode=upsampling, **options).argmax(dim=1).cpu()


class DenseProbe(EvaluationCallback):
    """Linear segmentation probe on frozen patch features (module doc), fitted on `train_shards`' scenes and scored
    on `test_shards`' at pixel resolution, logged as `dense_probe/<name>/miou`, `.../pixel_accuracy` and
    `.../classes` (the number of classes, background included).

    Needs a method with patch features (`patch_features`: a ViT's tokens, a CNN's map); others skip it with one
    warning.

    Args:
        train_shards: scene shard pattern to fit on (`vlp-data scenes`: `.instances.png` and `.json` objects).
        test_shards: scene shard pattern to score.
        name: metric prefix (e.g. `val`, `unseen`).
        labels: `category` (background + the objects' emoji categories) or `foreground` (object vs background).
        max_train_samples: fit on the patches of the first this many training scenes (None: all).
        max_test_samples: score the first this many test scenes (None: all).
        inverse_regularization: C of the logistic regression (`linear_probe`).
        max_iter: L-BFGS iterations at most (100 reach the optimum's mIoU to 1e-3 on the scenes).
        upsampling: `bilinear` or `nearest` patch-to-pixel upsampling of the logits (module doc).
        every_n_epochs, batch_size, num_workers: see `EvaluationCallback`.
    """

    def __init__(
        self,
        train_shards: str,
        test_shards: str,
        name: str = "scenes",
        labels: DenseLabels = "category",
        max_train_samples: int | None = 256,
        max_test_samples: int | None = None,
        inverse_regularization: float = 1.0,
        max_iter: int = 100,
        upsampling: Upsampling = "bilinear",
        every_n_epochs: int = 1,
        batch_size: int = 64,
        num_workers: int = 0,
    ) -> None:
        super().__init__(every_n_epochs=every_n_epochs, batch_size=batch_size, num_workers=num_workers)
        if labels not in get_args(DenseLabels):
            raise ValueError(f"DenseProbe labels={labels!r} must be one of {get_args(DenseLabels)}")
        if upsampling not in get_args(Upsampling):
            raise ValueError(f"DenseProbe upsampling={upsampling!r} must be one of {get_args(Upsampling)}")
        for field, value in (("max_train_samples", max_train_samples), ("max_test_samples", max_test_samples)):
            if value is not None and value < 1:
                raise ValueError(f"DenseProbe {field}={value} must be a positive number of scenes, or None for all")
        self.train_shards = train_shards
        self.test_shards = test_shards
        self.name = name
        self.labels = labels
        self.max_train_samples = max_train_samples
        self.max_test_samples = max_test_samples
        self.inverse_regularization = inverse_regularization
        self.max_iter = max_iter
        self.upsampling = upsampling

    def _scenes(self, method: LightningModule, shards: str, max_samples: int | None
                ) -> tuple[Tensor, tuple[int, int], Tensor, list[list[str]]]:
        """Patch features [N, L, D], their grid, the instance masks [N, S, S] and per scene the category of each
        object of its mask (value k + 1 = entry k) of the first `max_samples` scenes of `shards`."""
        loader, _ = method_eval_loader(method, shards, self.batch_size, self.num_workers)
        masks: list[Tensor] = []
        categories: list[list[str]] = []

        def batches() -> Iterator[tuple[Tensor, int]]:
            for batch in loader:
                if "masks" not in batch:
                    raise ValueError(f"DenseProbe: the shards {shards!r} have no .instances.png member; build scene "
                                     "shards with `vlp-data scenes data/scenes`")
                rows = len(batch["__key__"]) if max_samples is None else min(len(batch["__key__"]),
                                                                              max_samples - len(masks))
                if rows <= 0:
                    return
                masks.extend(batch["masks"][:rows])
                categories.extend([meta["objects"][index]["category"] for index in objects.tolist()]
                                  for meta, objects in zip(batch["meta"][:rows], batch["objects"][:rows]))
                yield batch["image"][:rows], rows

        features, grid = encode_patches(method, batches())
        if not masks:
            raise ValueError(f"DenseProbe: the shards {shards!r} hold no scenes")
        return features, grid, torch.stack(masks), categories

    def _pixel_labels(self, masks: Tensor, categories: list[list[str]], classes: list[str]) -> Tensor:
        """Instance masks [N, S, S] -> pixel classes [N, S, S] (0: background)."""
        if self.labels == "foreground":
            return (masks > 0).long()
        labels = torch.empty(masks.shape, dtype=torch.long)
        for row, (mask, names) in enumerate(zip(masks, categories)):
            lookup = torch.tensor([0, *(classes.index(name) for name in names)], dtype=torch.long)
            labels[row] = lookup[mask.long()]
        return labels

    def evaluate(self, trainer: Trainer, method: LightningModule) -> dict[str, float]:
        if not has_patch_features(method):
            self.warn_once(f"DenseProbe skipped: {type(method).__name__} has no patch_features(images)")
            return {}
        train, grid, train_masks, train_categories = self._scenes(method, self.train_shards, self.max_train_samples)
        test, _, test_masks, test_categories = self._scenes(method, self.test_shards, self.max_test_samples)
        names = sorted({name for scene in train_categories + test_categories for name in scene})
        classes = ["background", "object"] if self.labels == "foreground" else ["background", *names]
        device = module_device(method)
        with torch.autocast(device.type, enabled=False):
            predicted = dense_probe_predictions(
                train.to(device), self._pixel_labels(train_masks, train_categories, classes), test, grid,
                test_masks.shape[-1], len(classes), self.inverse_regularization, self.max_iter, self.upsampling,
            )
        target = self._pixel_labels(test_masks, test_categories, classes)
        metrics = segmentation_metrics(predicted, target, len(classes)) | {"classes": len(classes)}
        return {f"dense_probe/{self.name}/{metric}": value for metric, value in metrics.items()}
