"""Full fine-tuning of a pretrained image tower with a classification head: BenchX's unified classification
protocol (Zhou et al. 2024, "BenchX: A Unified Benchmark Framework for Medical Vision-Language Pretraining on Chest
X-Rays", sec. 3.3), and the vanilla baseline DR-Tune regularises (`drtune.py` builds on this class).

A trainable copy of the pretrained method's image tower f (its pooled features, `vision(x)`) feeds a head

    logits = W LN(f(x)) + b,      L = CE(logits, y)

with LN the LayerNorm of the official `Classifier(use_fc_norm=True)` (`unifier/blocks/classifier/classifier.py`;
`head_norm: false` drops it) and W drawn from a truncated normal of std 2e-5 (`trunc_init`), b = 0. BenchX trains the
whole model and puts the image encoder at a tenth of the head's learning rate (`optim_groups: ve_only`,
`lr_multiplier_ve: 0.1` in its configs: `backbone_lr_scale`); the learning rate itself is searched per model and
dataset (`vlp benchx`). The official configs: Adam (eps 1e-8), warm-up cosine (50 warm-up steps of 3,000), gradient
clipping at norm 1, batch 32-128, mixed precision, random resized crops + flips for training and resize + centre
crop for evaluation, early stopping on the validation metric. The pretrained method itself stays frozen (its text
tower, and the original image tower, which kNN / probes of `pretrained` still read).
"""

from __future__ import annotations

import copy

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from vlp_lightning.catalog import Paper
from vlp_lightning.methods.adaptation.base import AdaptationMethod, ClassNames
from vlp_lightning.methods.base import WarmupCosineLR


class FineTune(AdaptationMethod):
    """Fine-tune a pretrained image tower with a (LayerNorm +) linear head (module doc).

    Args:
        pretrained: checkpoint of any suite method (its `vision` tower is copied and trained).
        classnames / classnames_from / label_field: the classes (`adaptation.base.ClassNames`).
        backbone_lr_scale: the tower's learning rate as a fraction of the optimizer's (the head's); BenchX 0.1.
        head_norm: a LayerNorm (eps 1e-6) before the linear layer (BenchX's `use_fc_norm`).
        head_init_std: std of the head's truncated-normal initial weights (BenchX 2e-5).
        pretrained_config, crop_scale, optimizer, lr_scheduler, compile: see `AdaptationMethod`.
    """

    paper = Paper("BenchX: A Unified Benchmark Framework for Medical Vision-Language Pretraining on Chest X-Rays",
                  "Zhou et al.", 2024, "its unified fine-tuning protocol for classification")

    def __init__(
        self,
        pretrained: str,
        classnames: list[str] | None = None,
        classnames_from: str | None = None,
        label_field: str = "cls",
        backbone_lr_scale: float = 0.1,
        head_norm: bool = True,
        head_init_std: float = 2e-5,
        pretrained_config: str | None = None,
        crop_scale: tuple[float, float] = (0.08, 1.0),
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = WarmupCosineLR,
        compile: bool = False,
    ) -> None:
        super().__init__(pretrained, pretrained_config, crop_scale, optimizer, lr_scheduler, compile)
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        if not 0 < backbone_lr_scale <= 1:
            raise ValueError(f"backbone_lr_scale must lie in (0, 1], got {backbone_lr_scale}; BenchX uses 0.1, "
                             "1 trains tower and head at one learning rate")
        self.classes = ClassNames(classnames, classnames_from, label_field, "all", type(self).__name__)
        self.encoder = copy.deepcopy(self.pretrained.vision).requires_grad_(True)  # f, fine-tuned
        self.feature_dim = dim = self.encoder.num_features
        self.head_norm = nn.LayerNorm(dim, eps=1e-6) if head_norm else nn.Identity()
        self.head = nn.Linear(dim, len(self.classes.all))
        nn.init.trunc_normal_(self.head.weight, std=head_init_std)
        nn.init.zeros_(self.head.bias)
        self.backbone_lr_scale = backbone_lr_scale

    @property
    def vision(self) -> nn.Module:
        """The fine-tuned image tower (what kNN, probes and `vlp export` read)."""
        return self.encoder

    def probe_features(self, images: Tensor) -> Tensor:
        return self.encoder(images)

    def logits(self, features: Tensor) -> Tensor:
        """The head: W LN(f) + b."""
        return self.head(self.head_norm(features))

    def classify(self, images: Tensor) -> Tensor:
        """Class logits [N, C] of the fine-tuned tower and head (what `callbacks.AdversarialRobustness` attacks)."""
        return self.logits(self.encoder(images))

    def parameter_groups(self) -> list[dict]:
        """The base's weight-decay groups, the tower's at `backbone_lr_scale` times the optimizer's learning rate."""
        return self.parameter_groups_at(None, [self.encoder], lr_multiplier=self.backbone_lr_scale)

    def forward_loss(self, batch: dict) -> dict[str, Tensor]:
        return self.classification_loss(batch)
