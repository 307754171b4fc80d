"""BYOL: Bootstrap Your Own Latent (Grill et al. 2020).

An online network (backbone f_θ, projector g_θ, predictor q_θ) predicts the target network's projection of another
view of the image; the target (f_ξ, g_ξ) is an EMA of the online backbone and projector (sec. 3.1, eq. 1), τ from
0.996 to 1 on a cosine over the run (sec. 3.2, `MomentumMethod`). The loss is the normalised MSE
2 - 2 cos(q_θ(z_θ), z'_ξ) (eq. 2), symmetrised by swapping the views (eq. 3). Projector and predictor are
Linear(4096)-BN-ReLU-Linear(256) (sec. 3.3). The paper trains with LARS, lr 0.2 x batch / 256, weight decay 1.5e-6,
biases and BatchNorm excluded from both (appendix C): `exempt_gains_and_biases` stays True.
"""

from __future__ import annotations

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from data_modules.views import Views
from vlp_lightning.catalog import Paper
from vlp_lightning.losses.self_distillation import byol_regression_loss
from vlp_lightning.methods.base import WarmupCosineLR
from vlp_lightning.methods.momentum import MomentumMethod, momentum_copy
from vlp_lightning.methods.self_supervised.common import byol_views, expect_views
from vlp_lightning.modules.heads import MLPHead
from vlp_lightning.modules.vision import VisionEncoder, tiny_vit


class BYOL(MomentumMethod):
    """Online network predicting an EMA target network's projection of the other view.

    Args:
        vision: backbone (default: a tiny 2-block ViT at 32 px; ResNet-50 in the paper).
        hidden_dim: hidden width of projector and predictor (4096).
        projection_dim: output size of projector and predictor (256).
        base_momentum: τ_base (0.996); τ rises to `final_momentum` (1.0).
    """

    paper = Paper("Bootstrap Your Own Latent: A New Approach to Self-Supervised Learning", "Grill et al.", 2020)
    family = "momentum teacher"
    view_kind = "two crops"

    def __init__(
        self,
        vision: VisionEncoder | None = None,
        hidden_dim: int = 64,
        projection_dim: int = 32,
        base_momentum: float = 0.996,
        final_momentum: float = 1.0,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = WarmupCosineLR,
        compile: bool = False,
    ) -> None:
        super().__init__(base_momentum, final_momentum, optimizer=optimizer, lr_scheduler=lr_scheduler, compile=compile)
        self.save_hyperparameters(ignore=["vision", "optimizer", "lr_scheduler"])
        self.vision = vision or tiny_vit()
        self.projector = MLPHead(self.vision.num_features, hidden_dim, projection_dim, layers=2, norm="bn")
        self.predictor = MLPHead(projection_dim, hidden_dim, projection_dim, layers=2, norm="bn")
        self.target = momentum_copy(nn.Sequential(self.vision, self.projector))

    @property
    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(nn.Sequential(self.vision, self.projector), self.target)]

    def train_views(self) -> Views:
        """Two crops (scale 0.08-1) with BYOL's asymmetric augmentation (table 6): colour jitter p 0.8, grayscale
        0.2, blur 1.0 / 0.1, solarisation 0.0 / 0.2. (Jitter strength 0.5 gives brightness / contrast 0.4 and hue 0.1
        as the paper; its saturation is 0.4 here, 0.2 in the paper: `Augment` has one strength for all three.)"""
        return byol_views(self.vision)

    def forward_loss(self, batch: dict) -> dict[str, Tensor]:
        views = expect_views(batch, 2, "BYOL", "TwoCrops")
        batch_size = len(views[0])
        online = self.predictor(self.projector(self.vision(torch.cat(views))))  # [2N, D], BN over both views
        target = self.forward_teacher(self.target, torch.cat(views))  # [2N, D]
        prediction_a, prediction_b = online.split(batch_size)
        target_a, target_b = target.split(batch_size)
        loss = byol_regression_loss(prediction_a, target_b) + byol_regression_loss(prediction_b, target_a)  # eq. 3
        return {"loss": loss}
