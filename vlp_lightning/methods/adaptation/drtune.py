"""DR-Tune: fine-tuning with Distribution Regularisation and semantic calibration (Zhou et al. 2023, "DR-Tune:
Improving Fine-tuning of Pretrained Visual Models by Distribution Regularization with Semantic Calibration", ICCV).

The whole image tower is fine-tuned (a trainable copy of the pretrained one) with a linear head (`finetune.FineTune`,
whose vanilla fine-tuning this regularises); the pretrained tower stays frozen and supplies a second feature
distribution that the head must also classify. Queues of K = 2048 keep the recent downstream features f_d,
pretrained features f_p and labels y (one first-in-first-out `MemoryBank` shared by every rank). Each step
(official `weeknan/DR-Tune`, `model.py`):

    L = CE(h([f_d(x) ; SC(F_p)]), [y ; y_Q])      one cross-entropy over the batch and the calibrated queue

so the regulariser reaches the encoder only through the head it shapes (DR, sec. 3.2). Semantic calibration SC
(sec. 3.3) moves the pretrained features towards the downstream ones before the head sees them:

1. both queues L2-normalised; every 10th step a global rotation R (Kabsch / orthogonal Procrustes on the centred
   queues: S = X_p^T X_d = U Σ V^T, R = V U^T with the determinant fixed to +1) is applied to the pretrained features,
2. per class c, the pretrained features are shifted by (μ_d,c - μ_p,c): μ_p,c their class mean, μ_d,c the
   confidence-weighted mean of the class's downstream features, Σ_i softmax_i(f_i · ŵ_c) f_i with ŵ_c the head's
   normalised class weight,
3. renormalised and scaled to the mean norm of the batch's downstream features.

Calibration runs without gradient. Until the queue is full only its filled part is used (the official code fills it
with a warm-up pass first). `regularize=False` is vanilla fine-tuning: the baseline of the paper's tables.

Paper setting (official `configs/cifar10_k2048_lr001.yaml`): ResNet-50 MoCo v2, SGD Nesterov momentum 0.9, weight
decay 1e-4, lr 0.01 (backbone) and 0.33 (head), cosine, 100 epochs, batch 64, random resized crop (0.4, 1) + flip.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor

from vlp_lightning.catalog import Paper
from vlp_lightning.distributed import world_size
from vlp_lightning.methods.adaptation.finetune import FineTune
from vlp_lightning.methods.base import WarmupCosineLR
from vlp_lightning.modules.memory_bank import MemoryBank

ROTATION_EVERY = 10


def procrustes_rotation(source: Tensor, target: Tensor) -> Tensor:
    """The rotation R [D, D] (det +1) minimising ||R x_i - y_i|| over centred rows of `source` x and `target` y."""
    x, y = source - source.mean(0), target - target.mean(0)
    u, _, vh = torch.linalg.svd(x.T @ y)
    v = vh.T
    if torch.det(v @ u.T) < 0:
        v = torch.cat([v[:, :-1], -v[:, -1:]], dim=1)
    return v @ u.T


def semantic_calibration(pretrained: Tensor, downstream: Tensor, labels: Tensor, head_weight: Tensor,
                         rotate: bool, scale: Tensor) -> Tensor:
    """SC (module doc, steps 1-3) of the pretrained queue features [K, D] given the downstream ones [K, D]."""
    pretrained, downstream = F.normalize(pretrained, dim=1), F.normalize(downstream, dim=1)
    if rotate:
        rotation = procrustes_rotation(pretrained, downstream)
        pretrained = (pretrained - pretrained.mean(0)) @ rotation.T
    weights = F.normalize(head_weight, dim=1)
    calibrated = pretrained.clone()
    for label in labels.unique():
        rows = labels == label
        confidence = torch.softmax(downstream[rows] @ weights[label], dim=0)  # [n_c]
        shift = (confidence[:, None] * downstream[rows]).sum(0) - pretrained[rows].mean(0)
        calibrated[rows] = pretrained[rows] + shift
    return F.normalize(calibrated, dim=1) * scale


class DRTune(FineTune):
    """Fine-tune a pretrained image tower with distribution regularisation (module doc).

    Args:
        pretrained: checkpoint of any suite method (its `vision` tower and `probe_features` layer are used).
        classnames / classnames_from / label_field: the classes (`adaptation.base.ClassNames`).
        queue_size: K, features kept (2048; a multiple of the global batch).
        regularize: False trains the vanilla fine-tuning baseline (cross-entropy on the batch only).
        head_lr: the head's learning rate (0.33 in the paper; the optimizer's lr is the backbone's).
        pretrained_config, crop_scale, optimizer, lr_scheduler, compile: see `AdaptationMethod`.
    """

    paper = Paper("DR-Tune: Improving Fine-tuning of Pretrained Visual Models by Distribution Regularization with "
                  "Semantic Calibration", "Zhou et al.", 2023)

    def __init__(
        self,
        pretrained: str,
        classnames: list[str] | None = None,
        classnames_from: str | None = None,
        label_field: str = "cls",
        queue_size: int = 2048,
        regularize: bool = True,
        head_lr: float | None = None,
        pretrained_config: str | None = None,
        crop_scale: tuple[float, float] = (0.4, 1.0),
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = WarmupCosineLR,
        compile: bool = False,
    ) -> None:
        super().__init__(pretrained, classnames, classnames_from, label_field, backbone_lr_scale=1.0,
                         head_norm=False, head_init_std=0.01, pretrained_config=pretrained_config,
                         crop_scale=crop_scale, optimizer=optimizer, lr_scheduler=lr_scheduler, compile=compile)
        dim = self.feature_dim
        self.regularize = regularize
        self.head_lr = head_lr
        self.queue = MemoryBank(queue_size, 2 * dim + 1)  # [f_d ; f_p ; y] per row
        self.register_buffer("queue_filled", torch.zeros((), dtype=torch.long))

    def parameter_groups(self) -> list[dict]:
        """The base's groups, the head's in groups of its own at `head_lr` (when set)."""
        return self.parameter_groups_at(self.head_lr, [self.head])

    def forward_loss(self, batch: dict) -> dict[str, Tensor]:
        labels = self.classes.labels(batch).to(self.device)
        images = batch["image"]
        features = self.encoder(images)  # [N, D]
        logits = self.head(features)
        outputs = {"accuracy": (logits.argmax(1) == labels).float().mean()}
        if not (self.regularize and self.training):  # evaluation scores the fine-tuned model alone
            return {"loss": F.cross_entropy(logits.float(), labels), **outputs}
        with torch.no_grad():
            pretrained = self.pretrained.vision(images)  # f_p: the same tower, frozen
        filled = int(self.queue_filled)
        if filled:
            rows = self.queue.bank[:filled]
            dim = self.feature_dim
            queued_down, queued_pre, queued_labels = rows[:, :dim], rows[:, dim:2 * dim], rows[:, -1].long()
            with torch.no_grad():
                calibrated = semantic_calibration(
                    queued_pre.float(), queued_down.float(), queued_labels, self.head.weight.float(),
                    rotate=self.global_step % ROTATION_EVERY == 0, scale=features.detach().norm(dim=1).mean(),
                )
            logits = torch.cat([logits, self.head(calibrated.to(features.dtype))])
            labels = torch.cat([labels, queued_labels])
        loss = F.cross_entropy(logits.float(), labels)
        own = labels[: len(features), None].to(features.dtype)
        self.queue.enqueue(torch.cat([features.detach(), pretrained.to(features.dtype), own], dim=1))
        self.queue_filled.fill_(min(self.queue.size, filled + len(features) * world_size()))
        return {"loss": loss, **outputs, "queue_filled": self.queue_filled.float()}

