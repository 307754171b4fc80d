"""Barlow Twins: self-supervised learning via redundancy reduction (Zbontar et al. 2021).

Two crops go through the backbone and a projector (three linear layers of 8192, BN-ReLU between them, sec. 2 and
"Implementation details"); the cross-correlation matrix of the two batch-standardised embeddings over the global
batch is pushed to the identity, Σ (1 - C_ii)² + λ Σ_{i≠j} C_ij² with λ = 5e-3 (eq. 1-2, `barlow_twins_loss`).
The paper trains with LARS, lr 0.2 for weights and 0.0048 for biases and BN at batch 2048, weight decay 1.5e-6,
biases and BN excluded from LARS adaptation and weight decay, and BYOL's augmentation.
"""

from __future__ import annotations

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor

from data_modules.views import Views
from vlp_lightning.catalog import Paper
from vlp_lightning.losses.redundancy_reduction import barlow_twins_loss
from vlp_lightning.methods.base import VLPMethod, WarmupCosineLR
from vlp_lightning.methods.self_supervised.common import byol_views, two_view_embeddings
from vlp_lightning.modules.heads import MLPHead
from vlp_lightning.modules.vision import VisionEncoder, tiny_vit


class BarlowTwins(VLPMethod):
    """Make the cross-correlation of two views' embeddings the identity.

    Args:
        vision: backbone (default: a tiny 2-block ViT at 32 px; ResNet-50 in the paper).
        projection_dim: width of every projector layer (8192).
        projector_layers: linear layers of the projector (3).
        redundancy_weight: λ (5e-3).
        gather: cross-correlation over the batch of every rank (the paper's global batch).
    """

    paper = Paper("Barlow Twins: Self-Supervised Learning via Redundancy Reduction", "Zbontar et al.", 2021)
    family = "redundancy reduction"
    view_kind = "two crops"

    def __init__(
        self,
        vision: VisionEncoder | None = None,
        projection_dim: int = 64,
        projector_layers: int = 3,
        redundancy_weight: float = 5e-3,
        gather: bool = True,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = WarmupCosineLR,
        compile: bool = False,
    ) -> None:
        super().__init__(optimizer=optimizer, lr_scheduler=lr_scheduler, compile=compile)
        self.save_hyperparameters(ignore=["vision", "optimizer", "lr_scheduler"])
        self.vision = vision or tiny_vit()
        self.projector = MLPHead(
            self.vision.num_features, projection_dim, projection_dim, layers=projector_layers, norm="bn"
        )
        self.redundancy_weight = redundancy_weight
        self.gather = gather

    def train_views(self) -> Views:
        """BYOL's augmentation (the paper's "Image augmentations"): scale 0.08-1, blur 1.0 / 0.1, solarise 0 / 0.2."""
        return byol_views(self.vision)

    def forward_loss(self, batch: dict) -> dict[str, Tensor]:
        view_a, view_b = two_view_embeddings(batch, "BarlowTwins", lambda images: self.projector(self.vision(images)))
        return {"loss": barlow_twins_loss(view_a, view_b, self.redundancy_weight, gather=self.gather)}
