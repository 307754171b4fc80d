"""MoCo v3: "An Empirical Study of Training Self-Supervised Vision Transformers" (Chen, Xie, He 2021).

Two crops go through the base encoder f_q (backbone, 3-layer projector, 2-layer predictor, with BN; 4096 hidden,
256 out, sec. 2 and appendix) and the momentum encoder f_k (backbone and projector, an EMA of f_q's with τ from
0.99 to 1 on a cosine, appendix). No queue: the keys of the global batch are the negatives, and the loss is
symmetric, ctr(q1, k2) + ctr(q2, k1) (Algorithm 1), each term scaled by 2τ (`moco_v3_contrastive_loss`). For ViTs
the patch projection can be frozen at its random init (`freeze_patch_embedding`, sec. 4.2 "random patch projection",
the official `--stop-grad-conv1`), which the paper finds stabilises training. The ViT recipe is AdamW, lr 1.5e-4 x
batch / 256, weight decay 0.1 on every parameter (the official optimizer takes `model.parameters()`).
"""

from __future__ import annotations

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from data_modules.views import Views
from vlp_lightning.catalog import Paper
from vlp_lightning.losses.instance_contrastive import moco_v3_contrastive_loss
from vlp_lightning.methods.base import WarmupCosineLR
from vlp_lightning.methods.momentum import MomentumMethod, momentum_copy
from vlp_lightning.methods.self_supervised.common import byol_views, expect_views
from vlp_lightning.modules.heads import MLPHead
from vlp_lightning.modules.vision import VisionEncoder, tiny_vit


class MoCoV3(MomentumMethod):
    """Base encoder with predictor against a momentum encoder, symmetric InfoNCE over the global batch.

    Args:
        vision: backbone (default: a tiny 2-block ViT at 32 px; ViT-B/16 or ResNet-50 in the paper).
        hidden_dim: hidden width of projector and predictor (4096).
        projection_dim: output size (256).
        temperature: τ (0.2 for ViT).
        base_momentum: τ_base of the momentum encoder (0.99), rising to `final_momentum` (1.0).
        freeze_patch_embedding: keep a ViT's patch projection at its random init (sec. 4.2).
    """

    paper = Paper("An Empirical Study of Training Self-Supervised Vision Transformers", "Chen, Xie and He", 2021)
    family = "instance contrastive"
    view_kind = "two crops"

    exempt_gains_and_biases = False  # the official AdamW decays every parameter (module doc)

    def __init__(
        self,
        vision: VisionEncoder | None = None,
        hidden_dim: int = 64,
        projection_dim: int = 32,
        temperature: float = 0.2,
        base_momentum: float = 0.99,
        final_momentum: float = 1.0,
        freeze_patch_embedding: bool = False,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = WarmupCosineLR,
        compile: bool = False,
    ) -> None:
        super().__init__(base_momentum, final_momentum, optimizer=optimizer, lr_scheduler=lr_scheduler, compile=compile)
        self.save_hyperparameters(ignore=["vision", "optimizer", "lr_scheduler"])
        self.vision = vision or tiny_vit()
        if freeze_patch_embedding:
            patch_embedding = getattr(self.vision.model, "patch_embed", None)
            if patch_embedding is None:
                raise ValueError("freeze_patch_embedding needs a ViT backbone (a timm model with patch_embed)")
            patch_embedding.requires_grad_(False)
        self.projector = MLPHead(self.vision.num_features, hidden_dim, projection_dim, layers=3, norm="bn")
        self.predictor = MLPHead(projection_dim, hidden_dim, projection_dim, layers=2, norm="bn")
        self.momentum_encoder = momentum_copy(nn.Sequential(self.vision, self.projector))
        self.temperature = temperature

    @property
    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(nn.Sequential(self.vision, self.projector), self.momentum_encoder)]

    def train_views(self) -> Views:
        """BYOL's augmentation, which MoCo v3 adopts (appendix): scale 0.08-1, blur 1.0 / 0.1, solarise 0 / 0.2."""
        return byol_views(self.vision)

    def forward_loss(self, batch: dict) -> dict[str, Tensor]:
        views = expect_views(batch, 2, "MoCoV3", "TwoCrops")
        batch_size = len(views[0])
        queries = self.predictor(self.projector(self.vision(torch.cat(views)))).split(batch_size)
        keys = self.forward_teacher(self.momentum_encoder, torch.cat(views)).split(batch_size)
        loss = moco_v3_contrastive_loss(queries[0], keys[1], self.temperature) + moco_v3_contrastive_loss(
            queries[1], keys[0], self.temperature
        )
        return {"loss": loss}
