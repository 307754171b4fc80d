"""Worst-group accuracy: the metric of the spurious-correlation literature (Sagawa et al. 2020, sec. 2; FFR, Qraitem
et al. 2024, "worst group accuracy" and "balanced accuracy" in its `utils.compute_stats`).

A group is a (class, spurious attribute) pair, read from an integer field of each sample's `.json` (`group`, as
`vlp-data ffr` writes it, named by the manifest's `classnames.group`). On a labelled shard set the callback scores
any method with `classify(images) -> logits [N, C]` (FFR, the classification adaptation methods) and logs, under
`groups/<name>/`:

- `worst`: the lowest accuracy of a group (groups without samples are left out),
- `balanced`: the mean of the group accuracies (FFR's "balanced accuracy"),
- `average`: the accuracy over all samples (equal to `balanced` on a set with equally many samples per group),
- `group/<group name>`: each group's accuracy.
"""

from __future__ import annotations

import torch
from lightning.pytorch import LightningModule, Trainer
from torch import Tensor

from data_modules.pipeline import batch_labels
from vlp_lightning.callbacks.features import EvaluationCallback, encode_across_ranks, method_eval_loader, module_device


def group_accuracies(predictions: Tensor, labels: Tensor, groups: Tensor, num_groups: int) -> tuple[Tensor, Tensor]:
    """Per-group accuracy [G] (NaN for a group without samples) and sample counts [G] of `predictions` [N] against
    `labels` [N], `groups` [N] the group index of each sample."""
    if groups.numel() and (int(groups.min()) < 0 or int(groups.max()) >= num_groups):
        raise ValueError(f"group indices must lie in [0, {num_groups}), got {groups.min().item()}..."
                         f"{groups.max().item()}; name every group of the data in group_names")
    counts = torch.bincount(groups, minlength=num_groups).float()
    correct = torch.bincount(groups, weights=(predictions == labels).float(), minlength=num_groups)
    return torch.where(counts > 0, correct / counts.clamp(min=1), torch.full_like(counts, float("nan"))), counts


def group_metrics(predictions: Tensor, labels: Tensor, groups: Tensor, group_names: list[str]) -> dict[str, float]:
    """`worst`, `balanced`, `average` and `group/<name>` accuracies (module doc)."""
    accuracy, counts = group_accuracies(predictions, labels, groups, len(group_names))
    present = counts > 0
    if not present.any():
        raise ValueError("worst-group accuracy needs at least one sample")
    metrics = {"worst": float(accuracy[present].min()), "balanced": float(accuracy[present].mean()),
               "average": float((predictions == labels).float().mean())}
    metrics.update({f"group/{name}": float(accuracy[index]) for index, name in enumerate(group_names)
                    if present[index]})
    return metrics


class GroupAccuracy(EvaluationCallback):
    """Worst-group, balanced and per-group accuracy of `classify` on a labelled shard set (module doc).

    Args:
        shards: shard pattern with `.cls` labels and the group in `.json`.
        name: metric prefix (`groups/<name>/...`), e.g. val or test.
        group_names: one name per group; None reads `classnames[group_field]` from the shards' manifest.
        group_field: the integer `.json` field holding the group.
        label_field: `cls` or an integer field of the samples' `.json`.
        every_n_epochs, batch_size, num_workers: see `EvaluationCallback` (1: also after every fit epoch, so a
            `ModelCheckpoint` can monitor `groups/val/worst`, FFR's model selection).
    """

    def __init__(
        self,
        shards: str,
        name: str = "val",
        group_names: list[str] | None = None,
        group_field: str = "group",
        label_field: str = "cls",
        every_n_epochs: int = 1,
        batch_size: int = 64,
        num_workers: int = 0,
    ) -> None:
        super().__init__(every_n_epochs=every_n_epochs, batch_size=batch_size, num_workers=num_workers)
        if group_names is None:
            from vlp_lightning.callbacks.zero_shot import read_classnames

            group_names = read_classnames(shards, group_field)
        self.shards, self.name, self.group_names = shards, name, list(group_names)
        self.group_field, self.label_field = group_field, label_field

    def evaluate(self, trainer: Trainer, method: LightningModule) -> dict[str, float]:
        if not hasattr(method, "classify"):
            self.warn_once(f"GroupAccuracy skipped: {type(method).__name__} has no classify(images)")
            return {}
        loader, _ = method_eval_loader(method, self.shards, self.batch_size, self.num_workers)
        device = module_device(method)
        labels: list[Tensor] = []
        groups: list[Tensor] = []

        def batches():
            for batch in loader:
                labels.append(batch_labels(batch, self.label_field))
                groups.append(batch_labels(batch, self.group_field))
                yield batch["image"], len(batch["__key__"])

        logits = encode_across_ranks(lambda images: method.classify(images.to(device)).float(), batches())
        if not labels:
            raise ValueError(f"GroupAccuracy: {self.shards} holds no samples")
        metrics = group_metrics(logits.argmax(1), torch.cat(labels), torch.cat(groups), self.group_names)
        return {f"groups/{self.name}/{key}": value for key, value in metrics.items()}
