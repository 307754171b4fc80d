"""CoCoOp: Conditional Context Optimization (Zhou et al. 2022, "Conditional Prompt Learning for Vision-Language
Models", CVPR).

A lightweight meta-net h_θ turns each image's embedding into a token π = h_θ(f(x)) that shifts every context vector:
v_m(x) = v_m + π (sec. 3.2), so the prompt of class c, t_c(x) = {v_1(x), ..., v_M(x), c_c}, is conditioned on the
image and generalises better to unseen classes. The meta-net is Linear(D, D/16) -> ReLU -> Linear(D/16, width)
(official `trainers/cocoop.py`), fed the *normalised* image embedding. Context and meta-net train; CLIP is frozen.

Cost: every image has its own C prompts, so one step encodes N x C prompts with the text tower (memory grows with
classes x batch, the reason the paper trains at batch 1; `bench/adaptation.py` measures it).

Paper setting (`vit_b16_c4_ep10_batch1_ctxv1.yaml`): M = 4 from "a photo of a", batch 1, SGD lr 0.002, cosine,
one warmup epoch at 1e-5, 10 epochs, 16 shots of the base classes.
"""

from __future__ import annotations

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from vlp_lightning.catalog import Paper
from vlp_lightning.methods.adaptation.base import TrainClasses
from vlp_lightning.methods.adaptation.prompt_learning import PromptLearning
from vlp_lightning.methods.base import WarmupCosineLR
from vlp_lightning.modules.prompts import ClassTokenPosition


class CoCoOp(PromptLearning):
    """CoOp's context shifted by an image-conditioned token (module doc; arguments: `PromptLearning`, plus
    `meta_reduction`: the meta-net's bottleneck divides the embedding width by it, 16 in the paper)."""

    paper = Paper("Conditional Prompt Learning for Vision-Language Models", "Zhou et al.", 2022)

    def __init__(
        self,
        pretrained: str,
        classnames: list[str] | None = None,
        classnames_from: str | None = None,
        label_field: str = "cls",
        train_classes: TrainClasses = "all",
        n_ctx: int | None = None,
        ctx_init: str | None = "a photo of a",
        class_token_position: ClassTokenPosition = "end",
        meta_reduction: int = 16,
        pretrained_config: str | None = None,
        crop_scale: tuple[float, float] = (0.08, 1.0),
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = WarmupCosineLR,
        compile: bool = False,
    ) -> None:
        super().__init__(
            pretrained, classnames, classnames_from, label_field, train_classes, n_ctx, ctx_init, False,
            class_token_position, pretrained_config, crop_scale, optimizer, lr_scheduler, compile,
        )
        width = self.prompts.ctx.shape[-1]
        hidden = max(1, self.embed_dim // meta_reduction)
        self.meta_net = nn.Sequential(
            nn.Linear(self.embed_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, width)
        )

    def context(self, image_features: Tensor) -> Tensor:
        """v_m(x) = v_m + h_θ(f(x)) for every image: [N, 1, M, width]."""
        shift = self.meta_net(image_features.to(self.prompts.ctx.dtype))  # [N, width]
        return (self.prompts.ctx[None] + shift[:, None])[:, None]
