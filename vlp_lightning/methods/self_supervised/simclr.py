"""SimCLR: a Simple Framework for Contrastive Learning of Visual Representations (Chen et al. 2020).

Two augmented views of every image go through the backbone f and a projection head g (sec. 2.1: g(h) = W2 ReLU(W1 h),
with BatchNorm as in the official code; 2048-2048-128 for ResNet-50, appendix B.9); NT-Xent (eq. 1,
`nt_xent_loss`) makes every view pick its partner among the 2N - 1 other views of the global batch (gathered with
gradient across ranks, sec. 2.2 "global BN" aside). The paper recipe is LARS, lr 0.3 x batch / 256 (4.8 at 4096),
weight decay 1e-6, τ 0.1, with biases and BatchNorm excluded from LARS adaptation and weight decay (appendix B.1).
"""

from __future__ import annotations

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor

from data_modules.views import TwoCrops, Views
from vlp_lightning.catalog import Paper
from vlp_lightning.losses.instance_contrastive import nt_xent_loss
from vlp_lightning.methods.base import VLPMethod, WarmupCosineLR
from vlp_lightning.methods.self_supervised.common import two_view_embeddings
from vlp_lightning.modules.heads import MLPHead
from vlp_lightning.modules.vision import VisionEncoder, tiny_vit


class SimCLR(VLPMethod):
    """Contrast two views of each image against every other view of the global batch.

    Args:
        vision: backbone (default: a tiny 2-block ViT at 32 px; ResNet-50 in the paper).
        hidden_dim: hidden width of the head (2048).
        projection_dim: size of z (128).
        temperature: τ of NT-Xent (0.1 at batch 4096; 0.5 in the paper's ablations).
        gather: negatives from every rank (the paper's global batch).
    """

    paper = Paper("A Simple Framework for Contrastive Learning of Visual Representations", "Chen et al.", 2020)
    family = "instance contrastive"
    view_kind = "two crops"

    def __init__(
        self,
        vision: VisionEncoder | None = None,
        hidden_dim: int = 64,
        projection_dim: int = 32,
        temperature: float = 0.1,
        gather: bool = True,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = WarmupCosineLR,
        compile: bool = False,
    ) -> None:
        super().__init__(optimizer=optimizer, lr_scheduler=lr_scheduler, compile=compile)
        self.save_hyperparameters(ignore=["vision", "optimizer", "lr_scheduler"])
        self.vision = vision or tiny_vit()
        self.projector = MLPHead(self.vision.num_features, hidden_dim, projection_dim, layers=2, norm="bn")
        self.temperature = temperature
        self.gather = gather

    def train_views(self) -> Views:
        """Two crops (scale 0.08-1) with colour distortion strength 1.0 (p 0.8), grayscale 0.2 and blur 0.5
        (appendix A)."""
        return TwoCrops(
            scale=(0.08, 1.0), color_jitter=1.0, grayscale_prob=0.2, blur_prob=0.5, mean=self.vision.mean,
            std=self.vision.std,
        )

    def forward_loss(self, batch: dict) -> dict[str, Tensor]:
        view_a, view_b = two_view_embeddings(batch, "SimCLR", lambda images: self.projector(self.vision(images)))
        return {"loss": nt_xent_loss(view_a, view_b, self.temperature, gather=self.gather)}
