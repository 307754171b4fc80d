"""ConVIRT: contrastive learning of visual representations from paired images and text (Zhang et al. 2020,
"Contrastive Learning of Medical Visual Representations from Paired Images and Text").

Same dual-encoder shape as CLIP, with the paper's differences (sec. 2): non-linear projection heads (one hidden
layer with ReLU, eq. 1), a fixed temperature tau instead of a learned one, and a bidirectional loss weighted
lambda * l(image->text) + (1 - lambda) * l(text->image) (eq. 2-4; tau = 0.1, lambda = 0.75, embedding 512 in the
paper). Its image views add a flip, an affine warp, brightness / contrast jitter and blur to the random crop, and
its text side is one random sentence of the report per step (sec. 2 and appendix; see `train_views`, and the data
module's `caption_sampling="sentence"` in the presets). The paper's text encoder is BERT max-pooled over all token
outputs with its embeddings and first 6 layers frozen: `HFTextEncoder(pooling="max", frozen_layers=6)`.
Probes (kNN, linear) score the image encoder's output with the projection g_v discarded, as the paper's linear
evaluation does (sec. 4): `probe_features` is the base's default, the pooled backbone features.
"""

from __future__ import annotations

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from data_modules.views import RandomAffine, SingleCrop, Views
from vlp_lightning.catalog import Paper
from vlp_lightning.losses.contrastive import convirt_contrastive_loss
from vlp_lightning.methods.base import WarmupCosineLR
from vlp_lightning.methods.clip import CLIP
from vlp_lightning.modules.heads import MLPHead
from vlp_lightning.modules.tokenizers import Tokenizer
from vlp_lightning.modules.vision import VisionEncoder


class ConVIRT(CLIP):
    """Bidirectional image-text contrastive learning with fixed temperature and MLP projections.

    Args:
        temperature: tau of eq. 2-3 (fixed, 0.1 in the paper).
        image_to_text_weight: lambda of eq. 4 (0.75 in the paper).
        See `CLIP` for the others.
    """

    paper = Paper(
        "Contrastive Learning of Medical Visual Representations from Paired Images and Text",
        "Zhang et al.", 2020,
    )
    family = "contrastive image-text"
    view_kind = "one crop"

    def __init__(
        self,
        vision: VisionEncoder | None = None,
        text: nn.Module | None = None,
        tokenizer: Tokenizer | None = None,
        embed_dim: int = 256,
        temperature: float = 0.1,
        image_to_text_weight: float = 0.75,
        local_loss: bool = False,
        gather_with_grad: bool = True,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = WarmupCosineLR,
        compile: bool = False,
    ) -> None:
        super().__init__(
            vision=vision,
            text=text,
            tokenizer=tokenizer,
            embed_dim=embed_dim,
            init_logit_scale=1 / temperature,
            learn_logit_scale=False,
            local_loss=local_loss,
            gather_with_grad=gather_with_grad,
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
            compile=compile,
        )
        self.temperature = temperature
        self.image_to_text_weight = image_to_text_weight

    def projection_head(self, in_features: int, embed_dim: int) -> nn.Module:
        """g_v and g_u of eq. 1: a single hidden layer with ReLU."""
        return MLPHead(in_features, in_features, embed_dim, layers=2, norm="none")

    def train_views(self) -> Views:
        """The paper's five image transformations (sec. 3, "Realization", and the appendix): a random crop of
        0.6-1.0 of the image, a horizontal flip with p 0.5, a random affine map (rotation [-20, 20] degrees,
        translation up to 0.1 of the side, scale [0.95, 1.05]), colour jitter of brightness and contrast only
        (factors in [0.6, 1.4], i.e. SimCLR strength 0.5 without saturation and hue: the images are monochrome) and
        a Gaussian blur with sigma in [0.1, 3.0]. The paper gives no probability but the flip's, so the others apply
        to every image. The affine runs with the crop, before the flip: its distribution is mirror-symmetric, so the
        order does not change the views. Normalised with the image tower's statistics."""
        return SingleCrop(
            scale=(0.6, 1.0),
            hflip=True,
            color_jitter=0.5,
            color_jitter_prob=1.0,
            max_hue_shift=0.0,
            jitter_saturation=False,
            blur_prob=1.0,
            blur_sigma=(0.1, 3.0),
            affine=RandomAffine(degrees=20.0, translate=0.1, scale=(0.95, 1.05)),
            mean=self.vision.mean,
            std=self.vision.std,
        )

    def contrastive_loss(self, image_features: Tensor, text_features: Tensor) -> Tensor:
        return convirt_contrastive_loss(
            image_features,
            text_features,
            temperature=self.temperature,
            image_to_text_weight=self.image_to_text_weight,
            local_loss=self.local_loss,
            gather_with_grad=self.gather_with_grad,
        )
