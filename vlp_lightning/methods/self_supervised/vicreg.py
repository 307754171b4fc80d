"""VICReg: Variance-Invariance-Covariance Regularization (Bardes, Ponce, LeCun 2022).

Two crops go through the backbone and an expander (three linear layers of 8192, BN-ReLU between them, sec. 4.2);
the loss is λ s(Z, Z') + μ [v(Z) + v(Z')] + ν [c(Z) + c(Z')] with λ = μ = 25, ν = 1 (eq. 6, `vicreg_loss`):
invariance (MSE of the pairs), a hinge on each dimension's standard deviation, and the squared off-diagonal
covariances, the last two over the global batch. The paper trains with LARS, base lr 0.2 x batch / 256, weight
decay 1e-6, biases and BN excluded (appendix C), and BYOL's augmentation.
"""

from __future__ import annotations

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor

from data_modules.views import Views
from vlp_lightning.catalog import Paper
from vlp_lightning.losses.redundancy_reduction import vicreg_loss
from vlp_lightning.methods.base import VLPMethod, WarmupCosineLR
from vlp_lightning.methods.self_supervised.common import byol_views, two_view_embeddings
from vlp_lightning.modules.heads import MLPHead
from vlp_lightning.modules.vision import VisionEncoder, tiny_vit


class VICReg(VLPMethod):
    """Invariance between views, variance above a margin, decorrelated dimensions.

    Args:
        vision: backbone (default: a tiny 2-block ViT at 32 px; ResNet-50 in the paper).
        expander_dim: width of every expander layer (8192).
        expander_layers: linear layers of the expander (3).
        invariance_weight, variance_weight, covariance_weight: λ, μ, ν (25, 25, 1).
        gather: variance and covariance over the batch of every rank.
    """

    paper = Paper(
        "VICReg: Variance-Invariance-Covariance Regularization for Self-Supervised Learning",
        "Bardes et al.", 2022,
    )
    family = "redundancy reduction"
    view_kind = "two crops"

    def __init__(
        self,
        vision: VisionEncoder | None = None,
        expander_dim: int = 64,
        expander_layers: int = 3,
        invariance_weight: float = 25.0,
        variance_weight: float = 25.0,
        covariance_weight: float = 1.0,
        gather: bool = True,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = WarmupCosineLR,
        compile: bool = False,
    ) -> None:
        super().__init__(optimizer=optimizer, lr_scheduler=lr_scheduler, compile=compile)
        self.save_hyperparameters(ignore=["vision", "optimizer", "lr_scheduler"])
        self.vision = vision or tiny_vit()
        self.expander = MLPHead(self.vision.num_features, expander_dim, expander_dim, layers=expander_layers, norm="bn")
        self.invariance_weight = invariance_weight
        self.variance_weight = variance_weight
        self.covariance_weight = covariance_weight
        self.gather = gather

    def train_views(self) -> Views:
        """BYOL's augmentation (appendix C): scale 0.08-1, blur 1.0 / 0.1, solarise 0 / 0.2."""
        return byol_views(self.vision)

    def forward_loss(self, batch: dict) -> dict[str, Tensor]:
        view_a, view_b = two_view_embeddings(batch, "VICReg", lambda images: self.expander(self.vision(images)))
        loss = vicreg_loss(
            view_a, view_b, self.invariance_weight, self.variance_weight, self.covariance_weight, gather=self.gather
        )
        return {"loss": loss}
